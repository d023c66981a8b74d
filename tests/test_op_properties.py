"""Property tests over the ops' argument space (bounded in time).

Every call of a public op either returns what the reference returns or raises the
documented error (TypeError / ValueError naming the argument, nothing written); none
crashes. The carriers' private entry points, which trust the table *values* (validated
when the tables were built), must still never let a kernel touch memory outside its
buffers: fed corrupted tables they may compute anything but must not crash, and every
layout error still raises. scripts/asan_check.sh runs this file against a build of
fasteer._C with AddressSanitizer, where an out-of-bounds access is a report, not luck.

FASTEER_PROPERTY_EXAMPLES sets the number of examples per test (default 120).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fasteer.ops as ops  # noqa: E402
from fasteer.ops import dispatch  # noqa: E402
from fasteer.ops import layout as L  # noqa: E402
from fasteer.ops.steer_norm import _steer_norm_fast_, _steer_fast_  # noqa: E402

EXAMPLES = int(os.environ.get("FASTEER_PROPERTY_EXAMPLES", "120"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DOCUMENTED = (TypeError, ValueError)

needs_cpu = pytest.mark.skipif(dispatch.cpu_module() is None, reason="fasteer._C not built")

# ------------------------------------------------------------------ the steer+norm op

# (code, uses u, uses w): conditions and thresholds are drawn so that the outcome never
# sits on a rounding boundary (|threshold| large), and FEATURE edits use continuous
# activations, so the backends agree within float tolerance.
KINDS = ("add", "clamp", "ablate", "scale", "feature", "feature_joint", "none")

LAYOUT_BREAKS = ("weight_short", "gate_short", "slot_short", "out_small", "out_overlap",
                 "h_stride0", "out_stride0", "params_small", "bank_wide", "h_double",
                 "slot_int64", "bias_with_rms", "meta_noncontig")
VALUE_BREAKS = ("bank_index_1000", "cond_index_neg5", "w_index_big", "unknown_kind",
                "nan_param", "inf_bank", "slot_oob", "slot_below")


@st.composite
def steer_case(draw):
    n = draw(st.integers(0, 6))
    lead = draw(st.sampled_from([(), (1,), (2,)])) if n % 2 == 0 and n else ()
    d = draw(st.integers(1, 19))
    s = draw(st.integers(1, 3))
    e = draw(st.integers(0, 3))
    v = draw(st.integers(0, 3)) if e == 0 else draw(st.integers(1, 3))
    edits = [[draw(st.sampled_from(KINDS)), draw(st.integers(0, 3)), draw(st.booleans()),
              draw(st.sampled_from(["none", "cosine", "projection"])), draw(st.booleans()),
              draw(st.sampled_from([L.FEAT_ADD, L.FEAT_SET, L.FEAT_SCALE, L.FEAT_CLAMP])),
              draw(st.sampled_from([L.ACT_RELU, L.ACT_LINEAR]))]
             for _ in range(s * e)]
    return dict(n=n, lead=lead, d=d, s=s, e=e, v=v, edits=edits,
                dtype=draw(st.sampled_from(DTYPES)),
                norm=draw(st.sampled_from([L.NORM_RMS, L.NORM_LAYER])),
                weight=draw(st.booleans()), bias=draw(st.booleans()),
                gate_bool=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                strided=draw(st.booleans()))


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, d, s, e, v, dtype = c["n"], c["d"], c["s"], c["e"], c["v"], c["dtype"]
    meta = torch.full((s, e, 4), -1, dtype=torch.int32)
    params = torch.zeros(s, e, 8)
    for i, (kind, row, pn, cond, cond_pass, fop, act) in enumerate(c["edits"]):
        si, ei = divmod(i, e)
        row = row % max(v, 1)
        k = {"add": L.ADD, "clamp": L.CLAMP, "ablate": L.ABLATE, "scale": L.SCALE,
             "feature": L.FEATURE, "feature_joint": L.FEATURE, "none": L.NONE}[kind]
        joint = kind == "feature_joint" and ei > 0
        preserve = pn and not joint
        code = L.pack_code(k, feature_op=fop, activation=act,
                           condition=L.CONDITIONS[cond], preserve_norm=preserve, joint=joint)
        meta[si, ei] = torch.tensor([code, row if L.needs_u(k) else -1,
                                     (row + 1) % v if k == L.FEATURE else -1,
                                     row if cond != "none" else -1])
        p = torch.randn(4, generator=g)
        params[si, ei, :4] = p
        params[si, ei, L.P_COND_THRESH] = -1e6 if cond_pass else 1e6
    bank = torch.randn(v, d, generator=g)
    if v:
        bank = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-3)
    rows = n // (c["lead"][0] if c["lead"] else 1) if c["lead"] else n
    shape = (*c["lead"], rows, d) if c["lead"] else (n, d)
    if c["strided"] and not c["lead"]:
        h = torch.randn(n, d + 3, generator=g).to(dtype)[:, :d]   # row stride > D
    else:
        h = torch.randn(*shape, generator=g).to(dtype)
    out = torch.full(h.shape, float("nan"), dtype=dtype)
    slot = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32)
    gate = torch.randint(0, 2, (n,), generator=g).to(torch.bool if c["gate_bool"] else torch.uint8)
    weight = torch.randn(d, generator=g).to(dtype) if c["weight"] else None
    bias = torch.randn(d, generator=g).to(dtype) if c["bias"] and c["norm"] == L.NORM_LAYER else None
    return dict(h=h, out=out, slot=slot, gate=gate, meta=meta, params=params, bank=bank,
                weight=weight, bias=bias, norm_kind=c["norm"])


def applicable(a, brk):
    n = a["h"].numel() // a["h"].shape[-1]
    e = a["meta"].shape[1]
    return {"weight_short": a["weight"] is not None, "gate_short": n >= 1, "slot_short": n >= 1,
            "out_small": n >= 1, "out_overlap": n >= 1, "h_stride0": n >= 2,
            "out_stride0": n >= 2, "params_small": True, "bank_wide": True, "h_double": True,
            "slot_int64": True, "bias_with_rms": True, "meta_noncontig": e >= 2,
            "bank_index_1000": e >= 1, "cond_index_neg5": e >= 1, "w_index_big": e >= 1,
            "unknown_kind": e >= 1, "nan_param": e >= 1, "inf_bank": a["bank"].shape[0] >= 1,
            "slot_oob": n >= 1, "slot_below": n >= 1}[brk]


def corrupt(a, brk):
    """Apply one break to the arguments, in place of a dict."""
    d = a["h"].shape[-1]
    n = a["h"].numel() // d
    if brk == "weight_short":
        a["weight"] = a["weight"][:-1].clone()
    elif brk == "gate_short":
        a["gate"] = a["gate"][:-1].clone()
    elif brk == "slot_short":
        a["slot"] = a["slot"][:-1].clone()
    elif brk == "out_small":
        a["out"] = torch.empty(n - 1, d, dtype=a["h"].dtype)
    elif brk == "out_overlap":
        buf = torch.zeros(2 * n * d + 1, dtype=a["h"].dtype)
        h = buf[: n * d].view(n, d)
        h.copy_(a["h"].reshape(n, d))
        off = (n * d) // 2                       # partial overlap (n*d == 1: the same element)
        a["h"], a["out"] = h, buf[off: off + n * d].view(n, d)
    elif brk == "h_stride0":
        a["h"] = a["h"].reshape(n, d)[:1].expand(n, d)
        a["out"] = torch.empty(n, d, dtype=a["h"].dtype)
    elif brk == "out_stride0":
        a["out"] = torch.empty(1, d, dtype=a["h"].dtype).expand(*a["h"].shape)
    elif brk == "params_small":
        s, e, _ = a["meta"].shape
        a["params"] = torch.zeros(s, max(e - 1, 0), 8) if e else torch.zeros(s, e, 7)
    elif brk == "bank_wide":
        a["bank"] = torch.zeros(a["bank"].shape[0], d + 1)
    elif brk == "h_double":
        a["h"], a["out"] = a["h"].double(), a["out"].double()
    elif brk == "slot_int64":
        a["slot"] = a["slot"].long()
    elif brk == "bias_with_rms":
        a["norm_kind"] = L.NORM_RMS
        a["bias"] = torch.zeros(d, dtype=a["h"].dtype)
    elif brk == "meta_noncontig":
        a["meta"] = a["meta"].transpose(0, 1).contiguous().transpose(0, 1)
        if a["meta"].is_contiguous():        # S == 1: shapes that stay contiguous
            a["meta"] = torch.zeros(a["meta"].shape[0], a["meta"].shape[1], 8,
                                    dtype=torch.int32)[..., ::2]
    elif brk == "bank_index_1000":
        a["meta"][0, 0] = torch.tensor([L.ADD, 1000, -1, -1])
    elif brk == "cond_index_neg5":
        a["meta"][0, 0] = torch.tensor([L.pack_code(L.ADD, condition=L.COND_PROJ), 0 if
                                        a["bank"].shape[0] else 1000, -1, -5])
    elif brk == "w_index_big":
        a["meta"][0, 0] = torch.tensor([L.FEATURE, 0, a["bank"].shape[0] + 7, -1])
    elif brk == "unknown_kind":
        a["meta"][0, 0, 0] = 77
    elif brk == "nan_param":
        a["params"][0, 0, 0] = float("nan")
    elif brk == "inf_bank":
        a["bank"][0, 0] = float("inf")
    elif brk == "slot_oob":
        a["slot"][0] = a["meta"].shape[0] + 3
    elif brk == "slot_below":
        a["slot"][0] = -5


def reference_of(a):
    h = a["h"].clone()
    out = torch.empty_like(h)
    ops.steer_norm_(h, out, a["slot"], a["gate"], a["meta"], a["params"], a["bank"], a["weight"],
                    a["bias"], norm_kind=a["norm_kind"], backend="reference")
    return h, out


def assert_matches(got, want, h_in, dtype, what):
    tol = TOL[dtype]
    scale = 1.0 + (float(h_in.float().abs().max()) if h_in.numel() else 0.0)
    for g, w, name in zip(got, want, ("h", "out")):
        assert g.shape == w.shape, f"{what}: {name} shape"
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * scale * 4,
                                   equal_nan=True, msg=lambda m: f"{what}: {name}: {m}")


def call_public(a, backend):
    return ops.steer_norm_(a["h"], a["out"], a["slot"], a["gate"], a["meta"], a["params"],
                           a["bank"], a["weight"], a["bias"], norm_kind=a["norm_kind"],
                           backend=backend)


def _assert_refused_untouched(a, call, brk) -> None:
    """Both backends raise a documented error for ``a`` and leave ``h`` as it was."""
    for backend in ("cpu", "reference"):
        before = a["h"].clone()
        with pytest.raises(DOCUMENTED):
            call(a, backend)
        assert torch.equal(a["h"], before), f"{brk}: h written before the error ({backend})"


@needs_cpu
@SETTINGS
@given(steer_case(), st.sampled_from((None,) + LAYOUT_BREAKS + VALUE_BREAKS))
def test_steer_norm_public_matches_reference_or_raises(c, brk):
    a = build(c)
    if brk is not None and not applicable(a, brk):
        brk = None
    if brk is not None:
        corrupt(a, brk)
    h_in = a["h"].clone()
    if brk is None:
        want = reference_of(a)
        call_public(a, "cpu")
        assert_matches((a["h"], a["out"]), want, h_in, a["h"].dtype, "cpu vs reference")
        # the carriers' path gives the same
        a2 = build(c)
        _steer_norm_fast_(a2["h"], a2["out"], a2["slot"], a2["gate"], a2["meta"], a2["params"],
                          a2["bank"], a2["weight"], a2["bias"], norm_kind=a2["norm_kind"],
                          backend="cpu")
        assert torch.equal(a2["h"], a["h"]) and torch.equal(a2["out"].isnan(), a["out"].isnan())
        return
    _assert_refused_untouched(a, call_public, brk)


@needs_cpu
@SETTINGS
@given(steer_case(), st.sampled_from(LAYOUT_BREAKS + VALUE_BREAKS))
def test_carrier_path_never_reads_out_of_bounds(c, brk):
    """The carriers' entry points and the registered library op trust table values, not
    layouts: a layout break raises; corrupted values compute something, without crashing
    (under ASan: without touching memory outside the buffers)."""
    a = build(c)
    if not applicable(a, brk):
        return
    corrupt(a, brk)
    args = (a["h"], a["out"], a["slot"], a["gate"], a["meta"], a["params"], a["bank"],
            a["weight"], a["bias"])
    calls = [
        lambda: _steer_norm_fast_(*args, norm_kind=a["norm_kind"], backend="cpu"),
        lambda: torch.ops.fasteer.steer_norm_(*args, a["norm_kind"], 1e-6, 0.0, True, "cpu"),
        lambda: _steer_fast_(a["h"], a["slot"], a["gate"], a["meta"], a["params"], a["bank"],
                             backend="cpu"),
    ]
    for call in calls:
        if brk in LAYOUT_BREAKS:
            if brk in ("weight_short", "out_small", "out_overlap", "out_stride0",
                       "bias_with_rms") and call is calls[2]:
                call()   # steer_ has no out / weight / bias: the break does not concern it
                continue
            with pytest.raises(DOCUMENTED):
                call()
        else:
            call()       # trusted values: any result, no crash


@needs_cpu
@SETTINGS
@given(steer_case(), st.booleans())
def test_add_steer_norm_matches_reference_or_raises(c, overlap_x):
    a = build(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(a["h"].shape, generator=g).to(a["h"].dtype)
    if overlap_x and a["h"].numel() > 1:
        x = a["h"].reshape(-1)[1:].reshape(-1)[: a["h"].numel() - 1]
        with pytest.raises(DOCUMENTED):
            ops.add_steer_norm_(a["h"], x, a["out"], a["slot"], a["gate"], a["meta"],
                                a["params"], a["bank"], a["weight"], a["bias"],
                                norm_kind=a["norm_kind"], backend="cpu")
        return
    h_ref, out_ref = a["h"].clone(), torch.empty_like(a["h"])
    h_in = a["h"].clone()
    ops.add_steer_norm_(h_ref, x, out_ref, a["slot"], a["gate"], a["meta"], a["params"],
                        a["bank"], a["weight"], a["bias"], norm_kind=a["norm_kind"],
                        backend="reference")
    ops.add_steer_norm_(a["h"], x, a["out"], a["slot"], a["gate"], a["meta"], a["params"],
                        a["bank"], a["weight"], a["bias"], norm_kind=a["norm_kind"],
                        backend="cpu")
    assert_matches((a["h"], a["out"]), (h_ref, out_ref), h_in + x, a["h"].dtype,
                   "add_steer_norm cpu vs reference")


# ------------------------------------------------------------------ the full-SAE op

SAE_BREAKS = ("in_scale_zero", "in_scale_nan", "in_scale_inf", "inf_w_dec", "nan_w_enc",
              "feat_oob", "code_oob", "nan_val", "slot_oob", "gate_short", "w_dec_shape",
              "k_zero_topk")


@st.composite
def sae_case(draw):
    return dict(n=draw(st.integers(0, 5)), d=draw(st.integers(1, 9)), f=draw(st.integers(1, 9)),
                s=draw(st.integers(1, 3)), k_edits=draw(st.integers(0, 3)),
                act=draw(st.sampled_from([L.ACT_RELU, L.ACT_LINEAR, L.ACT_TOPK])),
                keep=draw(st.lists(st.booleans(), min_size=3, max_size=3)),
                dtype=draw(st.sampled_from(DTYPES)),
                in_scale=draw(st.sampled_from([1.0, 0.5, 3.0])),
                apply_b_dec=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def sae_build(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, d, f, s, k = c["n"], c["d"], c["f"], c["s"], c["k_edits"]
    dt = c["dtype"]
    w = dict(w_enc=torch.randn(d, f, generator=g).to(dt), b_enc=torch.randn(f, generator=g).to(dt),
             w_dec=torch.randn(f, d, generator=g).to(dt), b_dec=torch.randn(d, generator=g).to(dt),
             threshold=torch.empty(0))
    edit_feat = torch.randint(-1, f, (s, k), generator=g, dtype=torch.int32)
    edit_code = torch.randint(0, 4, (s, k), generator=g, dtype=torch.int32)
    edit_val = torch.randn(s, k, 2, generator=g)
    edit_val[..., 1] = edit_val[..., 0].abs() + edit_val[..., 1].abs()     # clamp lo <= hi
    keep = torch.tensor(c["keep"][:s], dtype=torch.uint8)
    h = torch.randn(n, d, generator=g).to(dt)
    slot = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32)
    gate = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8)
    return dict(h=h, slot=slot, gate=gate, **w, edit_feat=edit_feat, edit_code=edit_code,
                edit_val=edit_val, keep_error=keep, activation=c["act"],
                k=max(1, f // 2) if c["act"] == L.ACT_TOPK else 0, in_scale=c["in_scale"],
                apply_b_dec_to_input=c["apply_b_dec"])


def sae_call(a, backend, fn=None):
    fn = fn or ops.sae_replace_
    return fn(a["h"], a["slot"], a["gate"], a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"],
              a["threshold"], a["edit_feat"], a["edit_code"], a["edit_val"], a["keep_error"],
              activation=a["activation"], k=a["k"], in_scale=a["in_scale"],
              apply_b_dec_to_input=a["apply_b_dec_to_input"], backend=backend)


def sae_corrupt(a, brk):
    n = a["h"].shape[0]
    if brk == "in_scale_zero":
        a["in_scale"] = 0.0
    elif brk == "in_scale_nan":
        a["in_scale"] = math.nan
    elif brk == "in_scale_inf":
        a["in_scale"] = -math.inf
    elif brk == "inf_w_dec":
        a["w_dec"] = a["w_dec"].clone()
        a["w_dec"][0, 0] = float("inf")
    elif brk == "nan_w_enc":
        a["w_enc"] = a["w_enc"].clone()
        a["w_enc"][-1, -1] = float("nan")
    elif brk == "feat_oob" and a["edit_feat"].numel():
        a["edit_feat"][0, 0] = a["w_enc"].shape[1] + 4
    elif brk == "code_oob" and a["edit_code"].numel():
        a["edit_code"][0, 0] = 9
    elif brk == "nan_val" and a["edit_val"].numel():
        a["edit_val"][0, 0, 0] = float("nan")
    elif brk == "slot_oob" and n:
        a["slot"][0] = a["edit_feat"].shape[0] + 2
    elif brk == "gate_short" and n:
        a["gate"] = a["gate"][:-1].clone()
    elif brk == "w_dec_shape":
        a["w_dec"] = torch.zeros(a["w_dec"].shape[0] + 1, a["w_dec"].shape[1], dtype=a["h"].dtype)
    elif brk == "k_zero_topk":
        a["activation"], a["k"] = L.ACT_TOPK, 0
    else:
        return False
    return True


@needs_cpu
@SETTINGS
@given(sae_case(), st.sampled_from((None,) + SAE_BREAKS))
def test_sae_replace_matches_reference_or_raises(c, brk):
    a = sae_build(c)
    if brk is not None and not sae_corrupt(a, brk):
        brk = None
    if brk is None:
        h_in = a["h"].clone()
        want = a["h"].clone()
        sae_call(dict(a, h=want), "reference")
        sae_call(a, "cpu")
        assert torch.isfinite(a["h"].float()).all() or not torch.isfinite(want.float()).all()
        tol = TOL[a["h"].dtype] * 4
        scale = 1.0 + float(want.float().abs().max() if want.numel() else 0) + \
            float(h_in.float().abs().max() if h_in.numel() else 0)
        torch.testing.assert_close(a["h"].float(), want.float(), rtol=tol, atol=tol * scale)
        return
    _assert_refused_untouched(a, sae_call, brk)
