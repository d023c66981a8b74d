"""The fused steer+norm op: validation, `torch.library` registration and dispatch.

`steer_norm_` edits the residual stream h **in place** from the slot tables of
`fasteer.ops.layout` and writes norm(h) into ``out``; `steer_` only edits. These are
the ops a patched model runs at every carrier, so:

* the library op (`torch.ops.fasteer.steer_norm_`) is registered with define / impl /
  register_fake and declares its mutated arguments, so `torch.compile(fullgraph=True)`
  and CUDA graphs see one opaque call;
* the backend is resolved inside the op at run time ("auto" -> by device and row
  count), so a compiled graph does not bake in a Python-side choice;
* validation (shapes, dtypes, devices, table values) runs in the Python entry points,
  before any tensor is written; carriers whose tables were validated when they were
  set pass ``validate=False`` and skip it on the hot path.
"""
from __future__ import annotations

import functools

import torch

from . import dispatch
from . import layout as L
from .reference import add_steer_norm as reference_add_steer_norm
from .reference import steer_norm as reference_steer_norm

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lib = torch.library.Library("fasteer", "DEF")
_lib.define(
    "steer_norm_(Tensor(a!) h, Tensor(b!) out, Tensor slot, Tensor gate, Tensor meta, "
    "Tensor params, Tensor bank, Tensor? weight, Tensor? bias, int norm_kind, float eps, "
    "float weight_offset, bool cast_before_weight, str backend) -> ()"
)
_lib.define(
    "steer_(Tensor(a!) h, Tensor slot, Tensor gate, Tensor meta, Tensor params, Tensor bank, "
    "str backend) -> ()"
)


def _reference_impl(h2, out2, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                    weight_offset, cast_before_weight, addend=None):
    if addend is None:
        h_new, normed = reference_steer_norm(h2, slot, gate, meta, params, bank, weight, bias,
                                             norm_kind, eps, weight_offset, cast_before_weight)
    else:
        h_new, normed = reference_add_steer_norm(h2, addend, slot, gate, meta, params, bank,
                                                 weight, bias, norm_kind, eps, weight_offset,
                                                 cast_before_weight)
    h2.copy_(h_new)
    if out2 is not None:
        out2.copy_(normed)


@functools.lru_cache(maxsize=None)
def _backend_impl(name: str):
    """The steer+norm function of a backend (imported on first use). Each takes an
    optional last argument ``addend`` ([N, D] like h, or None): the add-first path of
    `fasteer.ops.add_steer_norm_`, run by the same kernels."""
    if name == "reference":
        return _reference_impl
    if name == "cpu":
        from .cpu.steer_norm import steer_norm_cpu
        return steer_norm_cpu
    if name == "triton":
        from .triton.steer_norm import steer_norm_triton
        return steer_norm_triton
    if name == "cuda":
        from .cuda.steer_norm import steer_norm_cuda
        return steer_norm_cuda
    raise RuntimeError(f"backend {name!r} has no steer_norm implementation")


def _run(h2, out2, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
         cast_before_weight, backend, addend2=None):
    """Run the op on [N, D] views with the resolved backend (out2 None for NORM_NONE;
    addend2, when given, is added to h2 first: `fasteer.ops.add_steer_norm_`)."""
    impl = _backend_impl(dispatch.resolve(backend, h2.device.type, h2.shape[0]))
    impl(h2, out2, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
         cast_before_weight, addend2)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.view(-1)


def _steer_norm_impl(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                     weight_offset, cast_before_weight, backend):
    _run(_rows(h), _rows(out), _flat(slot), _flat(gate), meta, params, bank, weight, bias,
         norm_kind, eps, weight_offset, cast_before_weight, backend)


def _steer_impl(h, slot, gate, meta, params, bank, backend):
    _run(_rows(h), None, _flat(slot), _flat(gate), meta, params, bank, None, None,
         L.NORM_NONE, 0.0, 0.0, True, backend)


for _key in ("CPU", "CUDA"):
    _lib.impl("steer_norm_", _steer_norm_impl, _key)
    _lib.impl("steer_", _steer_impl, _key)


@torch.library.register_fake("fasteer::steer_norm_")
def _steer_norm_fake(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                     weight_offset, cast_before_weight, backend):
    return None


@torch.library.register_fake("fasteer::steer_")
def _steer_fake(h, slot, gate, meta, params, bank, backend):
    return None


# --------------------------------------------------------------------------- validation

