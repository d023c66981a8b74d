"""The fused steer+norm op: validation, `torch.library` registration and dispatch.

`steer_norm_` edits the residual stream h **in place** from the slot tables of
`fasteer.ops.layout` and writes norm(h) into ``out``; `steer_` only edits. These are
the ops a patched model runs at every carrier, so:

* the library op (`torch.ops.fasteer.steer_norm_`) is registered with define / impl /
  register_fake and declares its mutated arguments, so `torch.compile(fullgraph=True)`
  and CUDA graphs see one opaque call;
* the backend is resolved inside the op at run time ("auto" -> by device and row
  count), so a compiled graph does not bake in a Python-side choice;
* validation runs before any tensor is written, in two parts. The *layout* check
  (types, shapes, dtypes, devices, strides, aliasing: metadata only, no host sync, a
  few µs) runs on every call of every entry point, the registered library op included,
  so no call can hand a kernel a buffer smaller than it reads or writes. The *value*
  check (finite params and bank, edit kinds, bank indices, slot range) runs in the
  public entry points on every call, and for the carriers once, when their tables are
  built (`fasteer.plan.compile_plan` calls `validate_tables`): the carriers use the
  private ``_steer_norm_fast_`` / ``_steer_fast_`` entry points, which skip it. There
  is no public switch to skip validation. The C++ kernel also ignores (skips) an edit
  whose bank index or condition is out of range, so on CPU tensors no table values at
  all can make it read out of bounds.
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


def _steer_norm_run(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                    weight_offset, cast_before_weight, backend):
    _run(_rows(h), _rows(out), _flat(slot), _flat(gate), meta, params, bank, weight, bias,
         norm_kind, eps, weight_offset, cast_before_weight, backend)


def _steer_norm_impl(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                     weight_offset, cast_before_weight, backend):
    """The registered op (and the carriers' fast path): layout checked on every call,
    table values trusted (validated when the tables were built)."""
    _check_layout(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    if norm_kind == L.NORM_NONE:
        raise ValueError("norm_kind: steer_norm_ needs a norm; use steer_ to edit only")
    _steer_norm_run(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                    weight_offset, cast_before_weight, backend)


def _call_steer_norm(run, h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                     weight_offset, cast_before_weight, backend):
    """Eager: ``run`` directly (no dispatcher round trip); traced: the registered op."""
    if _eager():
        run(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
            cast_before_weight, backend)
    else:
        torch.ops.fasteer.steer_norm_(h, out, slot, gate, meta, params, bank, weight, bias,
                                      int(norm_kind), float(eps), float(weight_offset),
                                      bool(cast_before_weight), backend)
    return out


def _steer_run(h, slot, gate, meta, params, bank, backend):
    _run(_rows(h), None, _flat(slot), _flat(gate), meta, params, bank, None, None,
         L.NORM_NONE, 0.0, 0.0, True, backend)


def _steer_impl(h, slot, gate, meta, params, bank, backend):
    _check_layout(h, None, slot, gate, meta, params, bank, None, None, L.NORM_NONE)
    _steer_run(h, slot, gate, meta, params, bank, backend)


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


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements span (empty: an empty range)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors share an element? Exact for [N, D] row views with one row stride
    (e.g. the two halves of a [N, 2D] buffer do not overlap); otherwise by address range
    (conservative). The kernels read and write row by row, so any shared element would be
    read after it was overwritten, or written by two threads."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != \
            b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    if not (a0 < b1 and b0 < a1):
        return False
    ra, rb = _rows(a), _rows(b)
    es = a.element_size()
    if (ra.dim() == 2 and rb.dim() == 2 and ra.shape == rb.shape and es == b.element_size()
            and ra.stride() == rb.stride() and (b0 - a0) % es == 0):
        n, d = ra.shape
        step = ra.stride(0)
        delta = (b0 - a0) // es                  # b's row j starts at delta + j*step (in a's units)
        if n == 1 or step < d:
            return True
        # rows i of a: [i*step, i*step + d); rows j of b: [delta + j*step, ... + d).
        # They overlap iff |delta + k*step| < d for some k = j - i in -(n-1)..n-1.
        k0 = -delta // step
        return any(abs(delta + k * step) < d for k in (k0, k0 + 1) if -(n - 1) <= k <= n - 1)
    return True


def _check_rows(name: str, t: torch.Tensor, hidden: int, n_rows: int) -> None:
    """t is written row by row (h, out): unit inner stride, viewable as [N, D], no two rows
    sharing memory (a stride-0 or overlapping-row view would be written racily)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1)")
    try:
        rows = t.view(-1, hidden)
    except RuntimeError:
        raise ValueError(f"{name}: must be viewable as [N, {hidden}] (strides {t.stride()})") from None
    if n_rows > 1 and rows.stride(0) < hidden:
        raise ValueError(f"{name}: rows overlap in memory (row stride {rows.stride(0)} < D = "
                         f"{hidden}; an expanded / stride-0 tensor?); pass a tensor whose rows "
                         "are distinct, e.g. .contiguous()")


