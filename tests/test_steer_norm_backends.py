"""The fused steer+norm op: reference vs float64, cpu vs reference, on random inputs.

Property tests over D (odd sizes included), rows, slots, edits of every kind,
conditions, gates, dtypes and norm variants. Outputs are poisoned (NaN) before each
run; rows with slot -1 or gate 0 must come back bitwise unchanged.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fasteer.ops as ops
from fasteer.ops import layout as L
from steer_oracle import (NORMS, TOLERANCE, assert_rows_close,
                          check_unsteered_norm_matches_hf, oracle, random_case)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["cpu"]


def make_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds=None, with_conditions=True):
    return random_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds, with_conditions)


def run_backend(case, backend):
    h = case["h"].clone()
    args = (case["slot"], case["gate"], case["meta"], case["params"], case["bank"])
    if case["norm_kind"] == L.NORM_NONE:
        ops.steer_(h, *args, backend=backend)
        return h, None
    out = torch.full_like(h, float("nan"))   # poisoned: every element must be written
    ops.steer_norm_(h, out, *args, case["weight"], case["bias"], norm_kind=case["norm_kind"],
                    eps=case["eps"], weight_offset=case["weight_offset"],
                    cast_before_weight=case["cast_before_weight"], backend=backend)
    return h, out


def check_against_oracle(case, h_new, out):
    h64, out64, margins = oracle(case["h"], case["slot"], case["gate"], case["meta"],
                                 case["params"], case["bank"], case["weight"], case["bias"],
                                 case["norm_kind"], case["eps"], case["weight_offset"],
                                 case["cast_before_weight"])
    dtype = case["h"].dtype
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    assume(len(rows) >= max(1, len(margins) // 2))
    scale = [float(case["h"][r].double().abs().max() + h64[r].abs().max()) for r in range(len(margins))]
    assert_rows_close(h_new, h64, dtype, rows, "edited h", scale)
    if out is not None:
        assert not torch.isnan(out).any(), "out: some elements were not written"
        assert_rows_close(out, out64, dtype, rows, "norm output")


def check_untouched_rows(case, h_new):
    inactive = (case["gate"] == 0) | (case["slot"] < 0) | (case["slot"] >= case["meta"].shape[0])
    if case["meta"].shape[1] == 0:
        inactive[:] = True
    assert torch.equal(h_new[inactive], case["h"][inactive]), "untouched rows must be bitwise unchanged"


case_strategy = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    d=st.sampled_from([1, 2, 7, 33, 64, 127, 4099]) | st.integers(1, 300),
    n_slots=st.integers(0, 4),
    n_edits=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(sorted(NORMS)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(**case_strategy)
def test_reference_matches_float64(seed, n, d, n_slots, n_edits, dtype, norm):
    case = make_case(seed, n, d, n_slots, n_edits, dtype, norm)
    h_new, out = run_backend(case, "reference")
    check_untouched_rows(case, h_new)
    check_against_oracle(case, h_new, out)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(**case_strategy)
def test_backend_matches_reference_and_float64(backend, seed, n, d, n_slots, n_edits, dtype, norm):
    case = make_case(seed, n, d, n_slots, n_edits, dtype, norm)
    h_ref, out_ref = run_backend(case, "reference")
    h_new, out = run_backend(case, backend)
    check_untouched_rows(case, h_new)
    tol = TOLERANCE[dtype]
    _, _, margins = oracle(case["h"], case["slot"], case["gate"], case["meta"], case["params"],
                           case["bank"], case["weight"], case["bias"], case["norm_kind"],
                           case["eps"], case["weight_offset"], case["cast_before_weight"])
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    assume(len(rows) >= max(1, n // 2))
    scale = [float(case["h"][r].double().abs().max() + h_ref[r].double().abs().max()) for r in range(n)]
    assert_rows_close(h_new, h_ref, dtype, rows, f"{backend} vs reference: edited h", scale)
    if out is not None:
        assert not torch.isnan(out).any()
        assert_rows_close(out, out_ref, dtype, rows, f"{backend} vs reference: norm output")
    check_against_oracle(case, h_new, out)
    del tol


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), d=st.integers(1, 200),
       n_edits=st.integers(2, 6), dtype=st.sampled_from(DTYPES))
def test_joint_feature_runs_match_float64(backend, seed, n, d, n_edits, dtype):
    # mostly feature edits: random_tables makes about half of them JOINT (read the row the
    # run started from), the lowering of a multi-feature FeatureEdit
    case = make_case(seed, n, d, 3, n_edits, dtype, "none",
                     kinds=[L.FEATURE, L.FEATURE, L.FEATURE, L.ADD], with_conditions=False)
    in_order = case["meta"].clone()
    in_order[..., 0] &= ~L.JOINT
    args = [case[k] for k in ("h", "slot", "gate")]
    rest = (case["params"], case["bank"], None, None, L.NORM_NONE, 1e-5, 0.0, True)
    joint, _, _ = oracle(*args, case["meta"], *rest)
    ordered, _, _ = oracle(*args, in_order, *rest)
    assume(float((joint - ordered).abs().max()) > 1e-2)  # the bit changes this case's result
    h_new, out = run_backend(case, backend)
    check_untouched_rows(case, h_new)
    check_against_oracle(case, h_new, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_many_rows_threads(backend, dtype):
    """Prefill-sized work is split across threads; results must not depend on the split."""
    torch.set_num_threads(2)
    case = make_case(1234, 700, 257, 3, 2, dtype, "rms_llama")
    h_ref, out_ref = run_backend(case, "reference")
    h_new, out = run_backend(case, backend)
    check_untouched_rows(case, h_new)
    rows = range(700)
    scale = [float(case["h"][r].double().abs().max() + h_ref[r].double().abs().max()) + 1 for r in rows]
    assert_rows_close(h_new, h_ref, dtype, rows, "edited h", scale)
    assert_rows_close(out, out_ref, dtype, rows, "norm output")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_slot_at_or_beyond_table_is_untouched(backend):
    """Without validation, slots >= S are treated as untouched (never read out of bounds)."""
    case = make_case(7, 6, 40, 2, 2, torch.float32, "rms_llama")
    case["slot"] = torch.tensor([2, 3, 100, -1, 0, 1], dtype=torch.int32)
    case["gate"] = torch.ones(6, dtype=torch.uint8)
    h = case["h"].clone()
    out = torch.empty_like(h)
    ops.steer_norm_(h, out, case["slot"], case["gate"], case["meta"], case["params"], case["bank"],
                    case["weight"], norm_kind=L.NORM_RMS, backend=backend, validate=False)
    assert torch.equal(h[:4], case["h"][:4])


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unsteered_norm_matches_hf_modules(backend, dtype):
    """Empty slot tables: the fused norm equals Hugging Face's own norm modules."""
    check_unsteered_norm_matches_hf(dtype, backend)


