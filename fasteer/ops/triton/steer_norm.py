"""Launcher of the Triton steer+norm kernel (`fasteer.kernels.steer_norm`).

Called by `fasteer.ops.steer_norm._run` with [N, D] views that were validated (or whose
tables were validated when they were set), so it only maps arguments onto the kernel:
one program per row, ``BLOCK_D`` the next power of two >= D, warps growing with the
row so each thread holds a few 16-byte vectors. It allocates nothing and never reads a
device value on the host (no sync), so it is safe inside CUDA-graph capture; absent
optional tensors are replaced by a placeholder pointer that the compile-time flags keep
the kernel from reading.
"""
from __future__ import annotations

import contextlib

import torch

from .. import layout as L
from . import kernels_module

_kernels = kernels_module("steer_norm")


def _num_warps(block_d: int) -> int:
    # ~512 elements per warp = 16 per thread (four 16-byte vectors in fp32, two in
    # bf16/fp16): enough bytes in flight per thread, few enough registers to hold the row
    # without spilling up to 16K (checked with ptxas). Capped at 16 warps below 32K so
    # the cross-warp reductions (one per dot product) stay cheap; 32 beyond, where the
    # compiler spills part of the row to local memory (correct, slower).
    if block_d >= 32768:
        return 32
    return max(1, min(16, block_d // 512))


def steer_norm_triton(h2: torch.Tensor, out2: torch.Tensor | None, slot: torch.Tensor,
                      gate: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                      bank: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      norm_kind: int, eps: float, weight_offset: float,
                      cast_before_weight: bool, addend: torch.Tensor | None = None) -> None:
    """Edit ``h2`` [N, D] in place; write norm into ``out2`` [N, D] (None for NORM_NONE).
    ``addend`` ([N, D] like h2, or None): h2 = round(h2 + addend) first, every row."""
    n_rows, hidden = h2.shape
    if n_rows == 0:
        return
    block_d = 1 << max(0, (hidden - 1).bit_length())
    if block_d > _kernels.MAX_BLOCK_D:
        raise ValueError(f"h: the triton backend handles D up to {_kernels.MAX_BLOCK_D}, got D={hidden}; "
                         "use backend='cuda' or 'reference'")
    n_slots, n_edits = int(meta.shape[0]), int(meta.shape[1])
    has_edits = n_slots > 0 and n_edits > 0
    if norm_kind == L.NORM_NONE:
        out2 = None
    elif out2 is None:
        raise ValueError("out: required unless norm_kind is NORM_NONE")
    # bool gates are one byte as well: read them as uint8 (a view, no copy)
    gate_bytes = gate.view(torch.uint8) if gate.dtype == torch.bool else gate
    placeholder = h2  # never read: the flags below disable every use of a missing tensor
    # Triton launches on the current device's stream: make that h's device (host-side
    # state only, no sync; nothing to do for CPU tensors under the interpreter)
    with torch.cuda.device(h2.device) if h2.is_cuda else contextlib.nullcontext():
        _kernels.steer_norm_kernel[(n_rows,)](
            h2, placeholder if out2 is None else out2, slot, gate_bytes,
            meta if has_edits else slot, params if has_edits else placeholder,
            bank if has_edits and bank.numel() else placeholder,
            placeholder if weight is None else weight, placeholder if bias is None else bias,
            placeholder if addend is None else addend,
            hidden, h2.stride(0), 0 if out2 is None else out2.stride(0),
            0 if addend is None else addend.stride(0), n_slots, n_edits,
            float(eps), float(weight_offset),
            BLOCK_D=block_d, NORM_KIND=int(norm_kind), HAS_EDITS=has_edits,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None and norm_kind == L.NORM_LAYER,
            CAST_BEFORE_WEIGHT=bool(cast_before_weight),
            SOFT_BF16=not h2.is_cuda,  # the interpreter's bf16 conversion truncates
            HAS_ADDEND=addend is not None,
            num_warps=_num_warps(block_d),
        )
