"""Reference add+steer+norm: the model's residual add, then the steer+norm of the sum.

Defined by composition, so it can only mean what `steer_norm` means on the summed row:

    h   <- round_to_dtype(h + x)        every row (the model's own residual add, as
                                        torch computes ``x + residual``: float32 sum,
                                        rounded once to h's dtype)
    h   <- the slot's edits on h        (conditions read this summed row)
    out <- norm(h)

Like `steer_norm`, branch-free PyTorch: traceable and differentiable.
"""
from __future__ import annotations

import torch

from .. import layout as L
from .steer_norm import steer_norm


def add_rows(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """round(h + x) in h's dtype, summed in float32 (what ``h + x`` does for 16-bit
    tensors, written out so that it does not depend on how a device evaluates it)."""
    return (h.float() + x.float()).to(h.dtype)


def add_steer_norm(h: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
                   meta: torch.Tensor, params: torch.Tensor, bank: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   norm_kind: int = L.NORM_RMS, eps: float = 1e-6, weight_offset: float = 0.0,
                   cast_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out of place, ``h`` and ``x`` [N, D]: returns (new h, norm of new h or None for
    NORM_NONE). Rows that are not edited come back as exactly round(h + x)."""
    return steer_norm(add_rows(h, x), slot, gate, meta, params, bank, weight, bias, norm_kind,
                      eps, weight_offset, cast_before_weight)
