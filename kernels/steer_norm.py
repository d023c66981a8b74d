"""Fused steer+norm in Triton: edit a residual-stream row in place, then normalise it.

The math is the slot-table contract of `fasteer.ops.layout` (the reference backend
defines it); this module knows nothing of models.

Why it is written this way
--------------------------
* One program per row, the whole row held in registers (``BLOCK_D`` = next power of
  two >= D). A row is read from HBM once; every dot product an edit needs (clamp,
  ablate, dynamic scale, feature encoder column, condition, norm preservation) is a
  register reduction, and the bank vectors it reads are small and shared by all rows (L2).
  Keeping the row on chip is what makes the edits free next to the norm's own read
  and write. Rows up to 65536 wide fit this scheme; the launcher picks more warps
  for wider rows (the compiler spills to local memory past what registers hold,
  which stays correct).
* The edit list is data, not code: the slot's edit count ``n_edits`` and each code
  word are runtime values, read from ``meta`` and dispatched with scalar branches
  inside a runtime loop. Changing α, a vector, an edit kind or the per-row slots
  therefore never recompiles the kernel nor invalidates a captured CUDA graph.
  Only the norm's shape (kind, weight/bias presence, rounding order) and whether the
  tables are empty are compile-time, because those are fixed per carrier.
* Conditions are evaluated on the incoming row. Instead of keeping a second copy of
  the row in registers, the incoming row is re-read from ``h`` (still unmodified: the
  edited row is written once, at the end), which costs an L1/L2 hit only for edits
  that carry a condition.
* A run of JOINT feature edits (one FeatureEdit on several features) takes its dot
  products on one copy of the row, kept in registers next to the row itself (``x_read``):
  every feature sees the same h, as the full SAE would.
* ``HAS_ADDEND`` (compile-time) is the add-first path of ``add_steer_norm_``: the row
  becomes round(h + addend) -- the model's residual add -- before anything else reads
  it (conditions included, which then re-read both rows and add them again), and every
  row is stored, edited or not. It is the same kernel with one more load, not a copy.
* Rows that are not edited (gate 0, slot -1 or >= S) are never stored to (without an
  addend), so they stay bitwise unchanged and cost no write bandwidth. Edited rows are
  rounded to h's dtype before the norm reads them, exactly as the reference does, so the
  norm of an edited row equals the norm a separate kernel would compute from the stored
  row.
* Everything accumulates in float32; loads and stores are in h's dtype, contiguous
  along D, so the compiler emits 16-byte vector accesses when D and the row stride
  are multiples of 16 elements (Triton specialises on that divisibility).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Mirrors of fasteer.ops.layout, as compile-time constants (kernels import nothing
# from the package so that they stay model- and dispatch-agnostic; a test checks the
# values). FEAT_CLAMP, ACT_LINEAR and COND_PROJ are the fall-through branches.
KIND_NONE: tl.constexpr = tl.constexpr(0)
KIND_ADD: tl.constexpr = tl.constexpr(1)
KIND_CLAMP: tl.constexpr = tl.constexpr(2)
KIND_ABLATE: tl.constexpr = tl.constexpr(3)
KIND_SCALE: tl.constexpr = tl.constexpr(4)
KIND_FEATURE: tl.constexpr = tl.constexpr(5)
KIND_DYN_SCALE: tl.constexpr = tl.constexpr(6)

FEAT_ADD: tl.constexpr = tl.constexpr(0)
FEAT_SET: tl.constexpr = tl.constexpr(1)
FEAT_SCALE: tl.constexpr = tl.constexpr(2)

ACT_RELU: tl.constexpr = tl.constexpr(0)
ACT_JUMPRELU: tl.constexpr = tl.constexpr(1)

COND_NONE: tl.constexpr = tl.constexpr(0)
COND_COSINE: tl.constexpr = tl.constexpr(1)

PRESERVE_NORM: tl.constexpr = tl.constexpr(1 << 24)
JOINT: tl.constexpr = tl.constexpr(1 << 25)

NORM_NONE: tl.constexpr = tl.constexpr(0)
NORM_RMS: tl.constexpr = tl.constexpr(1)
NORM_LAYER: tl.constexpr = tl.constexpr(2)

META_WIDTH: tl.constexpr = tl.constexpr(4)
PARAM_WIDTH: tl.constexpr = tl.constexpr(8)

# Widest row the register-resident scheme accepts (see the module docstring).
MAX_BLOCK_D = 65536


@triton.jit
def _round(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even (what torch's ``.to`` does).

    Triton's interpreter truncates float32 -> bfloat16 (its ``.to`` drops the low bits),
    so on that path the rounding is done on the bits; compiled code uses the hardware
    conversion, which already rounds to nearest even. Same result for finite values.
    """
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _load_vector(bank_ptr, index, D, offs, dmask):
    """Bank row ``index`` as float32 (int64 offsets: V * D may exceed 2**31)."""
    return tl.load(bank_ptr + index.to(tl.int64) * D + offs, mask=dmask, other=0.0)


