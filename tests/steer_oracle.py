"""A float64 oracle for the steer+norm math, written row by row and independently of
the reference backend (plain loops over rows and edits, no masking tricks), plus the
table builders the op tests share.

`oracle` also returns a margin: how far the row came from a discontinuity (a condition
threshold, a JumpReLU threshold). Tests only compare rows with a comfortable margin,
since float32 and float64 may legitimately fall on different sides of such an edge.
"""
from __future__ import annotations

import math

import torch

from fasteer.ops import layout as L


def oracle(h, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
           cast_before_weight):
    """Return (h_new float64 [N, D], out float64 [N, D] or None, margin per row)."""
    h64 = h.double().clone()
    bank64 = bank.double()
    n_slots, n_edits = meta.shape[0], meta.shape[1]
    margins = []
    for r in range(h.shape[0]):
        s = int(slot[r])
        margin = math.inf
        if int(gate[r]) and 0 <= s < n_slots:
            x = h64[r].clone()
            x_in = x.clone()
            ok = []
            for e in range(n_edits):
                code, ui, wi, ci = (int(v) for v in meta[s, e])
                p = params[s, e].double()
                cond = (code >> 16) & 0xF
                if cond == L.COND_NONE or (code & 0xFF) == L.NONE:
                    ok.append(True)
                    continue
                c = bank64[ci]
                dot = float(x_in @ c)
                if cond == L.COND_COSINE:
                    den = float(x_in.norm() * c.norm())
                    val = dot / den if den > 0 else 0.0
                    val_scale = 1.0
                else:
                    val = dot + float(p[L.P_COND_BIAS])
                    val_scale = float(x_in.norm() * c.norm()) + 1.0
                margin = min(margin, abs(val - float(p[L.P_COND_THRESH])) / val_scale)
                ok.append(val >= float(p[L.P_COND_THRESH]))
            read = x  # the row edit e reads (layout.py: JOINT keeps the previous one's)
            for e in range(n_edits):
                code, ui, wi, ci = (int(v) for v in meta[s, e])
                kind = code & 0xFF
                if not code & L.JOINT:
                    read = x
                if kind == L.NONE or not ok[e]:
                    continue
                p = [float(v) for v in params[s, e].double()]
                before = float(x.norm())
                if kind == L.ADD:
                    x = x + p[0] * bank64[ui]
                elif kind == L.CLAMP:
                    u = bank64[ui]
                    x = x + (p[0] - float(read @ u)) * u
                elif kind == L.ABLATE:
                    u = bank64[ui]
                    x = x - float(read @ u) * u
                elif kind == L.SCALE:
                    x = p[0] * x
                elif kind == L.DYN_SCALE:
                    x = (p[0] + p[1] * float(read @ bank64[ui])) * x
                elif kind == L.FEATURE:
                    pre = float(read @ bank64[ui]) + p[0]
                    act = (code >> 12) & 0xF
                    if act == L.ACT_JUMPRELU:
                        margin = min(margin, abs(pre - p[1]) / (float(read.norm() * bank64[ui].norm()) + 1.0))
                        z = pre if pre > p[1] else 0.0
                    elif act == L.ACT_RELU:
                        z = max(pre, 0.0)
                    else:
                        z = pre
                    op = (code >> 8) & 0xF
                    z_new = {L.FEAT_ADD: z + p[2], L.FEAT_SET: p[2], L.FEAT_SCALE: z * p[2]}.get(
                        op, min(max(z, p[2]), p[3]))
                    x = x + (z_new - z) * bank64[wi]
                if code & L.PRESERVE_NORM:
                    after = float(x.norm())
                    if after > 0:
                        x = x * (before / after)
            h64[r] = x
        margins.append(margin)
    # the edited row as the model stores it
    h_store = torch.where(_active(slot, gate, n_slots).unsqueeze(-1), h64.to(h.dtype), h)
    if norm_kind == L.NORM_NONE:
        return h64, None, margins
    x = h_store.double()
    w = None if weight is None else weight.double()
    if norm_kind == L.NORM_RMS:
        r = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
        out = r if w is None else r * (w + weight_offset)
    else:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        out = (x - mu) / torch.sqrt(var + eps)
        if w is not None:
            out = out * w
        if bias is not None:
            out = out + bias.double()
    return h64, out, margins


def _active(slot, gate, n_slots):
    return (gate != 0) & (slot >= 0) & (slot < n_slots)


