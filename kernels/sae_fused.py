"""Full SAE replace in Triton: encode -> activation -> latent edits -> decode, in place.

The math is `fasteer.ops.reference.sae_replace` (steps 1-6 there); this module knows
nothing of models. Five kernels, launched by `fasteer.ops.triton.sae_replace`:

``sae_dense_kernel``        encode an (row tile, F tile), activation, the rows' edits;
                            then decode the tile (fused pass), or write the latent
                            delta (two-phase pass), or write pre (TopK)
``sae_finalize_kernel``     fused pass: h = (x + acc) / s  or  (acc + b_dec) / s
``sae_decode_kernel``       two-phase pass: the decode GEMM, writing h in its epilogue
``sae_topk_select_kernel``  TopK: the exact k largest pre-activations of each row
``sae_topk_decode_kernel``  TopK: the sparse decode (k decoder rows + the edited ones)

Why it is written this way
--------------------------
* At decode size (a few tokens) the cost is reading W_enc and W_dec: 2*D*F elements,
  4 GiB in bf16 for D = 8192, F = 131072. A few tokens make one tile of rows, so the
  GPU can only be filled by splitting d_sae: the dense grid is (row tiles, F tiles).
  In the fused pass a program encodes its F tile for its BLOCK_M rows (looping over D
  in BLOCK_K chunks, tl.dot), applies the activation and every row's slot edits to the
  latent tile in registers, and decodes that tile at once, (z' - z) @ W_dec[tile, :]
  with the error kept or z' @ W_dec[tile, :] without, looping over D in BLOCK_D chunks.
  The latent tile never leaves the chip; each W_enc column and W_dec row is read once
  per row tile. The price of splitting F is that the decode is a sum over programs:
  each adds its [BLOCK_M, D] part into an fp32 accumulator with relaxed atomics
  (vector red.add on sm_90). Their bytes are N/BLOCK_F of the weight bytes (0.8% for
  one token, 12.5% for 16 with BLOCK_F = 128) and go to L2, where the N x D
  accumulator stays; the fp32 sum order, hence the last bit, varies run to run. A
  second small kernel writes h (h is the input every program reads, so no program
  may write it). Splitting D instead and recomputing the encode in each D program
  would read W_enc D/BLOCK_D times.
* The atomics grow with N, so more rows (the launcher's FUSED_MAX_ROWS) take the
  two-phase pass: the dense kernel writes the latent delta tile to HBM (W_dec's dtype,
  exactly the operand the fused decode would use) plus a per-tile "non-zero" flag,
  and ``sae_decode_kernel`` runs the decode GEMM over (row tiles, D chunks), reading
  only flagged tiles and writing h in its epilogue. Extra traffic: the latents twice,
  N/D of the weight bytes (6% at N = 512, D = 8192), no atomics, no accumulator.
* Work the math does not need is skipped per program, with a scalar branch: a tile of
  rows that are all untouched, or all keep the error term and have no edited feature
  in this F tile, reads neither matrix (with the error kept, unedited latents cancel
  exactly: z' - z = 0). An error-keeping edit of a few features costs a few tiles;
  replacing h by the reconstruction (keep_error off) costs the full read.
* Matrix products run on tensor cores in the weights' precision: the activation
  operand (X, or the latent delta) is rounded to W's dtype (bf16/fp16) and products
  accumulate in fp32, as any bf16 SAE forward does. fp32 weights use "tf32x3" on the
  GPU (three tf32 products: fp32-level accuracy on tensor cores), "ieee" in the
  interpreter. Everything else (activations, edits, the error term) is fp32.
* TopK needs every pre-activation of a row before any latent is known: the dense
  kernel writes pre [rows, F] (fp32 scratch; W_enc read once per row tile), one
  program per row finds the k-th largest value exactly by radix select on its
  sortable bit pattern (8 passes of 4-bit digits over the row's F values, counted
  with tl.histogram; the row is L2-resident) and compacts the k selected ids, and
  the decode gathers k + K decoder rows per row (grid: rows x D chunks). W_dec is
  never read in full: a TopK replace costs one W_enc read plus 9 passes over pre.
  Ties at the k-th value go to the lowest feature ids.
* Under Triton's interpreter bf16 values are stored as raw uint16 and tl.dot would
  multiply the bit patterns, and float32 -> bfloat16 truncates: with SOFT_BF16 the
  kernels round on the bits and feed bf16 operands to tl.dot as (exact) fp32 values.
  Compiled code uses the hardware conversions and bf16 tensor-core products.
* Rows that are not edited (gate 0, slot -1 or >= S) are never written.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Mirrors of fasteer.ops.layout (the kernels import nothing from the package; a test
# checks the values). FEAT_CLAMP is the fall-through branch of the edit op.
ACT_RELU: tl.constexpr = tl.constexpr(0)
ACT_JUMPRELU: tl.constexpr = tl.constexpr(1)
ACT_LINEAR: tl.constexpr = tl.constexpr(2)
ACT_TOPK: tl.constexpr = tl.constexpr(3)

FEAT_ADD: tl.constexpr = tl.constexpr(0)
FEAT_SET: tl.constexpr = tl.constexpr(1)
FEAT_SCALE: tl.constexpr = tl.constexpr(2)

# radix select: 4-bit digits, 8 passes over a 32-bit key; histogram bin 16 collects
# the elements outside the current prefix (32 bins: a power of two, all values in range)
# what sae_dense_kernel writes
OUT_ACCUMULATE: tl.constexpr = tl.constexpr(0)
OUT_LATENT: tl.constexpr = tl.constexpr(1)
OUT_PRE: tl.constexpr = tl.constexpr(2)

RADIX_BITS: tl.constexpr = tl.constexpr(4)
RADIX_DIGITS: tl.constexpr = tl.constexpr(16)  # 1 << RADIX_BITS
RADIX_BINS: tl.constexpr = tl.constexpr(32)


@triton.jit
def _round(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> ``dtype``, round to nearest even (the interpreter truncates to bf16)."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _as_operand(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``x`` rounded to the weights' ``dtype`` for a tensor-core product."""
    r = _round(x, dtype, SOFT_BF16)
    if SOFT_BF16 and dtype == tl.bfloat16:
        r = r.to(tl.float32)  # exact; the interpreter's tl.dot cannot multiply bf16
    return r


