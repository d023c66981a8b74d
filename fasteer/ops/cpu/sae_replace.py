"""Full SAE replace on CPU tensors.

The encode is a GEMM and nothing hand-written beats the BLAS torch already calls on a
CPU, so this backend uses it, and saves work where the math allows:

* only the rows that are steered are encoded;
* with the error term kept (the usual case) the decode is not a second GEMM but the sparse
  delta  x += sum_j (z'_j - z_j) * W_dec[f_j]  over the row's K edited features (every
  other latent is unchanged, so its decode cancels);
* and then, unless the SAE is TopK (where whether a latent is active depends on all of
  them), the encode is not a GEMM either: only the edited features' latents enter the
  result, and each is  act(x . W_enc[:, f] + b_enc[f]),  so K dot products replace the
  [R, D] x [D, F] product -- the same sparse math as the fused FEATURE edits.
"""
from __future__ import annotations

import torch

from .. import layout as L
from ..reference.sae_replace import edit_latents, encode


def _first_columns(feats: torch.Tensor) -> torch.Tensor:
    """For each row and edit column j, the first column j' <= j editing the same feature
    (a feature edited twice in a slot is one latent, edited in order)."""
    if feats.shape[-1] == 0:                                  # no edit columns (K = 0)
        return torch.zeros(feats.shape, dtype=torch.long, device=feats.device)
    same = feats.unsqueeze(2) == feats.unsqueeze(1)           # [R, K, K]
    return same.to(torch.uint8).argmax(-1)                    # argmax: the first maximum


def _edited_latents(x, feats, w_enc, b_enc, b_dec, threshold, activation, apply_b_dec_to_input):
    """Latents of the edited features only: z [R, K] (column j: feature feats[:, j])."""
    idx = feats.clamp_min(0)
    xe = x - b_dec.float() if apply_b_dec_to_input else x
    columns = w_enc.float().t()[idx]                           # [R, K, D]
    pre = torch.einsum("rd,rkd->rk", xe, columns) + b_enc.float()[idx]
    if activation == L.ACT_RELU:
        return pre.clamp_min(0)
    if activation == L.ACT_JUMPRELU:
        theta = threshold.float()[idx].clamp_min(0)
        return torch.where(pre > theta, pre, torch.zeros_like(pre))
    return pre                                                 # ACT_LINEAR


def _edit_all(z: torch.Tensor, code: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Each column's op at once (no feature repeats): add / set / scale / clamp."""
    v, hi = val[..., 0], val[..., 1]
    return torch.where(code == L.FEAT_ADD, z + v,
                       torch.where(code == L.FEAT_SET, v,
                                   torch.where(code == L.FEAT_SCALE, z * v,
                                               torch.minimum(torch.maximum(z, v), hi))))


def sae_replace_cpu(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                    edit_val, keep_error, activation, k, in_scale, apply_b_dec_to_input):
    n_slots, n_k = edit_feat.shape
    if n_slots == 0 or h.shape[0] == 0:
        return
    active = (gate != 0) & (slot >= 0) & (slot < n_slots)
    rows = torch.nonzero(active).flatten()
    if rows.numel() == 0:
        return
    s = slot[rows].long()
    x = h[rows].float() * in_scale
    keep = keep_error[s] != 0
    feats = edit_feat[s].long()                                        # [R, K]
    if activation != L.ACT_TOPK and bool(keep.all()):
        # sparse encode: a compact latent table, one column per edit, edited in order; a
        # repeated feature reads and writes its first column
        first = _first_columns(feats)
        own_column = first == torch.arange(n_k)
        z = _edited_latents(x, feats, w_enc, b_enc, b_dec, threshold, activation,
                            apply_b_dec_to_input)
        if bool((own_column | (feats < 0)).all()):
            # distinct features (the usual case): every edit at once
            z_new = _edit_all(z, edit_code[s], edit_val[s])
        else:
            local = torch.where(feats >= 0, first, -1).to(torch.int32)
            own = torch.arange(rows.numel(), dtype=torch.int32)
            z_new = edit_latents(z, own, torch.ones_like(keep), local, edit_code[s], edit_val[s])
        dz = (z_new - z) * (own_column & (feats >= 0))
        x_new = x + torch.einsum("rk,rkd->rd", dz, w_dec.float()[feats.clamp_min(0)])
        h[rows] = (x_new / in_scale).to(h.dtype)
        return
    z = encode(x, w_enc, b_enc, b_dec, threshold, activation, k, apply_b_dec_to_input)
    all_active = torch.ones(rows.numel(), dtype=torch.bool)
    z_new = edit_latents(z, slot[rows], all_active, edit_feat, edit_code, edit_val)
    x_new = torch.empty_like(x)
    if bool(keep.any()):
        idx = feats[keep].clamp_min(0)
        dz = (z_new[keep].gather(-1, idx) - z[keep].gather(-1, idx)) * (feats[keep] >= 0)
        # duplicates of one feature in a slot: the gathers see the final z'_f each time,
        # so count each distinct feature once
        dz = dz * (_first_columns(feats[keep]) == torch.arange(n_k))
        x_new[keep] = x[keep] + torch.einsum("rk,rkd->rd", dz, w_dec.float()[idx])
    if not bool(keep.all()):
        drop = ~keep
        x_new[drop] = z_new[drop] @ w_dec.float() + b_dec.float()
    h[rows] = (x_new / in_scale).to(h.dtype)
