"""Reference full-SAE replace: encode every feature, edit the latents, decode.

The math (one row x of h, float32; see `fasteer.ops.sae_replace` for the arguments):
    1. x   = in_scale * h                                  (input normalisation)
    2. pre = (x - b_dec [if apply_b_dec_to_input]) @ W_enc + b_enc       [F]
    3. z   = act(pre)   relu: max(pre, 0)   jumprelu: pre if pre > max(theta, 0) else 0
                        linear: pre         topk: relu(pre) on the k largest pre, 0 elsewhere
    4. z'  = z, then for each of the slot's edits j (feature f_j >= 0), in order:
                z'[f_j] = op_j(z'[f_j])     add v / set v / scale v / clamp [v, hi]
    5. keep_error: x' = x + (z' - z) @ W_dec        (= dec(z') + (x - dec(z)))
       else:       x' = z' @ W_dec + b_dec          (the SAE's reconstruction only)
    6. h   = round_to_dtype(x' / in_scale)
Rows with gate 0 or slot outside [0, S) are not touched (bitwise).
"""
from __future__ import annotations

import torch

from .. import layout as L


def encode(x: torch.Tensor, w_enc, b_enc, b_dec, threshold, activation: int, k: int,
           apply_b_dec_to_input: bool) -> torch.Tensor:
    """Latents z [N, F] of float rows x [N, D] (already input-scaled)."""
    xe = x - b_dec.to(x.dtype) if apply_b_dec_to_input else x
    pre = xe @ w_enc.to(x.dtype) + b_enc.to(x.dtype)
    if activation == L.ACT_RELU:
        return pre.clamp_min(0)
    if activation == L.ACT_JUMPRELU:
        theta = threshold.to(x.dtype).clamp_min(0)
        return torch.where(pre > theta, pre, torch.zeros_like(pre))
    if activation == L.ACT_LINEAR:
        return pre
    if activation == L.ACT_TOPK:
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    raise ValueError(f"activation: unknown code {activation}")


def edit_latents(z: torch.Tensor, slot, active, edit_feat, edit_code, edit_val) -> torch.Tensor:
    """Apply each row's slot edits to its latents (sequentially over the K edit columns)."""
    n_slots, n_k = edit_feat.shape
    if n_slots == 0 or n_k == 0:
        return z
    s = slot.long().clamp(0, n_slots - 1)
    feats = edit_feat[s].long()           # [N, K]
    codes = edit_code[s].long()
    vals = edit_val[s].to(z.dtype)        # [N, K, 2]
    z_new = z.clone()
    for j in range(n_k):
        f = feats[:, j]
        use = active & (f >= 0)
        idx = f.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
        cur = z_new.gather(-1, idx).squeeze(-1)
        v, hi = vals[:, j, 0], vals[:, j, 1]
        op = codes[:, j]
        new = torch.where(op == L.FEAT_ADD, cur + v,
              torch.where(op == L.FEAT_SET, v,
              torch.where(op == L.FEAT_SCALE, cur * v, torch.minimum(torch.maximum(cur, v), hi))))
        new = torch.where(use, new, cur)
        z_new = z_new.scatter(-1, idx, new.unsqueeze(-1))
    return z_new


def sae_replace(h, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold, edit_feat, edit_code,
                edit_val, keep_error, activation: int, k: int, in_scale: float,
                apply_b_dec_to_input: bool, compute_dtype=torch.float32) -> torch.Tensor:
    """Out of place: the new h [N, D] (untouched rows bitwise equal to h)."""
    n_slots = edit_feat.shape[0]
    active = (gate != 0) & (slot >= 0) & (slot < n_slots)
    if n_slots == 0 or h.shape[0] == 0:
        return h
    x = h.to(compute_dtype) * in_scale
    z = encode(x, w_enc, b_enc, b_dec, threshold, activation, k, apply_b_dec_to_input)
    z_new = edit_latents(z, slot, active, edit_feat, edit_code, edit_val)
    s = slot.long().clamp(0, n_slots - 1)
    keep = (keep_error[s] != 0).unsqueeze(-1)
    w = w_dec.to(compute_dtype)
    with_error = x + (z_new - z) @ w
    recon = z_new @ w + b_dec.to(compute_dtype)
    x_new = torch.where(keep, with_error, recon) / in_scale
    return torch.where(active.unsqueeze(-1), x_new.to(h.dtype), h)
