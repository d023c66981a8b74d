"""Kernel checks: every GPU backend vs `reference` vs float64, at real sizes.

The float64 check runs the reference's edit math on float64 rows (the same formulas,
no rounding until the end), so it catches an error shared by all float32 paths.
"""
from __future__ import annotations

import itertools

import torch

from ..ops import layout as L
from ..ops import steer_, steer_norm_
from ..ops.reference.steer_norm import apply_edits, normalize

TOL = {torch.float32: 3e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def random_case(n, d, dtype, device, seed, n_slots=4, n_edits=4, offset=0):
    """Random rows and tables exercising every edit kind; `offset` misaligns h and out.

    FEATURE comes three times in the kind cycle so that slots hold runs of feature
    edits. A FEATURE edit that follows another FEATURE (or opens the slot, where JOINT
    must change nothing) is JOINT with probability 1/2, as a multi-feature FeatureEdit
    lowers: it reads the row the edit before it read (a run of JOINT edits all read the
    row the run's first edit read). Such edits never preserve the norm (the layout
    refuses JOINT with it); the run's first edit may.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    bank = torch.randn(8, d, generator=g)
    bank[:4] /= bank[:4].norm(dim=-1, keepdim=True)
    meta = torch.full((n_slots, n_edits, 4), -1, dtype=torch.int32)
    params = torch.zeros(n_slots, n_edits, 8)
    kinds = [L.ADD, L.CLAMP, L.ABLATE, L.SCALE, L.FEATURE, L.FEATURE, L.FEATURE, L.DYN_SCALE]
    for s, e in itertools.product(range(n_slots), range(n_edits)):
        kind = kinds[(s * n_edits + e) % len(kinds)]
        follows_feature = e > 0 and kinds[(s * n_edits + e - 1) % len(kinds)] == L.FEATURE
        cond = (s + e) % 3
        preserve = (s + e) % 4 == 3 and not follows_feature
        joint = (kind == L.FEATURE and (e == 0 or follows_feature) and not preserve
                 and float(torch.rand(1, generator=g)) < 0.5)
        code = L.pack_code(kind, feature_op=(s + 2 * e) % 4, activation=(s + e) % 3,
                           condition=cond, preserve_norm=preserve, joint=joint)
        u = (s + e) % 4 if kind in (L.CLAMP, L.ABLATE) else 4 + (s + e) % 4
        meta[s, e] = torch.tensor([code, u, (s * 3 + e) % 8, (s + 5 * e) % 8 if cond else -1])
        lo = float(torch.randn(1, generator=g))
        scales = kind in (L.SCALE, L.DYN_SCALE)
        # DYN_SCALE: factor 0.7 + p1 (h.u) with |u| ~ sqrt(d): a slope ~ 0.05 / d keeps it O(1)
        slope = 0.05 / d if kind == L.DYN_SCALE else 0.2
        params[s, e] = torch.tensor([0.7 if scales else float(torch.randn(1, generator=g)),
                                     slope, lo, lo + 1.0, -0.05 if cond == L.COND_COSINE else -1.0,
                                     0.3, 0, 0])
    base = torch.randn(n * d + offset, generator=g) * 2
    h = base[offset:].view(n, d).to(dtype)
    slot = torch.randint(-1, n_slots, (n,), generator=g, dtype=torch.int32)
    gate = (torch.rand(n, generator=g) > 0.1).to(torch.uint8)
    weight = (torch.randn(d, generator=g) * 0.3 + 1).to(dtype)
    bias = (torch.randn(d, generator=g) * 0.1).to(dtype)
    to = dict(device=device)
    store = torch.empty(n * d + offset, dtype=dtype, device=device)
    h_dev = store[offset:].view(n, d)
    h_dev.copy_(h)
    return dict(h=h_dev, slot=slot.to(**to), gate=gate.to(**to), meta=meta.to(**to),
                params=params.to(**to), bank=bank.to(**to), weight=weight.to(**to),
                bias=bias.to(**to), offset=offset)


def run_case(case, backend, norm_kind, weight_offset=0.0, cast_before_weight=True):
    h = case["h"].clone() if case["offset"] == 0 else _misaligned_clone(case["h"], case["offset"])
    tabs = (case["slot"], case["gate"], case["meta"], case["params"], case["bank"])
    if norm_kind == L.NORM_NONE:
        steer_(h, *tabs, backend=backend)
        return h, None
    out = _misaligned_clone(torch.full_like(h, float("nan")), case["offset"])
    steer_norm_(h, out, *tabs, case["weight"], case["bias"] if norm_kind == L.NORM_LAYER else None,
                norm_kind=norm_kind, eps=1e-5, weight_offset=weight_offset,
                cast_before_weight=cast_before_weight, backend=backend)
    return h, out


def _misaligned_clone(t, offset):
    store = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    v = store[offset:].view(t.shape)
    v.copy_(t)
    return v


def float64_expectation(case):
    x, active = apply_edits(case["h"].double(), case["slot"], case["gate"], case["meta"],
                            case["params"], case["bank"].double())
    return x, active


def max_rel_err(a, b, scale):
    return float(((a.double() - b.double()).abs() / (scale + 1.0)).max()) if a.numel() else 0.0


def check_steer_norm(backends, device, sizes, dtypes, log):
    """Returns a list of result records; `ok` False on any mismatch."""
    results = []
    norms = [("rms", L.NORM_RMS, 0.0, True), ("rms_gemma", L.NORM_RMS, 1.0, False),
             ("layer", L.NORM_LAYER, 0.0, True), ("none", L.NORM_NONE, 0.0, True)]
    for (n, d), dtype, offset in itertools.product(sizes, dtypes, (0, 1)):
        case = random_case(n, d, dtype, device, seed=n * 7919 + d, offset=offset)
        x64, active = float64_expectation(case)
        h_in = case["h"]
        row_scale = (h_in.double().abs().amax(-1, keepdim=True) + x64.abs().amax(-1, keepdim=True))
        for name, nk, off, cbw in norms:
            h_ref, out_ref = run_case(case, "reference", nk, off, cbw)
            ref_err = max_rel_err(h_ref[active], x64[active], row_scale[active])
            for backend in backends:
                rec = dict(op="steer_norm", backend=backend, rows=n, d=d, dtype=str(dtype).split(".")[-1],
                           norm=name, misaligned=bool(offset))
                try:
                    h_b, out_b = run_case(case, backend, nk, off, cbw)
                    untouched = ~active
                    rec["untouched_bitwise"] = bool(torch.equal(h_b[untouched], h_in[untouched]))
                    rec["h_err_vs_reference"] = max_rel_err(h_b, h_ref, row_scale)
                    rec["h_err_reference_vs_f64"] = ref_err
                    rec["out_err_vs_reference"] = (max_rel_err(out_b, out_ref, out_ref.double().abs())
                                                   if out_b is not None else 0.0)
                    rec["out_written"] = bool(out_b is None or not torch.isnan(out_b).any())
                    tol = TOL[dtype]
                    rec["ok"] = (rec["untouched_bitwise"] and rec["out_written"]
                                 and rec["h_err_vs_reference"] <= tol and rec["out_err_vs_reference"] <= tol
                                 and ref_err <= tol)
                except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                    rec["ok"] = False
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                results.append(rec)
                if not rec["ok"]:
                    log(f"  FAIL {rec}")
    return results