def random_tables(gen: torch.Generator, d: int, n_slots: int, n_edits: int, n_bank: int,
                  kinds=None, with_conditions=True):
    """Random slot tables exercising every edit kind, feature op, activation and condition.
    DYN_SCALE only where ``kinds`` names it: the default list is the one the tests' fixed
    seeds were chosen with."""
    bank = torch.randn(n_bank, d, generator=gen)
    # half the bank unit-norm (directions), half raw (steering vectors / SAE columns)
    bank[: n_bank // 2] /= bank[: n_bank // 2].norm(dim=-1, keepdim=True)
    meta = torch.full((n_slots, n_edits, 4), -1, dtype=torch.int32)
    params = torch.zeros(n_slots, n_edits, 8)
    kinds = kinds or [L.NONE, L.ADD, L.CLAMP, L.ABLATE, L.SCALE, L.FEATURE]

    def rint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    def rnd():
        return float(torch.randn(1, generator=gen))

    for s in range(n_slots):
        previous = L.NONE
        for e in range(n_edits):
            kind = kinds[rint(0, len(kinds))]
            unit = rint(0, max(1, n_bank // 2))           # a unit-norm row
            anyrow = rint(0, n_bank)
            cond = rint(0, 3) if with_conditions else L.COND_NONE
            preserve = bool(rint(0, 4) == 0)
            # a feature after a feature: half the time it reads jointly (a multi-feature
            # edit); at e = 0 the bit is legal and changes nothing (r_0 is the incoming row)
            joint = kind == L.FEATURE and (previous == L.FEATURE or e == 0) and not preserve \
                and rint(0, 2) == 0
            code = L.pack_code(kind, feature_op=rint(0, 4), activation=rint(0, 3),
                               condition=cond, preserve_norm=preserve, joint=joint)
            previous = kind
            u = unit if kind in (L.CLAMP, L.ABLATE) else anyrow
            meta[s, e] = torch.tensor([code, u, rint(0, n_bank), rint(0, n_bank) if cond else -1])
            lo = rnd()
            # DYN_SCALE: u any row (raw, not unit); p1 * (h.u) of order 1 for rows of entries
            # of order 1, so the factor p0 + p1 * (h.u) takes either sign
            # (drawn only for DYN_SCALE: the other kinds' tables stay as they were)
            slope = 0.0
            if kind == L.DYN_SCALE:
                slope = rnd() * 0.5 / max(float(bank[u].norm()), 1e-3)
            params[s, e] = torch.tensor([
                rnd() * 2 if kind != L.SCALE else 0.5 + abs(rnd()),   # alpha / clamp value / scale / bias
                abs(rnd()) if kind != L.DYN_SCALE else slope,          # JumpReLU threshold / slope
                lo,                                                    # feature value / clamp lo
                lo + abs(rnd()),                                       # clamp hi
                rnd() * 0.3 if cond == L.COND_COSINE else rnd(),       # condition threshold
                rnd(), 0.0, 0.0])                                      # projection bias, spare
    return meta, params, bank


# name -> (norm_kind, has_weight, has_bias, weight_offset, cast_before_weight)
NORMS = {
    "rms_llama": (L.NORM_RMS, True, False, 0.0, True),
    "rms_gemma": (L.NORM_RMS, True, False, 1.0, False),
    "rms_olmo2": (L.NORM_RMS, True, False, 0.0, False),
    "rms_plain": (L.NORM_RMS, False, False, 0.0, True),
    "layer": (L.NORM_LAYER, True, True, 0.0, True),
    "layer_plain": (L.NORM_LAYER, False, False, 0.0, True),
    "none": (L.NORM_NONE, False, False, 0.0, True),
}


def random_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds=None, with_conditions=True,
                edit_first_row=False):
    """Random op inputs on the CPU: rows h [n, d] of varied scale, `random_tables`, slots,
    gates (about 20% off), norm weight / bias per ``norm`` (a key of NORMS).
    ``edit_first_row``: row 0 gets slot 0 and gate 1 (at least one edited row)."""
    gen = torch.Generator().manual_seed(seed)
    norm_kind, has_w, has_b, offset, cbw = NORMS[norm]
    h = (torch.randn(n, d, generator=gen) * (1 + 3 * torch.rand(n, 1, generator=gen))).to(dtype)
    meta, params, bank = random_tables(gen, d, n_slots, n_edits, n_bank=6, kinds=kinds,
                                       with_conditions=with_conditions)
    slot = torch.randint(-1, max(n_slots, 1), (n,), generator=gen, dtype=torch.int32)
    if edit_first_row:
        slot[0] = 0 if n_slots else -1
    elif n_slots == 0:
        slot.fill_(-1)
    gate = (torch.rand(n, generator=gen) > 0.2).to(torch.uint8)
    if edit_first_row:
        gate[0] = 1
    weight = (torch.randn(d, generator=gen) * 0.5 + 1).to(dtype) if has_w else None
    bias = (torch.randn(d, generator=gen) * 0.1).to(dtype) if has_b else None
    return dict(h=h, slot=slot, gate=gate, meta=meta, params=params, bank=bank, weight=weight,
                bias=bias, norm_kind=norm_kind, eps=1e-5, weight_offset=offset,
                cast_before_weight=cbw)


def skipped_rows_case(d: int):
    """(h, meta, params, bank, slot) where row 0's only edit is skipped (its condition never
    holds), row 1 is edited and row 2 has slot -1. Every row holds a float16 NaN with a
    payload, which a store makes canonical: it shows whether a kernel wrote a row at all."""
    gen = torch.Generator().manual_seed(5)
    bank = torch.randn(2, d, generator=gen)
    meta = torch.tensor([[[L.pack_code(L.ADD, condition=L.COND_PROJ), 0, -1, 1]],
                         [[L.pack_code(L.ADD), 0, -1, -1]]], dtype=torch.int32)
    params = torch.zeros(2, 1, 8)
    params[:, 0, 0] = 0.5
    params[0, 0, L.P_COND_THRESH] = 1e30                 # never holds
    h = torch.randn(3, d, generator=gen).half()
    h.view(torch.int16)[:, 3] = 0x7C01                   # NaN with a payload in every row
    return h, meta, params, bank, torch.tensor([0, 1, -1], dtype=torch.int32)


def assert_only_row_1_written(h_after: torch.Tensor, h_before: torch.Tensor) -> None:
    bits, old = h_after.view(torch.int16), h_before.view(torch.int16)
    assert torch.equal(bits[0], old[0]), "row 0: its only edit was skipped, it must not be written"
    assert torch.equal(bits[2], old[2]), "row 2: slot -1, it must not be written"
    assert int(bits[1, 3]) == 0x7E00, "row 1 is edited: stored back, its NaN becomes canonical"


def check_unsteered_norm_matches_hf(dtype, backend: str, device="cpu") -> None:
    """Empty slot tables: the fused norm equals Hugging Face's own norm modules (Llama and
    Gemma RMSNorm, LayerNorm), and h is left bitwise unchanged."""
    import fasteer.ops as ops
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(3)
    d = 96
    h = torch.randn(5, 3, d, device=device).to(dtype)
    empty = (torch.full((5, 3), -1, dtype=torch.int32, device=device),
             torch.ones(5, 3, dtype=torch.uint8, device=device),
             torch.zeros(0, 0, 4, dtype=torch.int32, device=device),
             torch.zeros(0, 0, 8, device=device), torch.zeros(0, d, device=device))
    llama = LlamaRMSNorm(d, eps=1e-6).to(device, dtype)
    gemma = GemmaRMSNorm(d, eps=1e-6).to(device, dtype)
    layer = torch.nn.LayerNorm(d, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        for mod in (llama, gemma, layer):
            mod.weight.normal_(0.2, 0.5)
        layer.bias.normal_(0, 0.1)
    variants = [
        (llama, dict(norm_kind=L.NORM_RMS, eps=1e-6), llama.weight, None),
        (gemma, dict(norm_kind=L.NORM_RMS, eps=1e-6, weight_offset=1.0, cast_before_weight=False),
         gemma.weight, None),
        (layer, dict(norm_kind=L.NORM_LAYER, eps=1e-5), layer.weight, layer.bias),
    ]
    for mod, kw, w, b in variants:
        with torch.no_grad():
            expected = mod(h)
            out = torch.full_like(h, float("nan"))
            hh = h.clone()
            ops.steer_norm_(hh, out, *empty, w.detach(), None if b is None else b.detach(),
                            backend=backend, **kw)
        assert torch.equal(hh, h)
        tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        err = ((out.double() - expected.double()).abs() / (expected.double().abs() + 1)).max()
        assert err <= tol, f"{type(mod).__name__}: {err}"


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_rows_close(actual, expected, dtype, rows, what, scale=None):
    """Per-row max error relative to the row's magnitude (edits like ablation cancel)."""
    tol = TOLERANCE[dtype]
    for r in rows:
        a, b = actual[r].double(), expected[r].double()
        ref = scale[r] if scale is not None else float(b.abs().max()) + 1.0
        err = float((a - b).abs().max())
        assert err <= tol * (ref + 1.0), f"{what}: row {r} error {err:.3g} > {tol} * {ref + 1.0:.3g}"