def _check_tensor(name: str, t, *, dtypes=None, dim=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of h), got {t.device}")


def validate_tables(meta: torch.Tensor, params: torch.Tensor, bank: torch.Tensor, hidden: int,
                    device: torch.device | None = None) -> None:
    """Check slot tables against the layout; raises before anything is written."""
    _check_tensor("meta", meta, dtypes=(torch.int32,), dim=3, device=device)
    _check_tensor("params", params, dtypes=(torch.float32,), dim=3, device=device)
    _check_tensor("bank", bank, dtypes=(torch.float32,), dim=2, device=device)
    if meta.shape[2] != L.META_WIDTH:
        raise ValueError(f"meta: expected shape [S, E, {L.META_WIDTH}], got {tuple(meta.shape)}")
    if tuple(params.shape) != (meta.shape[0], meta.shape[1], L.PARAM_WIDTH):
        raise ValueError(f"params: expected shape [{meta.shape[0]}, {meta.shape[1]}, {L.PARAM_WIDTH}] "
                         f"(matching meta), got {tuple(params.shape)}")
    if bank.shape[1] != hidden:
        raise ValueError(f"bank: expected [V, {hidden}] (D of h), got {tuple(bank.shape)}")
    for name, t in (("meta", meta), ("params", params), ("bank", bank)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if not bool(torch.isfinite(params).all()):
        raise ValueError("params: contains NaN or inf")
    if not bool(torch.isfinite(bank).all()):
        bad = torch.nonzero(~torch.isfinite(bank).all(-1)).flatten()[:5].tolist()
        raise ValueError(f"bank: rows {bad} contain NaN or inf")
    if meta.numel() == 0:
        return
    code = meta[..., L.M_CODE]
    kind = code & 0xFF
    if bool(((kind < 0) | (kind > L.FEATURE)).any()):
        raise ValueError(f"meta: edit kind out of range 0..{L.FEATURE}")
    n_bank = bank.shape[0]
    needs_u = (kind == L.ADD) | (kind == L.CLAMP) | (kind == L.ABLATE) | (kind == L.FEATURE)
    needs_w = kind == L.FEATURE
    needs_c = ((code >> 16) & 0xF) != L.COND_NONE
    if bool((((code >> 16) & 0xF) > L.COND_PROJ).any()):
        raise ValueError("meta: condition kind out of range")
    for col, need, what in ((L.M_U, needs_u, "u"), (L.M_W, needs_w, "w"), (L.M_C, needs_c, "c")):
        idx = meta[..., col]
        bad = need & ((idx < 0) | (idx >= n_bank))
        if bool(bad.any()):
            s, e = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"meta[{s}, {e}]: bank index {what}={int(idx[s, e])} out of range "
                             f"0..{n_bank - 1}")