@triton.jit
def _weight_operand(w, SOFT_BF16: tl.constexpr):
    if SOFT_BF16 and w.dtype == tl.bfloat16:
        return w.to(tl.float32)
    else:
        return w


@triton.jit
def _edit_op(z, code, v, hi):
    """One latent edit: add v / set v / scale by v / clamp to [v, hi] (broadcasting)."""
    return tl.where(code == FEAT_ADD, z + v,
                    tl.where(code == FEAT_SET, v,
                             tl.where(code == FEAT_SCALE, z * v, tl.minimum(tl.maximum(z, v), hi))))


@triton.jit
def _sort_key(v):
    """float32 -> int64 in [0, 2**32), monotonic in the value (-0.0 just below +0.0)."""
    b = v.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b >= 0, b + 2147483648, -b - 1)


@triton.jit
def _row_state(slot_ptr, gate_ptr, keep_ptr, rows, n_rows, n_slots):
    """(active, slot clamped to a valid index, keep_error) of the given rows."""
    rmask = rows < n_rows
    slot = tl.load(slot_ptr + rows, mask=rmask, other=-1)
    gate = tl.load(gate_ptr + rows, mask=rmask, other=0)
    active = rmask & (gate != 0) & (slot >= 0) & (slot < n_slots)
    slot = tl.where(active, slot, 0)
    keep = tl.load(keep_ptr + slot, mask=active, other=1) != 0
    return active, slot, keep


