"""The DYN_SCALE edit kind (DynScalar, Stoehr et al. 2024): h <- (p0 + p1 * (h.u)) * h,
with u a raw (not normalised) bank row.

Every backend that runs here (reference, cpu) against the reference, and the reference
against float64 math written below (closed form for a lone DYN_SCALE edit; the shared
oracle of tests/steer_oracle.py for mixed slots), on fresh random inputs of odd sizes,
every dtype, with NaN-poisoned outputs and rows that must stay bitwise unchanged. The
Triton kernel's DYN_SCALE checks are in tests/test_triton_steer_norm.py, the emulated
CUDA kernel's in tests/test_cuda_joint_emulated.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasteer.ops as ops
from fasteer.ops import layout as L
from fasteer.ops.reference.steer_norm import apply_edits as reference_apply_edits
from steer_oracle import assert_rows_close, oracle
from test_steer_norm_backends import (BACKENDS, check_against_oracle, check_untouched_rows,
                                      make_case, run_backend)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL = ["reference"] + BACKENDS
MIXED_KINDS = [L.DYN_SCALE, L.DYN_SCALE, L.ADD, L.CLAMP, L.FEATURE, L.SCALE, L.ABLATE]


def run(backend, h, slot, gate, meta, params, bank, weight=None, norm_kind=L.NORM_RMS):
    """One backend on a copy of h, out poisoned with NaN; returns (h after, out or None).
    Slots >= S are legal only on the carriers' entry points (tables validated when built,
    as here), so rows with such slots go through those."""
    ops.validate_tables(meta, params, bank, h.shape[-1])
    hh = h.clone()
    public = bool((slot < meta.shape[0]).all())
    if norm_kind == L.NORM_NONE:
        (ops.steer_ if public else ops._steer_fast_)(hh, slot, gate, meta, params, bank,
                                                     backend=backend)
        return hh, None
    out = torch.full_like(h, float("nan"))
    (ops.steer_norm_ if public else ops._steer_norm_fast_)(
        hh, out, slot, gate, meta, params, bank, weight, norm_kind=norm_kind, eps=1e-5,
        backend=backend)
    assert not torch.isnan(out).any(), f"{backend}: out has unwritten elements"
    return hh, out


def case_args(case):
    return [case[k] for k in ("slot", "gate", "meta", "params", "bank", "weight", "bias",
                              "norm_kind", "eps", "weight_offset", "cast_before_weight")]


def rows_setup(gen, n, d, dtype):
    """Rows of varied scale, slot 0 for most; row 1 gate 0, row 2 slot -1, row 3 slot 5
    (>= S): those three must come back bitwise unchanged."""
    h = (torch.randn(n, d, generator=gen) * (1 + 3 * torch.rand(n, 1, generator=gen))).to(dtype)
    slot = torch.zeros(n, dtype=torch.int32)
    gate = torch.ones(n, dtype=torch.uint8)
    gate[1] = 0
    slot[2] = -1
    slot[3] = 5
    return h, slot, gate


def untouched_mask(slot, gate, n_slots):
    return (gate == 0) | (slot < 0) | (slot >= n_slots)


def compare(h, results, h64, untouched, what):
    """Each backend: untouched rows bitwise, edited rows vs reference and vs float64."""
    dtype = h.dtype
    edited = [r for r in range(h.shape[0]) if not bool(untouched[r])]
    scale = [float(h[r].double().abs().max() + h64[r].abs().max()) for r in range(h.shape[0])]
    h_ref = results["reference"][0]
    for backend, (h_new, _) in results.items():
        assert torch.equal(h_new[untouched], h[untouched]), f"{backend}: untouched rows changed"
        assert_rows_close(h_new, h_ref, dtype, edited, f"{what}: {backend} vs reference", scale)
        assert_rows_close(h_new, h64, dtype, edited, f"{what}: {backend} vs float64", scale)


# ------------------------------------------------------------------ hand-built cases

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 129, 4099])
def test_dyn_scale_alone_matches_closed_form(dtype, d):
    """One DYN_SCALE edit with a raw u: (p0 + p1 h.u) h in float64, factors of both signs
    (a negative factor flips the row), the RMS norm of the stored row."""
    gen = torch.Generator().manual_seed(d * 3 + DTYPES.index(dtype))
    n = 11
    h, slot, gate = rows_setup(gen, n, d, dtype)
    u = torch.randn(1, d, generator=gen) * 3.0               # raw: |u| ~ 3 sqrt(d)
    meta = torch.tensor([[[L.pack_code(L.DYN_SCALE), 0, -1, -1]]], dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, L.P_B] = 1.0 / float(u.norm())               # p1 h.u ~ N(0, s^2)
    h64 = h.double()
    # p0 between the edited rows' values of -p1 h.u: factors of both signs
    slope_dot = float(params[0, 0, 1]) * (h64 @ u[0].double())
    mid = slope_dot[~untouched_mask(slot, gate, 1)].sort().values
    params[0, 0, L.P_A] = -float(mid[len(mid) // 2 - 1:len(mid) // 2 + 1].mean())
    weight = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    factor = params[0, 0, 0].double() + params[0, 0, 1].double() * (h64 @ u[0].double())
    expected = factor.unsqueeze(-1) * h64
    untouched = untouched_mask(slot, gate, 1)
    expected[untouched] = h64[untouched]
    edited = ~untouched
    assert (factor[edited] < 0).any() and (factor[edited] > 0).any(), "want both signs"
    results = {b: run(b, h, slot, gate, meta, params, u, weight) for b in ALL}
    compare(h, results, expected, untouched, "dyn_scale")
    # the shared oracle agrees with the closed form, and gives the norm
    o64, out64, _ = oracle(h, slot, gate, meta, params, u, weight, None, L.NORM_RMS, 1e-5, 0.0,
                           True)
    assert torch.allclose(o64, expected, rtol=1e-12, atol=1e-12)
    for backend, (_, out) in results.items():
        assert_rows_close(out, out64, dtype, range(n), f"{backend}: norm output")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dyn_scale_negative_factor_flips_the_row(backend, dtype):
    """p0 = -1, p1 = 0: the row is negated exactly (any dtype: negation is exact)."""
    gen = torch.Generator().manual_seed(21)
    h, slot, gate = rows_setup(gen, 6, 37, dtype)
    bank = torch.randn(2, 37, generator=gen)
    meta = torch.tensor([[[L.pack_code(L.DYN_SCALE), 1, -1, -1]]], dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, L.P_A] = -1.0
    h_new, _ = run(backend, h, slot, gate, meta, params, bank, norm_kind=L.NORM_NONE)
    untouched = untouched_mask(slot, gate, 1)
    assert torch.equal(h_new[untouched], h[untouched])
    assert torch.equal(h_new[~untouched], -h[~untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [3, 64, 301])
def test_dyn_scale_preserve_norm_keeps_the_norm(dtype, d):
    """PRESERVE_NORM after a scale: the row keeps its norm, and its sign is the factor's."""
    gen = torch.Generator().manual_seed(5 + d)
    n = 10
    h, slot, gate = rows_setup(gen, n, d, dtype)
    u = torch.randn(1, d, generator=gen)
    meta = torch.tensor([[[L.pack_code(L.DYN_SCALE, preserve_norm=True), 0, -1, -1]]],
                        dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, L.P_A] = 0.1
    params[0, 0, L.P_B] = 0.8 / float(u.norm())
    h64 = h.double()
    factor = 0.1 + float(params[0, 0, 1]) * (h64 @ u[0].double())
    assume_margin = (factor.abs() > 1e-3) | untouched_mask(slot, gate, 1)
    assert assume_margin.all(), "a factor too close to 0 for this seed"
    expected = torch.sign(factor).unsqueeze(-1) * h64
    untouched = untouched_mask(slot, gate, 1)
    expected[untouched] = h64[untouched]
    assert (factor[~untouched] < 0).any() and (factor[~untouched] > 0).any()
    results = {b: run(b, h, slot, gate, meta, params, u, norm_kind=L.NORM_NONE) for b in ALL}
    compare(h, results, expected, untouched, "dyn_scale + preserve_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dyn_scale_with_condition_applies_and_skips(dtype):
    """COND_PROJ on a DYN_SCALE edit: it applies on some rows, is skipped on others."""
    gen = torch.Generator().manual_seed(9)
    n, d = 16, 45
    bank = torch.randn(2, d, generator=gen)                 # u = bank[0], c = bank[1]
    h = torch.randn(n, d, generator=gen)
    h[::2] += 3 * bank[1]                                   # half the rows lean towards c
    h = h.to(dtype)
    slot = torch.zeros(n, dtype=torch.int32)
    gate = torch.ones(n, dtype=torch.uint8)
    gate[5] = 0
    meta = torch.tensor([[[L.pack_code(L.DYN_SCALE, condition=L.COND_PROJ), 0, -1, 1]]],
                        dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, L.P_A], params[0, 0, L.P_B] = 1.5, 0.05
    params[0, 0, L.P_COND_THRESH], params[0, 0, L.P_COND_BIAS] = 40.0, 2.0   # h.c + 2 >= 40
    h64 = h.double()
    passes = (h64 @ bank[1].double() + 2.0 >= 40.0) & (gate != 0)
    margin = (h64 @ bank[1].double() + 2.0 - 40.0).abs()
    assert (margin > 1e-2).all(), "a row sits on the threshold"
    assert passes.any() and not passes.all()
    factor = 1.5 + 0.05 * (h64 @ bank[0].double())
    expected = torch.where(passes.unsqueeze(-1), factor.unsqueeze(-1) * h64, h64)
    results = {b: run(b, h, slot, gate, meta, params, bank, norm_kind=L.NORM_NONE) for b in ALL}
    compare(h, results, expected, ~passes, "dyn_scale with condition")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [5, 128, 1031])