def _validate_call(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind):
    _check_tensor("h", h, dtypes=_DTYPES)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h: expected shape [..., D] with D >= 1, got {tuple(h.shape)}")
    hidden = h.shape[-1]
    n_rows = h.numel() // hidden
    if h.stride(-1) != 1:
        raise ValueError("h: the last dimension must be contiguous (stride 1)")
    try:
        h.view(-1, hidden)
    except RuntimeError:
        raise ValueError(f"h: must be viewable as [N, {hidden}] (strides {h.stride()})") from None
    dev = h.device
    for name, t in (("slot", slot), ("gate", gate)):
        _check_tensor(name, t, device=dev)
        if t.numel() != n_rows:
            raise ValueError(f"{name}: expected {n_rows} entries (one per row of h), got {t.numel()}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if slot.dtype != torch.int32:
        raise TypeError(f"slot: expected torch.int32, got {slot.dtype}")
    if gate.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"gate: expected torch.uint8 or torch.bool, got {gate.dtype}")
    validate_tables(meta, params, bank, hidden, dev)
    if slot.numel() and bool(((slot < -1) | (slot >= meta.shape[0])).any()):
        bad = slot[(slot < -1) | (slot >= meta.shape[0])][0].item()
        raise ValueError(f"slot: index {bad} out of range -1..{meta.shape[0] - 1}")
    if norm_kind not in (L.NORM_NONE, L.NORM_RMS, L.NORM_LAYER):
        raise ValueError(f"norm_kind: expected NORM_NONE, NORM_RMS or NORM_LAYER, got {norm_kind}")
    if norm_kind == L.NORM_NONE:
        return
    _check_tensor("out", out, dtypes=(h.dtype,), device=dev)
    if tuple(out.shape) != tuple(h.shape):
        raise ValueError(f"out: expected shape {tuple(h.shape)} (that of h), got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out: the last dimension must be contiguous (stride 1)")
    try:
        out.view(-1, hidden)
    except RuntimeError:
        raise ValueError(f"out: must be viewable as [N, {hidden}]") from None
    if out.data_ptr() == h.data_ptr() and out.numel():
        raise ValueError("out: must not alias h")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(name, t, dtypes=(h.dtype,), dim=1, device=dev)
        if t.shape[0] != hidden:
            raise ValueError(f"{name}: expected shape [{hidden}] (D of h), got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if bias is not None and norm_kind != L.NORM_LAYER:
        raise ValueError("bias: only LayerNorm (NORM_LAYER) takes a bias")


# --------------------------------------------------------------------------- public API

def _eager() -> bool:
    """True outside torch.compile tracing: then the op's implementation is called
    directly, skipping the dispatcher round trip (~8 µs per call on the CPU), which
    matters at decode sizes where a carrier's whole work is a few µs. Under tracing the
    registered library op is used, so compiled graphs hold one opaque call."""
    return not torch.compiler.is_compiling()


def steer_norm_(h: torch.Tensor, out: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
                meta: torch.Tensor, params: torch.Tensor, bank: torch.Tensor,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                norm_kind: int = L.NORM_RMS, eps: float = 1e-6, weight_offset: float = 0.0,
                cast_before_weight: bool = True, backend: str | None = None,
                validate: bool = True) -> torch.Tensor:
    """Edit ``h`` [..., D] in place from the slot tables and write its norm into ``out``.

    Step by step, for every row x of h (see `fasteer.ops.layout` for the tables):
      1. if gate[row] == 0 or slot[row] is -1 / out of range: x is not touched;
      2. else the slot's edits apply in order, in float32 (conditions on the incoming x);
      3. the edited x is rounded to h's dtype and stored back into h;
      4. out[row] = norm(x): RMSNorm (``weight_offset`` 1 for Gemma's ``1 + w``) or
         LayerNorm (``weight``, ``bias``), as Hugging Face computes it.
    Returns ``out``.
    """
    if validate:
        _validate_call(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
        if norm_kind == L.NORM_NONE:
            raise ValueError("norm_kind: steer_norm_ needs a norm; use steer_ to edit only")
    if _eager():
        _steer_norm_impl(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                         weight_offset, cast_before_weight, dispatch.requested_backend(backend))
    else:
        torch.ops.fasteer.steer_norm_(h, out, slot, gate, meta, params, bank, weight, bias,
                                      int(norm_kind), float(eps), float(weight_offset),
                                      bool(cast_before_weight), dispatch.requested_backend(backend))
    return out


def steer_(h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, meta: torch.Tensor,
           params: torch.Tensor, bank: torch.Tensor, *, backend: str | None = None,
           validate: bool = True) -> torch.Tensor:
    """Edit ``h`` [..., D] in place from the slot tables (no norm). Returns ``h``."""
    if validate:
        _validate_call(h, None, slot, gate, meta, params, bank, None, None, L.NORM_NONE)
    if _eager():
        _steer_impl(h, slot, gate, meta, params, bank, dispatch.requested_backend(backend))
    else:
        torch.ops.fasteer.steer_(h, slot, gate, meta, params, bank, dispatch.requested_backend(backend))
    return h


def steer_norm(h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, meta: torch.Tensor,
               params: torch.Tensor, bank: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, norm_kind: int = L.NORM_RMS, eps: float = 1e-6,
               weight_offset: float = 0.0, cast_before_weight: bool = True,
               validate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out of place, with autograd (the `reference` math): returns (edited h, norm or None).

    Used by carriers when autograd is on (e.g. training steering scalars).
    """
    if validate:
        out_probe = None if norm_kind == L.NORM_NONE else torch.empty_like(h)
        _validate_call(h, out_probe, slot, gate, meta, params, bank, weight, bias, norm_kind)
    shape = h.shape
    h_new, out = reference_steer_norm(h.reshape(-1, shape[-1]), slot.reshape(-1), gate.reshape(-1),
                                      meta, params, bank, weight, bias, norm_kind, eps,
                                      weight_offset, cast_before_weight)
    return h_new.view(shape), (None if out is None else out.view(shape))
