"""Reference steer+norm: the slot-table math of `fasteer.ops.layout`, in plain PyTorch.

Written branch-free over rows (every edit form is computed for every row and the
right one selected with `torch.where`), so it has no data-dependent Python control
flow: it traces under `torch.compile(fullgraph=True)` and supports autograd. It is
slow by design; the fused backends are tested against it, and it is tested against
a float64 computation.
"""
from __future__ import annotations

import torch

from .. import layout as L


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def apply_edits(x: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
                meta: torch.Tensor, params: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit float32 rows ``x`` [N, D]; returns (edited rows, row-is-active mask)."""
    n_slots, n_edits = meta.shape[0], meta.shape[1]
    active = (gate != 0) & (slot >= 0) & (slot < n_slots)
    if n_slots == 0 or n_edits == 0 or x.shape[0] == 0:
        return x, active
    s = slot.long().clamp(0, n_slots - 1)
    row_meta = meta[s].long()            # [N, E, 4]
    row_params = params[s].float()       # [N, E, 8]
    n_bank = bank.shape[0]
    bank32 = bank.float()

    def gather(index: torch.Tensor) -> torch.Tensor:
        if n_bank == 0:
            return torch.zeros_like(x)
        return bank32[index.clamp(0, n_bank - 1)]

    x_in = x
    norm_in = torch.linalg.vector_norm(x_in, dim=-1)
    passes = []
    for e in range(n_edits):
        code = row_meta[:, e, L.M_CODE]
        cond = (code >> 16) & 0xF
        thresh = row_params[:, e, L.P_COND_THRESH]
        c = gather(row_meta[:, e, L.M_C])
        proj = _dot(x_in, c)
        denom = norm_in * torch.linalg.vector_norm(c, dim=-1)
        cosine = torch.where(denom > 0, proj / torch.where(denom > 0, denom, torch.ones_like(denom)),
                             torch.zeros_like(proj))
        ok = torch.where(cond == L.COND_COSINE, cosine >= thresh,
                         torch.where(cond == L.COND_PROJ, proj + row_params[:, e, L.P_COND_BIAS] >= thresh,
                                     torch.ones_like(active)))
        passes.append(ok)

    x_read = x  # the row edit e reads: x, or the previous edit's read row if JOINT
    for e in range(n_edits):
        code = row_meta[:, e, L.M_CODE]
        kind = code & 0xFF
        joint = ((code & L.JOINT) != 0).unsqueeze(-1)
        x_read = torch.where(joint, x_read, x)
        p = row_params[:, e]
        a = p[:, L.P_A:L.P_A + 1]
        u = gather(row_meta[:, e, L.M_U])
        w = gather(row_meta[:, e, L.M_W])
        hu = _dot(x_read, u).unsqueeze(-1)

        # feature edit: pre-activation, activation, op, decoder delta
        pre = hu + a
        act = (code >> 12) & 0xF
        thr = p[:, L.P_B:L.P_B + 1]
        z = torch.where((act == L.ACT_JUMPRELU).unsqueeze(-1),
                        torch.where(pre > thr, pre, torch.zeros_like(pre)),
                        torch.where((act == L.ACT_RELU).unsqueeze(-1), pre.clamp_min(0), pre))
        fop = ((code >> 8) & 0xF).unsqueeze(-1)
        val, hi = p[:, L.P_C:L.P_C + 1], p[:, L.P_D:L.P_D + 1]
        z_new = torch.where(fop == L.FEAT_ADD, z + val,
                            torch.where(fop == L.FEAT_SET, val.expand_as(z),
                                        torch.where(fop == L.FEAT_SCALE, z * val,
                                                    torch.minimum(torch.maximum(z, val), hi))))

        # dynamic scale (DynScalar): the factor is a linear function of the read row
        dyn = a + p[:, L.P_B:L.P_B + 1] * hu

        k = kind.unsqueeze(-1)
        edited = torch.where(k == L.ADD, x + a * u,
                 torch.where(k == L.CLAMP, x + (a - hu) * u,
                 torch.where(k == L.ABLATE, x - hu * u,
                 torch.where(k == L.SCALE, a * x,
                 torch.where(k == L.FEATURE, x + (z_new - z) * w,
                 torch.where(k == L.DYN_SCALE, dyn * x, x))))))

        preserve = ((code & L.PRESERVE_NORM) != 0)
        before = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        after = torch.linalg.vector_norm(edited, dim=-1, keepdim=True)
        safe_after = torch.where(after > 0, after, torch.ones_like(after))
        rescaled = torch.where(after > 0, edited * (before / safe_after), edited)
        edited = torch.where(preserve.unsqueeze(-1), rescaled, edited)

        apply = active & passes[e] & (kind != L.NONE)
        x = torch.where(apply.unsqueeze(-1), edited, x)
    return x, active


def normalize(x: torch.Tensor, norm_kind: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float, weight_offset: float, cast_before_weight: bool) -> torch.Tensor:
    """The norm of ``x`` ([N, D], model dtype), written as HF's own modules compute it."""
    dtype = x.dtype
    xf = x.float()
    if norm_kind == L.NORM_RMS:
        variance = xf.pow(2).mean(-1, keepdim=True)
        r = xf * torch.rsqrt(variance + eps)
        if weight is None:
            return r.to(dtype)
        if cast_before_weight:
            if weight_offset == 0.0 and weight.dtype == dtype:
                return weight * r.to(dtype)                      # LlamaRMSNorm, bit for bit
            return ((weight.float() + weight_offset) * r.to(dtype).float()).to(dtype)
        return (r * (weight.float() + weight_offset)).to(dtype)  # Gemma / OLMo-2 style
    if norm_kind == L.NORM_LAYER:
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        return torch.nn.functional.layer_norm(xf, (x.shape[-1],), w, b, eps).to(dtype)
    raise ValueError(f"norm_kind: expected NORM_RMS or NORM_LAYER, got {norm_kind}")


def steer_norm(h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, meta: torch.Tensor,
               params: torch.Tensor, bank: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, norm_kind: int = L.NORM_NONE, eps: float = 1e-6,
               weight_offset: float = 0.0, cast_before_weight: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out of place: returns (edited h, norm of edited h or None for NORM_NONE).

    ``h`` is [N, D]. Rows that are not edited come back bitwise equal to ``h``.
    """
    x, active = apply_edits(h.float(), slot, gate, meta, params, bank)
    h_new = torch.where(active.unsqueeze(-1), x.to(h.dtype), h)
    if norm_kind == L.NORM_NONE:
        return h_new, None
    return h_new, normalize(h_new, norm_kind, weight, bias, eps, weight_offset, cast_before_weight)