def _check_table_layout(meta, params, bank, hidden: int, device) -> None:
    """Types, shapes, contiguity and devices of the slot tables (no values read)."""
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


def _check_table_values(meta, params, bank) -> None:
    """Values of slot tables whose layout was checked (reads them: a host sync on CUDA)."""
    if not bool(torch.isfinite(params).all()):
        raise ValueError("params: contains NaN or inf")
    if not bool(torch.isfinite(bank).all()):
        bad = torch.nonzero(~torch.isfinite(bank).all(-1)).flatten()[:5].tolist()
        raise ValueError(f"bank: rows {bad} contain NaN or inf")
    if meta.numel() == 0:
        return
    code = meta[..., L.M_CODE]
    kind = code & 0xFF
    if bool(((kind < 0) | (kind > L.DYN_SCALE)).any()):
        raise ValueError(f"meta: edit kind out of range 0..{L.DYN_SCALE}")
    n_bank = bank.shape[0]
    needs_u = ((kind == L.ADD) | (kind == L.CLAMP) | (kind == L.ABLATE) | (kind == L.FEATURE)
               | (kind == L.DYN_SCALE))
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


def validate_tables(meta: torch.Tensor, params: torch.Tensor, bank: torch.Tensor, hidden: int,
                    device: torch.device | None = None) -> None:
    """Check slot tables against the layout (shapes and values); raises before anything
    is written. Tables are checked with this when they are built; the carriers then run
    the ops without re-reading the values on every call."""
    _check_table_layout(meta, params, bank, hidden, device)
    _check_table_values(meta, params, bank)


def _check_layout(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind) -> None:
    """Everything about a call that metadata alone decides: every buffer a kernel reads or
    writes has the size, dtype, device and strides it assumes, and written buffers do not
    overlap. Runs on every call (no host sync, safe in graph capture)."""
    _check_tensor("h", h, dtypes=_DTYPES)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h: expected shape [..., D] with D >= 1, got {tuple(h.shape)}")
    hidden = h.shape[-1]
    n_rows = h.numel() // hidden
    _check_rows("h", h, hidden, n_rows)
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
    _check_table_layout(meta, params, bank, hidden, dev)
    if norm_kind not in (L.NORM_NONE, L.NORM_RMS, L.NORM_LAYER):
        raise ValueError(f"norm_kind: expected NORM_NONE, NORM_RMS or NORM_LAYER, got {norm_kind}")
    if norm_kind == L.NORM_NONE:
        return
    _check_tensor("out", out, dtypes=(h.dtype,), device=dev)
    if tuple(out.shape) != tuple(h.shape):
        raise ValueError(f"out: expected shape {tuple(h.shape)} (that of h), got {tuple(out.shape)}")
    _check_rows("out", out, hidden, n_rows)
    if _overlap(out, h):
        raise ValueError("out: must not alias h (no element in common)")
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


def _validate_call(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind):
    """The public entry points' full check: the layout, then the table values and slots."""
    _check_layout(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    _check_table_values(meta, params, bank)
    if slot.numel() and bool(((slot < -1) | (slot >= meta.shape[0])).any()):
        bad = slot[(slot < -1) | (slot >= meta.shape[0])][0].item()
        raise ValueError(f"slot: index {bad} out of range -1..{meta.shape[0] - 1}")


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
                cast_before_weight: bool = True, backend: str | None = None) -> torch.Tensor:
    """Edit ``h`` [..., D] in place from the slot tables and write its norm into ``out``.

    Step by step, for every row x of h (see `fasteer.ops.layout` for the tables):
      1. if gate[row] == 0 or slot[row] is -1: x is not touched;
      2. else the slot's edits apply in order, in float32 (conditions on the incoming x);
      3. the edited x is rounded to h's dtype and stored back into h;
      4. out[row] = norm(x): RMSNorm (``weight_offset`` 1 for Gemma's ``1 + w``) or
         LayerNorm (``weight``, ``bias``), as Hugging Face computes it.
    Every argument is checked first (TypeError / ValueError naming it, nothing written):
    h and out must not overlap and their rows must be distinct (no stride-0 views).
    Returns ``out``.
    """
    if norm_kind == L.NORM_NONE:
        raise ValueError("norm_kind: steer_norm_ needs a norm; use steer_ to edit only")
    backend = dispatch.requested_backend(backend)
    _validate_call(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind)
    return _call_steer_norm(_steer_norm_run, h, out, slot, gate, meta, params, bank, weight,
                            bias, norm_kind, eps, weight_offset, cast_before_weight, backend)