def test_dyn_scale_mixed_with_add_clamp_feature(dtype, d):
    """A slot mixing DYN_SCALE with ADD, CLAMP and FEATURE (and a second slot of its own):
    every edit reads the previous one's result; vs the oracle and the reference."""
    gen = torch.Generator().manual_seed(77 + d)
    n = 12
    h, slot, gate = rows_setup(gen, n, d, dtype)
    slot[6:] = 1
    bank = torch.randn(6, d, generator=gen)
    bank[1] /= bank[1].norm()                               # CLAMP's unit direction
    bank[3:5] /= d ** 0.5                                   # SAE-like encoder / decoder rows
    meta = torch.full((2, 5, 4), -1, dtype=torch.int32)
    params = torch.zeros(2, 5, 8)
    slot0 = [(L.pack_code(L.ADD), 0, -1, [0.7]),
             (L.pack_code(L.DYN_SCALE), 2, -1, [0.5, 0.6 / float(bank[2].norm())]),
             (L.pack_code(L.CLAMP), 1, -1, [1.5]),
             (L.pack_code(L.FEATURE, feature_op=L.FEAT_SCALE, activation=L.ACT_LINEAR), 3, 4,
              [0.1, 0.0, 3.0]),
             (L.pack_code(L.DYN_SCALE, preserve_norm=True), 5, -1,
              [-0.3, 0.4 / float(bank[5].norm())])]
    slot1 = [(L.pack_code(L.DYN_SCALE), 5, -1, [-0.8, 0.3 / float(bank[5].norm())]),
             (L.pack_code(L.NONE), -1, -1, []),
             (L.pack_code(L.FEATURE, feature_op=L.FEAT_ADD, activation=L.ACT_RELU), 3, 4,
              [0.2, 0.0, 1.0]),
             (L.pack_code(L.DYN_SCALE), 0, -1, [1.1, -0.2 / float(bank[0].norm())]),
             (L.pack_code(L.ADD), 2, -1, [-0.4])]
    for s, edits in enumerate((slot0, slot1)):
        for e, (code, ui, wi, p) in enumerate(edits):
            meta[s, e] = torch.tensor([code, ui, wi, -1])
            params[s, e, :len(p)] = torch.tensor(p)
    ops.validate_tables(meta, params, bank, d)
    weight = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
    case = dict(h=h, slot=slot, gate=gate, meta=meta, params=params, bank=bank, weight=weight,
                bias=None, norm_kind=L.NORM_RMS, eps=1e-5, weight_offset=0.0,
                cast_before_weight=True)
    h64, out64, margins = oracle(h, *case_args(case))
    untouched = untouched_mask(slot, gate, 2)
    results = {b: run(b, h, slot, gate, meta, params, bank, weight) for b in ALL}
    compare(h, results, h64, untouched, "mixed slot")
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    for backend, (_, out) in results.items():
        assert_rows_close(out, out64, dtype, rows, f"{backend}: norm output")


