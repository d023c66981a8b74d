"""Launch the C++ steer+norm (fasteer._C) on CPU tensors.

The extension takes raw pointers; this wrapper derives them, with the dtype code and
row strides, from tensors the caller has validated. Threads: torch's own setting.
"""
from __future__ import annotations

import torch

from .. import dispatch
from .. import layout as L

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_C = dispatch.cpu_module()  # this module is only imported once the cpu backend was chosen


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def steer_norm_cpu(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                   weight_offset, cast_before_weight, addend=None):
    """h, out: [N, D] (row strides allowed, unit inner stride); out None for NORM_NONE.
    ``addend`` (like h, or None): every row of h becomes round(h + addend) first
    (`fasteer.ops.add_steer_norm_`)."""
    n, d = h.shape
    if n == 0:
        return  # empty tensors may have no storage (data_ptr 0): nothing to do
    _C.steer_norm(
        h.data_ptr(), _ptr(out), n, d, h.stride(0), 0 if out is None else out.stride(0),
        DTYPE_CODES[h.dtype], slot.data_ptr(), gate.data_ptr(), meta.data_ptr(),
        params.data_ptr(), bank.data_ptr(), meta.shape[0], meta.shape[1], bank.shape[0],
        _ptr(weight), _ptr(bias), L.NORM_NONE if out is None else norm_kind, eps,
        weight_offset, cast_before_weight, _ptr(addend),
        0 if addend is None else addend.stride(0), torch.get_num_threads())
