"""Full SAE replace on CPU tensors.

The encode is a GEMM and nothing hand-written beats the BLAS torch already calls on a
CPU, so this backend uses it, and saves work where the math allows: only the rows that
are steered are encoded, and with the error term kept (the usual case) the decode is
not a second GEMM but the sparse delta  x += sum_j (z'_j - z_j) * W_dec[f_j]  over the
row's K edited features (every other latent is unchanged, so its decode cancels).
"""
from __future__ import annotations

import torch

from ..reference.sae_replace import edit_latents, encode


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
    z = encode(x, w_enc, b_enc, b_dec, threshold, activation, k, apply_b_dec_to_input)
    all_active = torch.ones(rows.numel(), dtype=torch.bool)
    z_new = edit_latents(z, slot[rows], all_active, edit_feat, edit_code, edit_val)
    keep = keep_error[s] != 0
    x_new = torch.empty_like(x)
    if bool(keep.any()):
        feats = edit_feat[s[keep]].long()                                # [R, K]
        idx = feats.clamp_min(0)
        dz = (z_new[keep].gather(-1, idx) - z[keep].gather(-1, idx)) * (feats >= 0)
        # duplicates of one feature in a slot: the gathers see the final z'_f each time,
        # so count each distinct feature once
        first = torch.ones_like(feats, dtype=torch.bool)
        for j in range(1, n_k):
            first[:, j] = (feats[:, j:j + 1] != feats[:, :j]).all(-1)
        dz = dz * first
        x_new[keep] = x[keep] + torch.einsum("rk,rkd->rd", dz, w_dec.float()[idx])
    if not bool(keep.all()):
        drop = ~keep
        x_new[drop] = z_new[drop] @ w_dec.float() + b_dec.float()
    h[rows] = (x_new / in_scale).to(h.dtype)