def test_reference_autograd_flows_to_alpha():
    """The out-of-place op differentiates through the tables (e.g. learning alpha)."""
    torch.manual_seed(0)
    d = 16
    h = torch.randn(4, d, requires_grad=True)
    meta = torch.tensor([[[L.ADD, 0, -1, -1]]], dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, 0] = 1.5
    params.requires_grad_(True)
    bank = torch.randn(1, d)
    slot = torch.zeros(4, dtype=torch.int32)
    gate = torch.ones(4, dtype=torch.uint8)
    h_new, out = ops.steer_norm(h, slot, gate, meta, params, bank, torch.ones(d), validate=False)
    (out.sum() + h_new.pow(2).sum()).backward()
    assert params.grad is not None and params.grad[0, 0, 0] != 0
    expected = 2 * (h.detach() + 1.5 * bank[0]) @ bank[0]
    # d/d alpha of sum(h_new^2) alone:
    params.grad = None
    h_new, _ = ops.steer_norm(h, slot, gate, meta, params, bank, norm_kind=L.NORM_NONE, validate=False)
    h_new.pow(2).sum().backward()
    assert math.isclose(float(params.grad[0, 0, 0]), float(expected.sum()), rel_tol=1e-4)


def test_layout_constants_match_cpp():
    from fasteer.ops.dispatch import cpu_module
    consts = cpu_module().layout_constants()
    for name, value in consts.items():
        assert getattr(L, name) == value, name
