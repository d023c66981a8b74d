"""`fasteer.ops`: the one place that dispatches to a backend.

Public ops:
    steer_norm_(h, out, slot, gate, meta, params, bank, weight, bias, norm_kind=...)
        edit h in place from slot tables, write norm(h) into out (fused carriers)
    steer_(h, slot, gate, meta, params, bank)
        edit h in place, no norm (hook carriers)
    steer_norm(...)
        out of place with autograd (reference math)
Backends: reference, cpu (fasteer._C), triton (fasteer.kernels), cuda (fasteer._cuda);
see `backend_status()` and `fasteer info`.
"""
from . import layout
from .dispatch import BACKENDS, backend_status
from .steer_norm import steer_, steer_norm, steer_norm_, validate_tables

__all__ = ["BACKENDS", "backend_status", "layout", "steer_", "steer_norm", "steer_norm_",
           "validate_tables"]