@triton.jit
def _incoming_row(h_row, add_row, offs, dmask, HAS_ADDEND: tl.constexpr,
                  SOFT_BF16: tl.constexpr):
    """The row as it enters the edits, float32: h (unmodified until the row's store), or
    with an addend round(h + addend), the model's residual add in h's dtype."""
    x = tl.load(h_row + offs, mask=dmask, other=0.0).to(tl.float32)
    if HAS_ADDEND:
        added = x + tl.load(add_row + offs, mask=dmask, other=0.0).to(tl.float32)
        x = _round(added, h_row.dtype.element_ty, SOFT_BF16).to(tl.float32)
    return x


@triton.jit
def _condition_passes(h_row, add_row, meta_e, params_e, cond, bank_ptr, D, offs, dmask,
                      HAS_ADDEND: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The edit's condition, evaluated on the incoming row (re-read from h, unmodified,
    and the addend)."""
    c = _load_vector(bank_ptr, tl.load(meta_e + 3), D, offs, dmask)
    x_in = _incoming_row(h_row, add_row, offs, dmask, HAS_ADDEND, SOFT_BF16)
    proj = tl.sum(x_in * c, axis=0)
    thresh = tl.load(params_e + 4)
    bias = tl.load(params_e + 5)
    denom = tl.sqrt(tl.sum(x_in * x_in, axis=0)) * tl.sqrt(tl.sum(c * c, axis=0))
    cosine = tl.where(denom > 0.0, proj / tl.where(denom > 0.0, denom, 1.0), 0.0)
    return tl.where(cond == COND_COSINE, cosine >= thresh, proj + bias >= thresh)


@triton.jit
def _apply_edit(x, x_read, kind, code, a, meta_e, params_e, bank_ptr, D, offs, dmask):
    """One edit of the layout applied to the float32 row ``x``; returns the new row.
    Its dot product is taken on ``x_read`` (``x``, or the row a JOINT run reads)."""
    if kind == KIND_SCALE:
        x_new = a * x
    elif kind == KIND_ADD:
        u = _load_vector(bank_ptr, tl.load(meta_e + 1), D, offs, dmask)
        x_new = x + a * u
    else:
        u = _load_vector(bank_ptr, tl.load(meta_e + 1), D, offs, dmask)
        hu = tl.sum(x_read * u, axis=0)
        if kind == KIND_CLAMP:
            x_new = x + (a - hu) * u
        elif kind == KIND_ABLATE:
            x_new = x - hu * u
        elif kind == KIND_DYN_SCALE:
            # (p0 + p1 * h.u) * h: the scale is a linear function of the row (DynScalar)
            x_new = (a + tl.load(params_e + 1) * hu) * x
        elif kind == KIND_FEATURE:
            pre = hu + a
            threshold = tl.load(params_e + 1)
            value = tl.load(params_e + 2)
            upper = tl.load(params_e + 3)
            act = (code >> 12) & 0xF
            z = tl.where(act == ACT_JUMPRELU, tl.where(pre > threshold, pre, 0.0),
                         tl.where(act == ACT_RELU, tl.maximum(pre, 0.0), pre))
            op = (code >> 8) & 0xF
            z_new = tl.where(op == FEAT_ADD, z + value,
                             tl.where(op == FEAT_SET, value,
                                      tl.where(op == FEAT_SCALE, z * value,
                                               tl.minimum(tl.maximum(z, value), upper))))
            w = _load_vector(bank_ptr, tl.load(meta_e + 2), D, offs, dmask)
            x_new = x + (z_new - z) * w
        else:
            x_new = x
    return x_new


@triton.jit
def _apply_edits(x, h_row, add_row, slot, n_edits, meta_ptr, params_ptr, bank_ptr, D, offs,
                 dmask, HAS_ADDEND: tl.constexpr, SOFT_BF16: tl.constexpr):
    """All edits of ``slot`` in order on the float32 row ``x``."""
    # a while loop rather than range(n_edits): same code once compiled (a runtime-bound
    # loop), and Triton 3.6's interpreter cannot range() over a runtime scalar
    e = n_edits * 0
    x_read = x  # the row edit e reads: x, or the previous edit's read row if JOINT
    while e < n_edits:
        entry = slot * n_edits + e
        meta_e = meta_ptr + entry * META_WIDTH
        params_e = params_ptr + entry * PARAM_WIDTH
        code = tl.load(meta_e)
        if (code & JOINT) == 0:
            x_read = x
        kind = code & 0xFF
        cond = (code >> 16) & 0xF
        run = kind != KIND_NONE
        if run & (cond != COND_NONE):
            run = run & _condition_passes(h_row, add_row, meta_e, params_e, cond, bank_ptr, D,
                                          offs, dmask, HAS_ADDEND, SOFT_BF16)
        if run:
            a = tl.load(params_e)
            preserve = (code & PRESERVE_NORM) != 0
            before = a * 0.0
            if preserve:
                before = tl.sqrt(tl.sum(x * x, axis=0))
            x_new = _apply_edit(x, x_read, kind, code, a, meta_e, params_e, bank_ptr, D, offs,
                                dmask)
            if preserve:
                after = tl.sqrt(tl.sum(x_new * x_new, axis=0))
                x_new = tl.where(after > 0.0, x_new * (before / tl.where(after > 0.0, after, 1.0)),
                                 x_new)
            x = x_new
        e += 1
    return x


# Table sizes change as steering is set: never specialise on them (Triton would
# otherwise recompile when a count becomes 1).
@triton.jit(do_not_specialize=["n_slots", "n_edits"])
def steer_norm_kernel(h_ptr, out_ptr, slot_ptr, gate_ptr, meta_ptr, params_ptr, bank_ptr,
                      weight_ptr, bias_ptr, add_ptr,
                      D, stride_h, stride_out, stride_add, n_slots, n_edits, eps, weight_offset,
                      BLOCK_D: tl.constexpr, NORM_KIND: tl.constexpr, HAS_EDITS: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CAST_BEFORE_WEIGHT: tl.constexpr, SOFT_BF16: tl.constexpr,
                      HAS_ADDEND: tl.constexpr):
    """Grid: (N,). Program ``row`` (with HAS_ADDEND: first sets h[row] = round(h[row] +
    add[row])) edits h[row] in place (if its slot and gate say so) and, unless NORM_KIND is
    NORM_NONE, writes norm(h[row]) into out[row]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    dtype = h_ptr.dtype.element_ty
    h_row = h_ptr + row * stride_h
    add_row = add_ptr + row * stride_add
    x = _incoming_row(h_row, add_row, offs, dmask, HAS_ADDEND, SOFT_BF16)

    if HAS_EDITS:
        slot = tl.load(slot_ptr + row)
        gate = tl.load(gate_ptr + row)
        if (gate != 0) & (slot >= 0) & (slot < n_slots):
            x = _apply_edits(x, h_row, add_row, slot, n_edits, meta_ptr, params_ptr, bank_ptr,
                             D, offs, dmask, HAS_ADDEND, SOFT_BF16)
            x_rounded = _round(x, dtype, SOFT_BF16)
            if not HAS_ADDEND:
                tl.store(h_row + offs, x_rounded, mask=dmask)
            # the norm reads the row as stored, like a separate norm kernel would
            x = x_rounded.to(tl.float32)
    if HAS_ADDEND:
        # every row, edited or not: x holds values of h's dtype, so this is exact
        tl.store(h_row + offs, x.to(dtype), mask=dmask)

    if NORM_KIND != NORM_NONE:
        if NORM_KIND == NORM_RMS:
            variance = tl.sum(x * x, axis=0) / D
            y = x * tl.rsqrt(variance + eps)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + offs, mask=dmask, other=0.0).to(tl.float32) + weight_offset
                if CAST_BEFORE_WEIGHT:
                    y = w * _round(y, dtype, SOFT_BF16).to(tl.float32)
                else:
                    y = y * w
        else:
            mean = tl.sum(x, axis=0) / D
            centered = tl.where(dmask, x - mean, 0.0)
            variance = tl.sum(centered * centered, axis=0) / D
            y = centered * tl.rsqrt(variance + eps)
            if HAS_WEIGHT:
                y = y * tl.load(weight_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, _round(y, dtype, SOFT_BF16), mask=dmask)
