"""Launcher of the Triton full-SAE replace (`fasteer.kernels.sae_fused`).

Called by `fasteer.ops.sae_replace._run` with h2 [N, D] and tables that were validated
(or whose validation the caller skipped on purpose), so it only maps arguments onto the
kernels (the why of the kernels is in their module docstring):

* ReLU / JumpReLU / linear, N <= FUSED_MAX_ROWS (decode): the fused pass,
  ``sae_dense_kernel`` (row tiles x F tiles) adding decoded parts into an fp32
  accumulator, then ``sae_finalize_kernel`` writing h.
* ReLU / JumpReLU / linear, more rows (prefill): the two-phase pass,
  ``sae_dense_kernel`` writing latent deltas and tile flags, then ``sae_decode_kernel``
  (row tiles x D chunks) writing h.
* TopK: ``sae_dense_kernel`` writes pre, ``sae_topk_select_kernel`` (one program per
  row) selects, ``sae_topk_decode_kernel`` (rows x D chunks) gathers decoder rows.
Tiles: BLOCK_M = 16/32/64 rows (tl.dot needs >= 16; decode-size batches pad to 16),
BLOCK_F chosen so that the grid holds about 4 programs per SM even for a single row
tile (this is what spreads the weight read over the whole GPU at decode size), D
looped in chunks so any D fits.

Scratch, allocated per call from torch's caching allocator (no host sync; inside CUDA
graph capture it comes from the graph's private pool, so replays reuse it):
    fused:     acc  fp32 [N, D], zeroed (N <= 16: at most 512 KiB at D = 8192)
    two-phase: lat  W_dec's dtype [R, F], flags int32 [R / BLOCK_M, F / BLOCK_F]
    TopK:      pre  fp32 [R, F], idx int32 [R, k], sel int64 [R, 2]
R is all N rows unless R * F would exceed 2**25 (128 MiB of fp32 pre, 64 MiB of bf16
latents); larger batches run in row chunks, each re-reading the weights. The chunk is
256 rows at F = 131072, about where the products turn compute-bound on an H100
(~300 flops per weight byte), so the re-reads cost little. Nothing else is allocated
and no device value is read on the host.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import layout as L
from . import kernels_module

_kernels = kernels_module("sae_fused")

_SCRATCH_ELEMENTS = 1 << 25     # elements of lat or pre per row chunk
_MAX_GRID_Y = 65535             # CUDA limit on grid axis 1 (the F tiles)
_PROGRAMS_PER_SM = 4
# Up to this many rows the dense path is the single fused pass (latents on chip, decode
# parts summed with atomics: L2 atomic bytes = N / BLOCK_F of the weight bytes, <= 12.5%
# here); above it the two-phase pass (the N x F latents written and read once through
# HBM in W_dec's dtype, no atomics).
FUSED_MAX_ROWS = 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dense_tiles(n_rows: int, hidden: int, n_feat: int, w_enc_dtype: torch.dtype,
                w_dec_dtype: torch.dtype, n_sm: int) -> dict:
    """Block sizes, warps and pipeline stages of ``sae_dense_kernel`` for a chunk of
    ``n_rows`` rows. Shared memory stays under 99 KiB (the sm_86/sm_89 limit; checked
    by the compile test), which also lets two programs share an A100/H100 SM."""
    block_m = 16 if n_rows <= 16 else 32 if n_rows <= 32 else 64
    # W tiles of 16 KiB per pipeline stage in bf16/fp16; fp32 weights take narrower
    # tiles and two stages instead of three (the 16-bit tiles in fp32 need 152 KiB)
    wide = w_enc_dtype != torch.float32 and w_dec_dtype != torch.float32
    want_f_tiles = max(1, _cdiv(_PROGRAMS_PER_SM * n_sm, _cdiv(n_rows, block_m)))
    # 16..128 features per program: below 16 tl.dot cannot run; above 128 the [BLOCK_M,
    # BLOCK_F] latent tile and its products stop fitting in registers at BLOCK_M = 64.
    block_f = min(128 if wide else 64, max(16, _pow2_floor(n_feat // want_f_tiles)))
    block_f = max(block_f, _pow2_ceil(_cdiv(n_feat, _MAX_GRID_Y)))   # only for d_sae in the millions
    block_f = min(block_f, max(16, _pow2_ceil(n_feat)))
    block_k = min(64 if w_enc_dtype != torch.float32 else 32, max(16, _pow2_ceil(hidden)))
    block_d = min(128 if block_m <= 32 and w_dec_dtype != torch.float32 else 64,
                  max(16, _pow2_ceil(hidden)))
    # sae_decode_kernel (two-phase path): a [BLOCK_M, BLOCK_D] accumulator per program;
    # narrower D chunks when one row tile would leave SMs idle
    decode_block_d = 64 if w_dec_dtype != torch.float32 else 32
    if _cdiv(n_rows, block_m) * _cdiv(hidden, decode_block_d) < 2 * n_sm:
        decode_block_d = 32
    decode_block_d = min(decode_block_d, max(16, _pow2_ceil(hidden)))
    return dict(BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=block_k, BLOCK_D=block_d,
                num_warps=4 if block_m * block_f <= 4096 else 8, num_stages=3 if wide else 2,
                DECODE_BLOCK_D=decode_block_d, decode_num_warps=4)


def _precision(weight: torch.Tensor, on_gpu: bool) -> str:
    # fp32 weights: three tf32 products give fp32-level results on tensor cores (the
    # interpreter ignores the setting). 16-bit operands: the setting is not used.
    if weight.dtype == torch.float32:
        return "tf32x3" if on_gpu else "ieee"
    return "tf32"


def sae_replace_triton(h2: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
                       w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                       b_dec: torch.Tensor, threshold: torch.Tensor, edit_feat: torch.Tensor,
                       edit_code: torch.Tensor, edit_val: torch.Tensor, keep_error: torch.Tensor,
                       activation: int, k: int, in_scale: float,
                       apply_b_dec_to_input: bool) -> None:
    """Replace the active rows of ``h2`` [N, D] in place (see the module docstring)."""
    n_rows, hidden = h2.shape
    n_slots, n_k = edit_feat.shape
    n_feat = w_enc.shape[1]
    if n_rows == 0 or n_slots == 0:
        return
    if activation == L.ACT_TOPK and not 1 <= k <= n_feat:
        raise ValueError(f"k: expected 1..{n_feat} for a TopK SAE, got {k}")
    on_gpu = h2.is_cuda
    n_sm = _sm_count(h2.device.index if h2.device.index is not None else torch.cuda.current_device()) \
        if on_gpu else 1
    device = h2.device
    # bool tensors are one byte as well: read them as uint8 (views, no copies)
    gate_u8 = gate.view(torch.uint8) if gate.dtype == torch.bool else gate
    keep_u8 = keep_error.view(torch.uint8) if keep_error.dtype == torch.bool else keep_error
    if activation == L.ACT_TOPK:
        mode, chunk = "topk", min(n_rows, max(1, _SCRATCH_ELEMENTS // n_feat))
    elif n_rows <= FUSED_MAX_ROWS:
        mode, chunk = "fused", n_rows
    else:
        mode, chunk = "two_phase", min(n_rows, max(1, _SCRATCH_ELEMENTS // n_feat))
    tiles = dense_tiles(chunk, hidden, n_feat, w_enc.dtype, w_dec.dtype, n_sm)
    block_m, block_f = tiles["BLOCK_M"], tiles["BLOCK_F"]
    if mode == "two_phase":  # whole row tiles per chunk
        chunk = min(n_rows, max(block_m, chunk // block_m * block_m))
    m_tiles, f_tiles = _cdiv(chunk, block_m), _cdiv(n_feat, block_f)

    if mode == "topk":
        out = torch.empty(chunk, n_feat, dtype=torch.float32, device=device)            # pre
        idx = torch.empty(chunk, k, dtype=torch.int32, device=device)
        sel = torch.empty(chunk, 2, dtype=torch.int64, device=device)
    elif mode == "fused":
        out = torch.zeros(chunk, hidden, dtype=torch.float32, device=device)            # acc
    else:
        out = torch.empty(chunk, n_feat, dtype=w_dec.dtype, device=device)              # lat
        flags = torch.empty(m_tiles, f_tiles, dtype=torch.int32, device=device)
    output = {"fused": _kernels.OUT_ACCUMULATE, "two_phase": _kernels.OUT_LATENT,
              "topk": _kernels.OUT_PRE}[mode].value
    # tables a kernel never reads (no edit columns, no JumpReLU) get a placeholder pointer
    feat = edit_feat if n_k else slot
    code = edit_code if n_k else slot
    val = edit_val if n_k else (out if out.dtype == torch.float32 else b_enc)
    theta = threshold if activation == L.ACT_JUMPRELU else b_enc
    dec_precision = _precision(w_dec, on_gpu)
    soft_bf16 = not on_gpu  # the interpreter's bf16 conversion truncates; its dot cannot do bf16

    # Triton launches on the current device's stream: make that h's device
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        for r0 in range(0, n_rows, chunk):
            h_c, slot_c, gate_c = h2[r0:r0 + chunk], slot[r0:r0 + chunk], gate_u8[r0:r0 + chunk]
            rows = h_c.shape[0]
            _kernels.sae_dense_kernel[(_cdiv(rows, block_m), f_tiles)](
                h_c, out, flags if mode == "two_phase" else slot_c, slot_c, gate_c, keep_u8,
                w_enc, b_enc, w_dec, b_dec, theta, feat, code, val,
                rows, hidden, n_feat, h_c.stride(0), n_slots, n_k, float(in_scale),
                ACTIVATION=int(activation), APPLY_B_DEC=bool(apply_b_dec_to_input), OUTPUT=output,
                BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=tiles["BLOCK_K"], BLOCK_D=tiles["BLOCK_D"],
                ENC_PRECISION=_precision(w_enc, on_gpu), DEC_PRECISION=dec_precision,
                SOFT_BF16=soft_bf16, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
            if mode == "fused":
                block_fin = min(1024, max(16, _pow2_ceil(hidden)))
                _kernels.sae_finalize_kernel[(rows, _cdiv(hidden, block_fin))](
                    h_c, out, slot_c, gate_c, keep_u8, b_dec, hidden, h_c.stride(0), n_slots,
                    float(in_scale), BLOCK_D=block_fin, SOFT_BF16=soft_bf16, num_warps=4)
            elif mode == "two_phase":
                block_d = tiles["DECODE_BLOCK_D"]
                _kernels.sae_decode_kernel[(_cdiv(rows, block_m), _cdiv(hidden, block_d))](
                    h_c, out, flags, slot_c, gate_c, keep_u8, w_dec, b_dec,
                    rows, hidden, n_feat, h_c.stride(0), n_slots, f_tiles, float(in_scale),
                    BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_D=block_d, DEC_PRECISION=dec_precision,
                    SOFT_BF16=soft_bf16, num_warps=tiles["decode_num_warps"],
                    num_stages=tiles["num_stages"])
            else:
                block_sel = min(1024, max(32, _pow2_ceil(n_feat)))
                _kernels.sae_topk_select_kernel[(rows,)](
                    out, idx, sel, slot_c, gate_c, n_feat, n_slots, int(k),
                    BLOCK_F=block_sel, num_warps=4)
                k_pad = max(2, _pow2_ceil(n_k))
                block_g = min(256, max(16, 4096 // k_pad), max(16, _pow2_ceil(hidden)))
                _kernels.sae_topk_decode_kernel[(rows, _cdiv(hidden, block_g))](
                    h_c, out, idx, sel, slot_c, gate_c, keep_u8, w_dec, b_dec, feat, code, val,
                    hidden, n_feat, h_c.stride(0), n_slots, n_k, int(k), float(in_scale),
                    BLOCK_D=block_g, BLOCK_S=16, K_PAD=k_pad, SOFT_BF16=soft_bf16, num_warps=4)