# ------------------------------------------------------------------ random tables

mixed_strategy = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    d=st.sampled_from([1, 2, 7, 33, 127, 4099]) | st.integers(1, 300),
    n_slots=st.integers(1, 3),
    n_edits=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(["rms_llama", "rms_gemma", "layer", "none"]),
)


@pytest.mark.parametrize("backend", ALL)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(**mixed_strategy)
def test_random_tables_with_dyn_scale(backend, seed, n, d, n_slots, n_edits, dtype, norm):
    """Random slots mixing DYN_SCALE with every other kind, conditions, PRESERVE_NORM:
    vs the reference (other backends) and the float64 oracle."""
    case = make_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds=MIXED_KINDS)
    h_new, out = run_backend(case, backend)
    check_untouched_rows(case, h_new)
    if backend != "reference":
        h_ref, out_ref = run_backend(case, "reference")
        _, _, margins = oracle(case["h"], *case_args(case))
        rows = [r for r, m in enumerate(margins) if m > 1e-3]
        scale = [float(case["h"][r].double().abs().max() + h_ref[r].double().abs().max())
                 for r in range(n)]
        assert_rows_close(h_new, h_ref, dtype, rows, f"{backend} vs reference", scale)
        if out is not None:
            assert_rows_close(out, out_ref, dtype, rows, f"{backend} vs reference: norm")
    check_against_oracle(case, h_new, out)


