"""Full SAE replace at a site: encode -> latent edits -> decode, with or without the
SAE's error term. Validation, `torch.library` registration and dispatch.

This is the path for what the sparse `FEATURE` edit of steer+norm cannot do exactly:
TopK SAEs (whether a feature is active depends on all the others) and edits without
the error term (h replaced by the SAE's reconstruction). The math is written out in
`fasteer.ops.reference.sae_replace`. Per-row slots as in steer+norm: slot s gives a
row its edit list (edit_feat/edit_code/edit_val [S, K]) and whether to keep the
error (keep_error [S]).
"""
from __future__ import annotations

import math

import torch

from . import dispatch
from . import layout as L
from .reference.sae_replace import sae_replace as reference_sae_replace

_lib = torch.library.Library("fasteer", "FRAGMENT")
_lib.define(
    "sae_replace_(Tensor(a!) h, Tensor slot, Tensor gate, Tensor w_enc, Tensor b_enc, "
    "Tensor w_dec, Tensor b_dec, Tensor threshold, Tensor edit_feat, Tensor edit_code, "
    "Tensor edit_val, Tensor keep_error, int activation, int k, float in_scale, "
    "bool apply_b_dec_to_input, str backend) -> ()"
)


def implementation(backend: str, device_type: str, n_rows: int) -> str:
    """Which implementation runs the full-SAE op: 'reference', 'cpu' or 'triton'.

    There is no hand-written CUDA kernel for this GEMM-bound op: Triton serves CUDA
    tensors. So where dispatch picks 'cuda' (decode-size rows), Triton runs it, and
    without Triton installed 'auto' falls back to the reference while an explicit
    'cuda' is an error naming the fix."""
    name = dispatch.resolve(backend, device_type, n_rows)
    if name != "cuda":
        return name
    if dispatch._import("triton")[0] is not None:
        return "triton"
    if backend == "auto":
        return "reference"
    raise RuntimeError("backend 'cuda': the full-SAE op runs on Triton for CUDA tensors and "
                       "triton is not installed (pip install 'fasteer[triton]', or use "
                       "backend='reference')")


def _run(h2, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
         keep_error, activation, k, in_scale, apply_b_dec_to_input, backend):
    name = implementation(backend, h2.device.type, h2.shape[0])
    args = (h2, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
            keep_error, activation, k, in_scale, apply_b_dec_to_input)
    if name == "reference":
        h2.copy_(reference_sae_replace(*args))
    elif name == "cpu":
        from .cpu.sae_replace import sae_replace_cpu
        sae_replace_cpu(*args)
    elif name == "triton":
        from .triton.sae_replace import sae_replace_triton
        sae_replace_triton(*args)
    else:
        raise RuntimeError(f"backend {name!r} has no sae_replace implementation")


def _impl(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
          keep_error, activation, k, in_scale, apply_b_dec_to_input, backend):
    """The registered op: every argument's layout checked, values trusted."""
    _check_layout(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                  edit_val, keep_error, activation, k, in_scale)
    _sae_run(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
             keep_error, activation, k, in_scale, apply_b_dec_to_input, backend)


def _sae_run(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
             keep_error, activation, k, in_scale, apply_b_dec_to_input, backend):
    _run(h.view(-1, h.shape[-1]), slot.view(-1), gate.view(-1), w_enc, b_enc, w_dec, b_dec,
         threshold, edit_feat, edit_code, edit_val, keep_error, activation, k, in_scale,
         apply_b_dec_to_input, backend)


for _key in ("CPU", "CUDA"):
    _lib.impl("sae_replace_", _impl, _key)


@torch.library.register_fake("fasteer::sae_replace_")
def _fake(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
          keep_error, activation, k, in_scale, apply_b_dec_to_input, backend):
    return None


def _check(name, t, dtypes=None, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of h), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_finite_once(name: str, t: torch.Tensor) -> None:
    """SAE weights must be finite (an inf in W_dec writes inf / NaN into a finite h). Checked
    once per tensor and version: an in-place change of the weights is checked again."""
    stamp = (t._version, t.data_ptr())
    if getattr(t, "_fasteer_finite", None) == stamp:
        return
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    try:
        t._fasteer_finite = stamp
    except (AttributeError, RuntimeError):  # tensor subclasses without a __dict__
        pass


def _check_scale(in_scale) -> None:
    try:
        value = float(in_scale)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"in_scale: expected a finite nonzero number, got {in_scale!r}")


def validate(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
             keep_error, activation, k, in_scale=1.0):
    """The public entry point's full check: layout, then the values it reads."""
    _check_layout(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                  edit_val, keep_error, activation, k, in_scale)
    f = w_enc.shape[1]
    s = edit_feat.shape[0]
    for name, t in (("w_enc", w_enc), ("b_enc", b_enc), ("w_dec", w_dec), ("b_dec", b_dec)):
        _check_finite_once(name, t)
    if activation == L.ACT_JUMPRELU:
        _check_finite_once("threshold", threshold)
    if edit_feat.numel() and bool(((edit_feat < -1) | (edit_feat >= f)).any()):
        raise ValueError(f"edit_feat: feature ids must be -1 (none) or in 0..{f - 1}")
    if edit_code.numel() and bool(((edit_code < 0) | (edit_code > L.FEAT_CLAMP)).any()):
        raise ValueError("edit_code: expected FEAT_ADD, FEAT_SET, FEAT_SCALE or FEAT_CLAMP")
    if not bool(torch.isfinite(edit_val).all()):
        raise ValueError("edit_val: contains NaN or inf")
    if slot.numel() and bool(((slot < -1) | (slot >= s)).any()):
        raise ValueError(f"slot: indices must be in -1..{s - 1}")