# Row and table counts change every call: never specialise on them (Triton would
# recompile when one becomes 1); D and F are fixed per SAE and stay specialised, so
# the compiler sees their divisibility by 16 and vectorises.
@triton.jit(do_not_specialize=["n_rows", "n_slots", "n_k"])
def sae_dense_kernel(h_ptr, out_ptr, flag_ptr, slot_ptr, gate_ptr, keep_ptr,
                     w_enc_ptr, b_enc_ptr, w_dec_ptr, b_dec_ptr, theta_ptr,
                     feat_ptr, code_ptr, val_ptr,
                     n_rows, D, F, stride_h, n_slots, n_k, in_scale,
                     ACTIVATION: tl.constexpr, APPLY_B_DEC: tl.constexpr, OUTPUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, ENC_PRECISION: tl.constexpr,
                     DEC_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), cdiv(F, BLOCK_F)). Program (m, f) encodes rows
    [m*BLOCK_M, +BLOCK_M) on features [f*BLOCK_F, +BLOCK_F), then by OUTPUT:
    OUT_ACCUMULATE  adds its decoded part into out = acc [N, D] (fp32, zeroed)
    OUT_LATENT      writes the latent delta tile into out = lat [N, F] (W_dec's dtype)
                    and flag[m, f] = whether the tile is non-zero (else lat is not written)
    OUT_PRE         writes the pre-activations into out = pre [N, F] (fp32; TopK)."""
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    active, slot, keep = _row_state(slot_ptr, gate_ptr, keep_ptr, rows, n_rows, n_slots)
    f_lo = pid_f * BLOCK_F
    cols = f_lo + tl.arange(0, BLOCK_F)
    cmask = cols < F
    edit_base = slot * n_k

    if OUTPUT == OUT_PRE:
        row_need = active
    else:
        # error kept and no edited feature in this tile: the row's part is exactly 0
        has_edit = rows < 0
        for j in range(n_k):
            fj = tl.load(feat_ptr + edit_base + j, mask=active, other=-1)
            has_edit = has_edit | ((fj >= f_lo) & (fj < f_lo + BLOCK_F))
        row_need = active & (has_edit | ~keep)
    need = tl.max(row_need.to(tl.int32), axis=0)
    if OUTPUT == OUT_LATENT:
        tl.store(flag_ptr + pid_m * tl.num_programs(1) + pid_f, need)

    if need > 0:
        row_off = rows.to(tl.int64) * stride_h

        # ---- encode: pre = (s*h - b_dec) @ W_enc[:, tile] + b_enc[tile]
        pre = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            dk = d0 + tl.arange(0, BLOCK_K)
            dmask = dk < D
            x = tl.load(h_ptr + row_off[:, None] + dk[None, :],
                        mask=row_need[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            x = x * in_scale
            if APPLY_B_DEC:
                x = x - tl.load(b_dec_ptr + dk, mask=dmask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_enc_ptr + dk.to(tl.int64)[:, None] * F + cols[None, :],
                        mask=dmask[:, None] & cmask[None, :], other=0.0)
            pre = tl.dot(_as_operand(x, w_enc_ptr.dtype.element_ty, SOFT_BF16),
                         _weight_operand(w, SOFT_BF16), pre, input_precision=ENC_PRECISION)
        pre = pre + tl.load(b_enc_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]

        if OUTPUT == OUT_PRE:
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :], pre,
                     mask=active[:, None] & cmask[None, :])
        else:
            # ---- activation
            if ACTIVATION == ACT_RELU:
                z = tl.maximum(pre, 0.0)
            elif ACTIVATION == ACT_JUMPRELU:
                theta = tl.load(theta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                z = tl.where(pre > tl.maximum(theta, 0.0)[None, :], pre, 0.0)
            else:
                z = pre
            # ---- the rows' slot edits, in order (a feature listed twice sees the
            # first edit's result)
            z_new = z
            for j in range(n_k):
                fj = tl.load(feat_ptr + edit_base + j, mask=row_need, other=-1)
                cj = tl.load(code_ptr + edit_base + j, mask=row_need, other=0)
                vj = tl.load(val_ptr + (edit_base + j) * 2, mask=row_need, other=0.0)
                hj = tl.load(val_ptr + (edit_base + j) * 2 + 1, mask=row_need, other=0.0)
                hit = cols[None, :] == fj[:, None]
                z_new = tl.where(hit, _edit_op(z_new, cj[:, None], vj[:, None], hj[:, None]), z_new)
            dz = tl.where(keep[:, None], z_new - z, z_new)
            dz = tl.where(row_need[:, None] & cmask[None, :], dz, 0.0)

            if OUTPUT == OUT_LATENT:
                tl.store(out_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :],
                         _round(dz, w_dec_ptr.dtype.element_ty, SOFT_BF16),
                         mask=(rows < n_rows)[:, None] & cmask[None, :])
            else:
                # ---- decode this tile: acc[rows, :] += dz @ W_dec[tile, :]
                dz = _as_operand(dz, w_dec_ptr.dtype.element_ty, SOFT_BF16)
                acc_rows = out_ptr + rows.to(tl.int64)[:, None] * D
                w_rows = w_dec_ptr + cols.to(tl.int64)[:, None] * D
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    ddmask = dd < D
                    w = tl.load(w_rows + dd[None, :], mask=cmask[:, None] & ddmask[None, :], other=0.0)
                    part = tl.dot(dz, _weight_operand(w, SOFT_BF16), input_precision=DEC_PRECISION)
                    tl.atomic_add(acc_rows + dd[None, :], part,
                                  mask=row_need[:, None] & ddmask[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["n_rows", "n_slots"])
def sae_decode_kernel(h_ptr, lat_ptr, flag_ptr, slot_ptr, gate_ptr, keep_ptr, w_dec_ptr, b_dec_ptr,
                      n_rows, D, F, stride_h, n_slots, n_f_tiles, in_scale,
                      BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                      DEC_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), cdiv(D, BLOCK_D)), after sae_dense_kernel(OUT_LATENT) with
    the same BLOCK_M and BLOCK_F: acc = lat[rows, :] @ W_dec[:, d chunk] over the F tiles
    flagged non-zero (the others are predicated off: no memory traffic), then h = (s*h +
    acc) / s with the error kept, else (acc + b_dec) / s, for the active rows."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    active, slot, keep = _row_state(slot_ptr, gate_ptr, keep_ptr, rows, n_rows, n_slots)
    if tl.max(active.to(tl.int32), axis=0) > 0:
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        ddmask = dd < D
        rmask = rows < n_rows
        lat_rows = lat_ptr + rows.to(tl.int64)[:, None] * F
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for t in range(0, n_f_tiles):
            # an unflagged tile masks every column (a limit, not `& flag`: the interpreter
            # cannot mask with a scalar-and-vector bool)
            limit = tl.where(tl.load(flag_ptr + pid_m * n_f_tiles + t) != 0, F, 0)
            cols = t * BLOCK_F + tl.arange(0, BLOCK_F)
            cmask = cols < limit
            lat = tl.load(lat_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w_dec_ptr + cols.to(tl.int64)[:, None] * D + dd[None, :],
                        mask=cmask[:, None] & ddmask[None, :], other=0.0)
            acc = tl.dot(_weight_operand(lat, SOFT_BF16), _weight_operand(w, SOFT_BF16), acc,
                         input_precision=DEC_PRECISION)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + dd[None, :]
        store_mask = active[:, None] & ddmask[None, :]
        x = tl.load(h_ptrs, mask=store_mask, other=0.0).to(tl.float32) * in_scale
        b = tl.load(b_dec_ptr + dd, mask=ddmask, other=0.0).to(tl.float32)
        out = tl.where(keep[:, None], x + acc, acc + b[None, :])
        tl.store(h_ptrs, _round(tl.math.div_rn(out, in_scale), h_ptr.dtype.element_ty, SOFT_BF16),
                 mask=store_mask)


@triton.jit(do_not_specialize=["n_slots"])
def sae_finalize_kernel(h_ptr, acc_ptr, slot_ptr, gate_ptr, keep_ptr, b_dec_ptr,
                        D, stride_h, n_slots, in_scale,
                        BLOCK_D: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Grid (N, cdiv(D, BLOCK_D)): h = (s*h + acc) / s with the error kept, else
    (acc + b_dec) / s, rounded to h's dtype; untouched rows are not written."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    gate = tl.load(gate_ptr + row)
    if (gate != 0) & (slot >= 0) & (slot < n_slots):
        keep = tl.load(keep_ptr + slot)
        offs = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        h_row = h_ptr + row.to(tl.int64) * stride_h
        acc = tl.load(acc_ptr + row.to(tl.int64) * D + offs, mask=dmask, other=0.0)
        if keep != 0:
            out = tl.load(h_row + offs, mask=dmask, other=0.0).to(tl.float32) * in_scale + acc
        else:
            out = acc + tl.load(b_dec_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(h_row + offs, _round(tl.math.div_rn(out, in_scale), h_ptr.dtype.element_ty, SOFT_BF16),
                 mask=dmask)


@triton.jit(do_not_specialize=["n_slots", "k"])
def sae_topk_select_kernel(pre_ptr, idx_ptr, sel_ptr, slot_ptr, gate_ptr,
                           F, n_slots, k, BLOCK_F: tl.constexpr):
    """Grid (N,). For an active row: t = sort key of the k-th largest pre (exact radix
    select), idx[row, :k] = the selected feature ids (ascending), sel[row] = (t, last
    tie taken): feature f is selected iff key(pre_f) > t, or == t and f <= last."""
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row)
    gate = tl.load(gate_ptr + row)
    if (gate != 0) & (slot >= 0) & (slot < n_slots):
        pre_row = pre_ptr + row.to(tl.int64) * F
        bins = tl.arange(0, RADIX_BINS)
        digit_bins = bins < RADIX_DIGITS
        prefix = tl.zeros([], dtype=tl.int64)
        need = k + tl.zeros([], dtype=tl.int32)  # rank still to find among the prefix matches
        for p in tl.static_range(32 // RADIX_BITS):
            shift = 32 - RADIX_BITS * (p + 1)
            counts = tl.zeros([RADIX_BINS], dtype=tl.int32)
            for f0 in range(0, F, BLOCK_F):
                cols = f0 + tl.arange(0, BLOCK_F)
                cmask = cols < F
                key = _sort_key(tl.load(pre_row + cols, mask=cmask, other=0.0))
                match = cmask & ((key >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS)))
                digit = tl.where(match, (key >> shift) & (RADIX_DIGITS - 1), RADIX_DIGITS)
                counts += tl.histogram(digit.to(tl.int32), RADIX_BINS).to(tl.int32)
            counts = tl.where(digit_bins, counts, 0)
            # above[b] = matches with a larger digit than b
            above = tl.sum(tl.where(bins[None, :] > bins[:, None], counts[None, :], 0), axis=1)
            chosen = (above < need) & (above + counts >= need) & digit_bins
            digit_k = tl.max(tl.where(chosen, bins, -1), axis=0)
            need = need - tl.sum(tl.where(bins == digit_k, above, 0), axis=0)
            prefix = prefix | (digit_k.to(tl.int64) << shift)
        # prefix is now the key t of the k-th largest value: every key > t is selected,
        # and the first `need` keys == t (lowest ids first)
        n_sel = tl.zeros([], dtype=tl.int32)
        ties_seen = tl.zeros([], dtype=tl.int32)
        last_tie = tl.zeros([], dtype=tl.int32) - 1
        idx_row = idx_ptr + row.to(tl.int64) * k
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            cmask = cols < F
            key = _sort_key(tl.load(pre_row + cols, mask=cmask, other=0.0))
            tie = cmask & (key == prefix)
            tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
            take = (cmask & (key > prefix)) | (tie & (tie_rank < need))
            pos = n_sel + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(idx_row + pos, cols, mask=take)
            n_sel += tl.sum(take.to(tl.int32), axis=0)
            ties_seen += tl.sum(tie.to(tl.int32), axis=0)
            last_tie = tl.maximum(last_tie, tl.max(tl.where(tie & (tie_rank < need), cols, -1), axis=0))
        tl.store(sel_ptr + row.to(tl.int64) * 2, prefix)
        tl.store(sel_ptr + row.to(tl.int64) * 2 + 1, last_tie.to(tl.int64))


@triton.jit(do_not_specialize=["n_slots", "n_k", "k"])
def sae_topk_decode_kernel(h_ptr, pre_ptr, idx_ptr, sel_ptr, slot_ptr, gate_ptr, keep_ptr,
                           w_dec_ptr, b_dec_ptr, feat_ptr, code_ptr, val_ptr,
                           D, F, stride_h, n_slots, n_k, k, in_scale,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, K_PAD: tl.constexpr,
                           SOFT_BF16: tl.constexpr):
    """Grid (N, cdiv(D, BLOCK_D)): the TopK decode of one row's D chunk, written to h.
    Error kept: h = (x + sum_f (z'_f - z_f) W_dec[f]) / s over the edited features f;
    replaced: h = (b_dec + sum_sel z W_dec + sum_f (z'_f - z_f) W_dec[f]) / s."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    gate = tl.load(gate_ptr + row)
    if (gate != 0) & (slot >= 0) & (slot < n_slots):
        keep = tl.load(keep_ptr + slot)
        offs = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        pre_row = pre_ptr + row.to(tl.int64) * F
        t = tl.load(sel_ptr + row.to(tl.int64) * 2)
        last_tie = tl.load(sel_ptr + row.to(tl.int64) * 2 + 1)

        # the edited features' latents z_f (0 unless selected), then the edits in order
        j = tl.arange(0, K_PAD)
        feats = tl.load(feat_ptr + slot * n_k + j, mask=j < n_k, other=-1)
        valid = (feats >= 0) & (feats < F)
        f_safe = tl.where(valid, feats, 0)
        pre_f = tl.load(pre_row + f_safe, mask=valid, other=0.0)
        key_f = _sort_key(pre_f)
        selected = valid & ((key_f > t) | ((key_f == t) & (f_safe <= last_tie)))
        z0 = tl.where(selected, tl.maximum(pre_f, 0.0), 0.0)
        zc = z0
        for e in range(n_k):
            fe = tl.load(feat_ptr + slot * n_k + e)
            ce = tl.load(code_ptr + slot * n_k + e)
            ve = tl.load(val_ptr + (slot * n_k + e) * 2)
            he = tl.load(val_ptr + (slot * n_k + e) * 2 + 1)
            cur = tl.sum(tl.where(j == e, zc, 0.0), axis=0)
            zc = tl.where((feats == fe) & (fe >= 0), _edit_op(cur, ce, ve, he), zc)
        # a feature listed twice holds its final value in every entry: count it once
        earlier_same = (feats[:, None] == feats[None, :]) & (j[None, :] < j[:, None])
        first = valid & (tl.max(earlier_same.to(tl.int32), axis=1) == 0)
        dz = tl.where(first, zc - z0, 0.0)
        w = tl.load(w_dec_ptr + f_safe.to(tl.int64)[:, None] * D + offs[None, :],
                    mask=first[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.sum(dz[:, None] * w, axis=0)

        h_row = h_ptr + row.to(tl.int64) * stride_h
        if keep != 0:
            out = tl.load(h_row + offs, mask=dmask, other=0.0).to(tl.float32) * in_scale + acc
        else:
            acc += tl.load(b_dec_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
            idx_row = idx_ptr + row.to(tl.int64) * k
            for s0 in range(0, k, BLOCK_S):
                si = s0 + tl.arange(0, BLOCK_S)
                smask = si < k
                fi = tl.load(idx_row + si, mask=smask, other=0)
                zi = tl.maximum(tl.load(pre_row + fi, mask=smask, other=0.0), 0.0)
                wi = tl.load(w_dec_ptr + fi.to(tl.int64)[:, None] * D + offs[None, :],
                             mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(zi[:, None] * wi, axis=0)
            out = acc
        tl.store(h_row + offs, _round(tl.math.div_rn(out, in_scale), h_ptr.dtype.element_ty, SOFT_BF16),
                 mask=dmask)