def steer_(h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, meta: torch.Tensor,
           params: torch.Tensor, bank: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Edit ``h`` [..., D] in place from the slot tables (no norm). Returns ``h``."""
    backend = dispatch.requested_backend(backend)
    _validate_call(h, None, slot, gate, meta, params, bank, None, None, L.NORM_NONE)
    if _eager():
        _steer_run(h, slot, gate, meta, params, bank, backend)
    else:
        torch.ops.fasteer.steer_(h, slot, gate, meta, params, bank, backend)
    return h


def steer_norm(h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, meta: torch.Tensor,
               params: torch.Tensor, bank: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, norm_kind: int = L.NORM_RMS, eps: float = 1e-6,
               weight_offset: float = 0.0,
               cast_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out of place, with autograd (the `reference` math): returns (edited h, norm or None).

    Used by carriers when autograd is on (e.g. training steering scalars).
    """
    out_probe = None if norm_kind == L.NORM_NONE else torch.empty_like(h)
    _validate_call(h, out_probe, slot, gate, meta, params, bank, weight, bias, norm_kind)
    return _steer_norm_out_of_place(h, slot, gate, meta, params, bank, weight, bias, norm_kind,
                                    eps, weight_offset, cast_before_weight)


def _steer_norm_out_of_place(h, slot, gate, meta, params, bank, weight, bias, norm_kind, eps,
                             weight_offset, cast_before_weight):
    shape = h.shape
    h_new, out = reference_steer_norm(h.reshape(-1, shape[-1]), slot.reshape(-1), gate.reshape(-1),
                                      meta, params, bank, weight, bias, norm_kind, eps,
                                      weight_offset, cast_before_weight)
    return h_new.view(shape), (None if out is None else out.view(shape))


# ------------------------------------------------- the carriers' entry points (private)
#
# For tables checked with `validate_tables` when they were built (`fasteer.plan`): the
# table values and the slot range are not re-read on every call (that is a host sync on
# CUDA, and the carriers run at every layer of every forward). Everything else -- the
# layout of every argument -- is still checked. Not public API.

def _steer_norm_fast_(h, out, slot, gate, meta, params, bank, weight=None, bias=None, *,
                      norm_kind=L.NORM_RMS, eps=1e-6, weight_offset=0.0,
                      cast_before_weight=True, backend=None):
    return _call_steer_norm(_steer_norm_impl, h, out, slot, gate, meta, params, bank, weight,
                            bias, norm_kind, eps, weight_offset, cast_before_weight,
                            dispatch.requested_backend(backend))


def _steer_fast_(h, slot, gate, meta, params, bank, *, backend=None):
    backend = dispatch.requested_backend(backend)
    if _eager():
        _steer_impl(h, slot, gate, meta, params, bank, backend)
    else:
        torch.ops.fasteer.steer_(h, slot, gate, meta, params, bank, backend)
    return h


def _steer_norm_fast(h, slot, gate, meta, params, bank, weight=None, bias=None, *,
                     norm_kind=L.NORM_RMS, eps=1e-6, weight_offset=0.0, cast_before_weight=True):
    """`steer_norm` (out of place, autograd) for prevalidated tables."""
    if not torch.compiler.is_compiling():
        out_probe = None if norm_kind == L.NORM_NONE else torch.empty_like(h)
        _check_layout(h, out_probe, slot, gate, meta, params, bank, weight, bias, norm_kind)
    return _steer_norm_out_of_place(h, slot, gate, meta, params, bank, weight, bias, norm_kind,
                                    eps, weight_offset, cast_before_weight)
