"""Launch the CUDA steer+norm (fasteer._cuda) on CUDA tensors.

Called by `fasteer.ops.steer_norm._run` with [N, D] views that were validated (or whose
tables were validated when they were set), so it only maps tensors onto the kernel's
arguments: pointers, row strides, the dtype code, table sizes and the current stream of
h's device. It allocates nothing and never reads a device value on the host (no sync),
so it is safe inside CUDA-graph capture. Per call it costs a few attribute reads and one
pybind11 call; the stream comes from torch's raw-stream accessor (what Inductor's
generated code uses) rather than a `torch.cuda.Stream` object, which is slower to build.
"""
from __future__ import annotations

import functools

import torch

from .. import dispatch
from .. import layout as L

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _current_device() -> int:
    return torch.cuda.current_device()


def _raw_stream(device_index: int) -> int:
    """The current stream of `device_index` as an integer cudaStream_t."""
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get_raw is not None:
        return get_raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


@functools.lru_cache(maxsize=None)
def _limits() -> tuple[int, int]:
    lim = dispatch.cuda_module().limits()
    return int(lim["max_register_row"]), int(lim["max_loop_edits"])


def steer_norm_cuda(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                    weight_offset, cast_before_weight, addend=None):
    """h, out: [N, D] (row strides allowed, unit inner stride); out None for NORM_NONE.
    ``addend`` (like h, or None): every row of h becomes round(h + addend) first
    (`fasteer.ops.add_steer_norm_`)."""
    n, d = h.shape
    if n == 0:
        return
    n_slots, n_edits = meta.shape[0], meta.shape[1]
    max_row, max_edits = _limits()
    if d > max_row and n_edits > max_edits:
        raise ValueError(f"meta: rows wider than {max_row} support at most {max_edits} edits per "
                         f"slot on the cuda backend, got {n_edits}; use backend='reference'")
    if out is None:
        norm_kind = L.NORM_NONE
    index = h.device.index if h.device.index is not None else _current_device()
    args = (h.data_ptr(), _ptr(out), n, d, h.stride(0), 0 if out is None else out.stride(0),
            DTYPE_CODES[h.dtype], slot.data_ptr(), gate.data_ptr(), meta.data_ptr(),
            params.data_ptr(), bank.data_ptr(), n_slots, n_edits, bank.shape[0],
            _ptr(weight), _ptr(bias) if norm_kind == L.NORM_LAYER else 0, int(norm_kind),
            float(eps), float(weight_offset), bool(cast_before_weight), _ptr(addend),
            0 if addend is None else addend.stride(0), _raw_stream(index))
    module = dispatch.cuda_module()
    if index == _current_device():
        module.steer_norm(*args)
    else:
        # kernels launch on the current device: make it h's (host-side state, no sync)
        with torch.cuda.device(index):
            module.steer_norm(*args)