# ------------------------------------------------------------------ autograd

def test_reference_gradcheck_float64():
    """The reference's edit math (apply_edits) runs in float64 when handed float64 rows
    (tables promote), so torch.autograd.gradcheck checks d/dh of DYN_SCALE exactly, alone,
    mixed and with PRESERVE_NORM. (The public op itself takes float32/16-bit h only.)"""
    gen = torch.Generator().manual_seed(3)
    n, d = 4, 6
    bank = torch.randn(3, d, generator=gen)
    meta = torch.full((3, 2, 4), -1, dtype=torch.int32)
    params = torch.zeros(3, 2, 8)
    meta[0, 0] = torch.tensor([L.pack_code(L.DYN_SCALE), 0, -1, -1])
    params[0, 0, :2] = torch.tensor([0.4, -0.7])
    meta[1, 0] = torch.tensor([L.pack_code(L.ADD), 1, -1, -1])
    params[1, 0, 0] = 0.5
    meta[1, 1] = torch.tensor([L.pack_code(L.DYN_SCALE), 2, -1, -1])
    params[1, 1, :2] = torch.tensor([-1.2, 0.3])
    meta[2, 0] = torch.tensor([L.pack_code(L.DYN_SCALE, preserve_norm=True), 1, -1, -1])
    params[2, 0, :2] = torch.tensor([0.9, 0.5])
    slot = torch.tensor([0, 1, 2, -1], dtype=torch.int32)
    gate = torch.ones(n, dtype=torch.uint8)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x):
        out, _ = reference_apply_edits(x, slot, gate, meta, params, bank)
        return out

    assert f(h).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (h,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("preserve", [False, True])
def test_public_op_gradient_matches_float64(preserve):
    """ops.steer_norm (float32, autograd) vs the analytic float64 vector-Jacobian product
    of (p0 + p1 h.u) h:  g -> (p0 + p1 h.u) g + p1 (g.h) u  (checked numerically when
    PRESERVE_NORM rescales)."""
    gen = torch.Generator().manual_seed(8 + preserve)
    n, d = 5, 23
    u = torch.randn(1, d, generator=gen)
    meta = torch.tensor([[[L.pack_code(L.DYN_SCALE, preserve_norm=preserve), 0, -1, -1]]],
                        dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, :2] = torch.tensor([0.3, 0.25])
    slot = torch.zeros(n, dtype=torch.int32)
    gate = torch.ones(n, dtype=torch.uint8)
    h = torch.randn(n, d, generator=gen).requires_grad_(True)
    g = torch.randn(n, d, generator=gen)
    h_new, _ = ops.steer_norm(h, slot, gate, meta, params, u, norm_kind=L.NORM_NONE)
    (h_new * g).sum().backward()
    h64, g64, u64 = h.detach().double(), g.double(), u[0].double()
    if not preserve:
        factor = 0.3 + 0.25 * (h64 @ u64)
        expected = factor.unsqueeze(-1) * g64 + 0.25 * (g64 * h64).sum(-1, keepdim=True) * u64
    else:
        def f(x):
            y = (0.3 + 0.25 * (x @ u64)).unsqueeze(-1) * x
            return y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
        expected = torch.autograd.functional.vjp(f, h64, g64)[1]
    err = float((h.grad.double() - expected).abs().max())
    assert err <= 1e-4 * (1 + float(expected.abs().max())), err


# ------------------------------------------------------------------ layout and validation

def test_layout_entries():
    assert L.DYN_SCALE == 6 and L.KIND_NAMES[L.DYN_SCALE] == "dyn_scale"
    assert L.needs_u(L.DYN_SCALE) and not L.needs_w(L.DYN_SCALE)
    code = L.pack_code(L.DYN_SCALE, condition=L.COND_COSINE, preserve_norm=True)
    assert L.unpack_code(code)["kind"] == L.DYN_SCALE
    with pytest.raises(ValueError, match="joint"):
        L.pack_code(L.DYN_SCALE, joint=True)
    assert "DYN_SCALE" in L.__doc__


def _tables(kind, u):
    meta = torch.tensor([[[L.pack_code(kind) if kind <= 0xFF else kind, u, -1, -1]]],
                        dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, :2] = torch.tensor([1.0, 0.5])
    return meta, params, torch.randn(3, 8)


def test_validate_tables_accepts_dyn_scale_and_requires_u():
    ops.validate_tables(*_tables(L.DYN_SCALE, 2), 8)
    for bad_u in (-1, 3, 100):
        with pytest.raises(ValueError, match=r"meta\[0, 0\]: bank index u="):
            ops.validate_tables(*_tables(L.DYN_SCALE, bad_u), 8)
    with pytest.raises(ValueError, match="edit kind out of range"):
        ops.validate_tables(*_tables(L.DYN_SCALE + 1, 0), 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_carrier_path_skips_dyn_scale_with_bad_u(backend):
    """The carriers' entry point does not re-validate: the C++ kernel skips a DYN_SCALE
    edit whose u is outside the bank (never reads out of bounds), and one kind past the
    last is skipped too."""
    for kind, u in ((L.DYN_SCALE, 1000), (L.DYN_SCALE, -1), (L.DYN_SCALE + 1, 0)):
        meta, params, bank = _tables(kind, u)
        h = torch.randn(4, 8)
        h0 = h.clone()
        out = torch.empty_like(h)
        ops._steer_norm_fast_(h, out, torch.zeros(4, dtype=torch.int32),
                              torch.ones(4, dtype=torch.uint8), meta, params, bank,
                              torch.ones(8), norm_kind=L.NORM_RMS, backend=backend)
        assert torch.equal(h, h0), (kind, u)
