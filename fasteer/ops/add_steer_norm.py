"""The fused add+steer+norm op: validation, `torch.library` registration and dispatch.

vLLM's decoder layers call their norms as a fused residual add + RMSNorm,
``norm(x, residual)``: ``residual <- x + residual; return norm(residual), residual``.
`add_steer_norm_` is that call with fasteer's edits in the middle, one pass per row:

    h   <- round_to_dtype(h + x)     every row, edited or not (the model's own add)
    h   <- the slot's edits on h     exactly `steer_norm_`'s (conditions read this sum)
    out <- norm(h)                   exactly `steer_norm_`'s

It is not a second kernel: every backend runs its steer+norm kernel with the addend as
one more (optional) input, so the two ops cannot drift apart. Registered like
`steer_norm_` (define / impl / register_fake, mutated ``h`` and ``out`` declared) so that
`torch.compile(fullgraph=True)` and CUDA graphs see one opaque call, with the backend
resolved inside the op at run time.
"""
from __future__ import annotations

import torch

from . import dispatch
from . import layout as L
from .steer_norm import (_DTYPES, _check_layout, _check_tensor, _eager, _flat, _overlap, _rows,
                         _run, _validate_call)

_lib = torch.library.Library("fasteer", "FRAGMENT")
_lib.define(
    "add_steer_norm_(Tensor(a!) h, Tensor x, Tensor(b!) out, Tensor slot, Tensor gate, "
    "Tensor meta, Tensor params, Tensor bank, Tensor? weight, Tensor? bias, int norm_kind, "
    "float eps, float weight_offset, bool cast_before_weight, str backend) -> ()"
)


def _run_op(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
            weight_offset, cast_before_weight, backend):
    _run(_rows(h), _rows(out), _flat(slot), _flat(gate), meta, params, bank, weight, bias,
         norm_kind, eps, weight_offset, cast_before_weight, backend, _rows(x))


def _call(run, h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
          weight_offset, cast_before_weight, backend):
    """Eager: ``run`` directly (no dispatcher round trip); traced: the registered op."""
    if _eager():
        run(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
            weight_offset, cast_before_weight, backend)
    else:
        torch.ops.fasteer.add_steer_norm_(h, x, out, slot, gate, meta, params, bank, weight, bias,
                                          int(norm_kind), float(eps), float(weight_offset),
                                          bool(cast_before_weight), backend)
    return out


def _check_layout_add(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind):
    _check_layout(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    if norm_kind == L.NORM_NONE:
        raise ValueError("norm_kind: add_steer_norm_ needs a norm (NORM_RMS or NORM_LAYER)")
    _validate_addend(h, x, out)


def _impl(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
          cast_before_weight, backend):
    """The registered op (and the carriers' fast path): layout checked on every call,
    table values trusted (validated when the tables were built)."""
    _check_layout_add(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    _run_op(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
            weight_offset, cast_before_weight, backend)


for _key in ("CPU", "CUDA"):
    _lib.impl("add_steer_norm_", _impl, _key)


@torch.library.register_fake("fasteer::add_steer_norm_")
def _fake(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
          cast_before_weight, backend):
    return None


# --------------------------------------------------------------------------- validation

def _validate_addend(h: torch.Tensor, x, out: torch.Tensor) -> None:
    _check_tensor("x", x, dtypes=_DTYPES)
    if x.dtype != h.dtype:
        raise TypeError(f"x: expected dtype {h.dtype} (that of h), got {x.dtype}")
    if x.device != h.device:
        raise ValueError(f"x: expected device {h.device} (that of h), got {x.device}")
    if tuple(x.shape) != tuple(h.shape):
        raise ValueError(f"x: expected shape {tuple(h.shape)} (that of h), got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError("x: the last dimension must be contiguous (stride 1)")
    hidden = h.shape[-1]
    try:
        x.view(-1, hidden)
    except RuntimeError:
        raise ValueError(f"x: must be viewable as [N, {hidden}] (strides {x.stride()})") from None
    # x is only read: a stride-0 (expanded) x is fine
    if _overlap(x, h):
        raise ValueError("x: must not alias h (h is written in place)")
    if _overlap(out, h):
        raise ValueError("out: must not alias h")
    if _overlap(out, x):
        raise ValueError("out: must not alias x")


# --------------------------------------------------------------------------- public API

def add_steer_norm_(h: torch.Tensor, x: torch.Tensor, out: torch.Tensor, slot: torch.Tensor,
                    gate: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                    bank: torch.Tensor, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, *, norm_kind: int = L.NORM_RMS,
                    eps: float = 1e-6, weight_offset: float = 0.0,
                    cast_before_weight: bool = True,
                    backend: str | None = None) -> torch.Tensor:
    """Residual add, edits and norm in one pass: ``h`` [..., D] is the residual (updated in
    place), ``x`` the sublayer output to add (same shape, dtype and device), ``out`` the
    norm's output.

    For every row of h (see `fasteer.ops.layout` for the tables):
      1. h = round(h + x), in h's dtype (summed in float32) -- on every row, also those
         with slot -1 or gate 0: it is the model's own residual add;
      2. if the row's gate is 1 and its slot in range, the slot's edits apply to h as in
         `steer_norm_` (in float32, conditions on the summed row), rounded back into h;
      3. out[row] = norm(h): RMSNorm (``weight_offset`` 1 for Gemma's ``1 + w``) or
         LayerNorm (``weight``, ``bias``), as in `steer_norm_`.
    h, x and out must not overlap in memory. Returns ``out``.
    """
    backend = dispatch.requested_backend(backend)
    _validate_call(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    if norm_kind == L.NORM_NONE:
        raise ValueError("norm_kind: add_steer_norm_ needs a norm (NORM_RMS or NORM_LAYER)")
    _validate_addend(h, x, out)
    return _call(_run_op, h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                 weight_offset, cast_before_weight, backend)


def _add_steer_norm_fast_(h, x, out, slot, gate, meta, params, bank, weight=None, bias=None, *,
                          norm_kind=L.NORM_RMS, eps=1e-6, weight_offset=0.0,
                          cast_before_weight=True, backend=None):
    """The carriers' entry point, for tables validated when they were built
    (`fasteer.ops.steer_norm._steer_norm_fast_`): every argument's layout is checked, the
    table values and slot range are not re-read. Not public API."""
    return _call(_impl, h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                 weight_offset, cast_before_weight, dispatch.requested_backend(backend))
