"""`fasteer.ops`: the one place that dispatches to a backend.

Public ops:
    steer_norm_(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind=...)
        edit h in place from slot tables, write norm(h) into out (fused carriers)
    add_steer_norm_(h, x, out, slot, gate, meta, params, bank, weight, bias, norm_kind=...)
        h = h + x (a fused residual add, every row), then as steer_norm_ (vLLM-style norms)
    steer_(h, slot, gate, meta, params, bank)
        edit h in place, no norm (hook carriers)
    steer_norm(...)
        out of place with autograd (reference math)
    sae_replace_(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, ...)
        full SAE encode -> latent edits -> decode at a site, in place (TopK SAEs,
        edits without the error term)
Backends: reference, cpu (fasteer._C), triton (fasteer.kernels), cuda (fasteer._cuda);
see `backend_status()` and `fasteer info`.
"""
from . import layout
from .add_steer_norm import add_steer_norm_
from .dispatch import BACKENDS, backend_status
from .sae_replace import sae_replace_
from .steer_norm import steer_, steer_norm, steer_norm_, validate_tables
# the carriers' entry points, for tables validated when they were built (not public API)
from .add_steer_norm import _add_steer_norm_fast_  # noqa: F401
from .sae_replace import _sae_replace_fast_  # noqa: F401
from .steer_norm import _steer_fast_, _steer_norm_fast, _steer_norm_fast_  # noqa: F401

__all__ = ["BACKENDS", "add_steer_norm_", "backend_status", "layout", "sae_replace_", "steer_",
           "steer_norm", "steer_norm_", "validate_tables"]