def _check_layout(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                  edit_val, keep_error, activation, k, in_scale):
    """Types, shapes, dtypes, devices and contiguity of every argument, and the scalars: no
    tensor value is read (no host sync). Runs on every call."""
    _check("h", h, _FLOATS)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h: expected shape [..., D] with D >= 1, got {tuple(h.shape)}")
    _check_scale(in_scale)
    for name, t in (("w_enc", w_enc), ("b_enc", b_enc), ("w_dec", w_dec), ("b_dec", b_dec),
                    ("slot", slot), ("gate", gate), ("edit_feat", edit_feat),
                    ("edit_code", edit_code), ("edit_val", edit_val), ("keep_error", keep_error)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    d = h.shape[-1]
    n = h.numel() // max(d, 1)
    dev = h.device
    if w_enc.dim() != 2 or w_enc.shape[0] != d:
        raise ValueError(f"w_enc: expected shape [{d}, F] (D of h), got {tuple(w_enc.shape)}")
    f = w_enc.shape[1]
    _check("w_enc", w_enc, _FLOATS, device=dev)
    _check("b_enc", b_enc, _FLOATS, (f,), dev)
    _check("w_dec", w_dec, _FLOATS, (f, d), dev)
    _check("b_dec", b_dec, _FLOATS, (d,), dev)
    _check("slot", slot, (torch.int32,), device=dev)
    _check("gate", gate, (torch.uint8, torch.bool), device=dev)
    for name, t in (("slot", slot), ("gate", gate)):
        if t.numel() != n:
            raise ValueError(f"{name}: expected {n} entries (one per row of h), got {t.numel()}")
    if activation not in (L.ACT_RELU, L.ACT_JUMPRELU, L.ACT_LINEAR, L.ACT_TOPK):
        raise ValueError(f"activation: expected one of {sorted(L.ACTIVATIONS)}, got code {activation}")
    if activation == L.ACT_JUMPRELU:
        _check("threshold", threshold, _FLOATS, (f,), dev)
    if activation == L.ACT_TOPK and not 1 <= k <= f:
        raise ValueError(f"k: expected 1..{f} for a TopK SAE, got {k}")
    if edit_feat.dim() != 2:
        raise ValueError(f"edit_feat: expected [S, K], got {tuple(edit_feat.shape)}")
    s, kk = edit_feat.shape
    _check("edit_feat", edit_feat, (torch.int32,), device=dev)
    _check("edit_code", edit_code, (torch.int32,), (s, kk), dev)
    _check("edit_val", edit_val, (torch.float32,), (s, kk, 2), dev)
    _check("keep_error", keep_error, (torch.uint8, torch.bool), (s,), dev)


def sae_replace_(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                 edit_val, keep_error, *, activation: int, k: int = 0, in_scale: float = 1.0,
                 apply_b_dec_to_input: bool = True, backend: str | None = None) -> torch.Tensor:
    """Replace h [..., D] in place by the SAE's edited decode (see the module docstring).

    ``threshold`` is ignored unless activation is JumpReLU (pass an empty tensor);
    ``in_scale`` (finite, nonzero) multiplies h before encoding and divides the result.
    Every argument is checked first (TypeError / ValueError naming it, nothing written),
    the SAE weights for NaN / inf once per tensor version.
    """
    validate(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
             edit_val, keep_error, activation, k, in_scale)
    return _call(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                 edit_val, keep_error, activation, k, in_scale, apply_b_dec_to_input, backend)


def _sae_replace_fast_(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat,
                       edit_code, edit_val, keep_error, *, activation, k=0, in_scale=1.0,
                       apply_b_dec_to_input=True, backend=None):
    """The SAE carrier's entry point (not public API): for edit tables and weights checked
    when they were planned, so no tensor value is re-read per call (no host sync); every
    argument's layout and the scalars are still checked."""
    if not torch.compiler.is_compiling():
        _check_layout(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat,
                      edit_code, edit_val, keep_error, activation, k, in_scale)
    return _call(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                 edit_val, keep_error, activation, k, in_scale, apply_b_dec_to_input, backend)


def _call(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
          keep_error, activation, k, in_scale, apply_b_dec_to_input, backend):
    args = (h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code, edit_val,
            keep_error, int(activation), int(k), float(in_scale), bool(apply_b_dec_to_input),
            dispatch.requested_backend(backend))
    if torch.compiler.is_compiling():
        torch.ops.fasteer.sae_replace_(*args)
    else:
        _sae_run(*args)
    return h
