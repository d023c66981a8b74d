"""The CUDA steer+norm on a GPU: backend "cuda" vs "reference" vs a float64 oracle.

As tests/test_steer_norm_backends.py does for "cpu": property tests over D (odd sizes
1, 7, 4099, plus 8192 and loop-kernel widths past 16384), rows, slots, edits of every
kind, conditions, gates, dtypes and norm variants. In half the examples h and out are
views that start one element into their storage, so no 16-byte access is possible and
the element-wise path runs. ``out`` is poisoned (NaN) before each run; rows that are not
edited must come back bitwise unchanged. Then what only a GPU shows: launches on a side
stream, capture in a CUDA graph with the tables updated in place between replays,
determinism, and the device guard on a second GPU.

Skipped when torch.cuda.is_available() is False (tests/test_cuda_build.py covers what
runs without a GPU, including the kernel under a CPU emulation of CUDA).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fasteer.ops as ops
from fasteer.ops import dispatch
from fasteer.ops import layout as L
from steer_oracle import (NORMS, assert_only_row_1_written, assert_rows_close,
                          check_unsteered_norm_matches_hf, oracle, random_case,
                          skipped_rows_case)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda"


@pytest.fixture(scope="module", autouse=True)
def cuda_backend_built():
    assert dispatch.cuda_module() is not None, (
        "a CUDA device is present but fasteer._cuda does not import "
        f"({dispatch._import('fasteer._cuda')[1]}); reinstall with nvcc available")


def make_case(seed, n, d, n_slots, n_edits, dtype, norm):
    """Inputs on the CPU (the oracle's side); `to_device` moves them."""
    return random_case(seed, n, d, n_slots, n_edits, dtype, norm)


def shifted(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of `t` on the device whose first element sits `offset` elements into its
    storage (offset 1: the data pointer is not 16-byte aligned)."""
    store = torch.empty(t.numel() + offset, dtype=t.dtype, device=DEVICE)
    view = store[offset:].view(t.shape)
    view.copy_(t)
    return view


def run_backend(case, backend, offset=0):
    """Run the op on the device; returns (h, out) back on the CPU."""
    dev = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    h = shifted(case["h"], offset)
    tabs = (dev["slot"], dev["gate"], dev["meta"], dev["params"], dev["bank"])
    if case["norm_kind"] == L.NORM_NONE:
        ops.steer_(h, *tabs, backend=backend)
        torch.cuda.synchronize()
        return h.cpu(), None
    out = shifted(torch.full_like(case["h"], float("nan")), offset)   # poisoned
    ops.steer_norm_(h, out, *tabs, dev["weight"], dev["bias"], norm_kind=case["norm_kind"],
                    eps=case["eps"], weight_offset=case["weight_offset"],
                    cast_before_weight=case["cast_before_weight"], backend=backend)
    torch.cuda.synchronize()
    return h.cpu(), out.cpu()


def oracle_of(case):
    return oracle(case["h"], case["slot"], case["gate"], case["meta"], case["params"],
                  case["bank"], case["weight"], case["bias"], case["norm_kind"], case["eps"],
                  case["weight_offset"], case["cast_before_weight"])


def check_untouched_rows(case, h_new):
    inactive = (case["gate"] == 0) | (case["slot"] < 0) | (case["slot"] >= case["meta"].shape[0])
    if case["meta"].shape[1] == 0:
        inactive[:] = True
    assert torch.equal(h_new[inactive], case["h"][inactive]), "untouched rows must not change"


def check_cuda_case(case, offset, require=assume):
    """`require`: hypothesis's assume in property tests, an assertion in fixed cases."""
    n = case["h"].shape[0]
    h_ref, out_ref = run_backend(case, "reference")
    h_new, out = run_backend(case, "cuda", offset)
    check_untouched_rows(case, h_new)
    h64, out64, margins = oracle_of(case)
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    require(len(rows) >= max(1, n // 2))
    dtype = case["h"].dtype
    scale = [float(case["h"][r].double().abs().max() + h64[r].abs().max()) for r in range(n)]
    assert_rows_close(h_new, h_ref, dtype, rows, "cuda vs reference: edited h", scale)
    assert_rows_close(h_new, h64, dtype, rows, "cuda vs float64: edited h", scale)
    if out is not None:
        assert not torch.isnan(out).any(), "out: some elements were not written"
        assert_rows_close(out, out_ref, dtype, rows, "cuda vs reference: norm output")
        assert_rows_close(out, out64, dtype, rows, "cuda vs float64: norm output")


case_strategy = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    d=st.sampled_from([1, 2, 7, 33, 64, 127, 128, 129, 256, 4096, 4099, 8192, 16384, 16385])
    | st.integers(1, 600),
    n_slots=st.integers(0, 4),
    n_edits=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(sorted(NORMS)),
    offset=st.sampled_from([0, 1]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(**case_strategy)
def test_cuda_matches_reference_and_float64(seed, n, d, n_slots, n_edits, dtype, norm, offset):
    check_cuda_case(make_case(seed, n, d, n_slots, n_edits, dtype, norm), offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("d", [1, 7, 4099, 8192, 20001])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_every_dtype_odd_sizes_and_misaligned(dtype, d, offset):
    """The fixed grid the issue names, whatever hypothesis draws."""
    def require(ok):
        assert ok, "too few rows away from a threshold: change the seed"

    for norm in ("rms_llama", "rms_gemma", "layer", "none"):
        check_cuda_case(make_case(d * 13 + offset, 5, d, 3, 3, dtype, norm), offset, require)


def test_auto_dispatch_uses_cuda_for_decode_rows():
    assert dispatch.resolve("auto", "cuda", 1) == "cuda"
    assert dispatch.resolve("auto", "cuda", dispatch.CUDA_ROWS_CROSSOVER) == "cuda"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_deterministic_and_on_a_side_stream(dtype):
    case = make_case(21, 7, 4096, 3, 3, dtype, "rms_llama")
    h_a, out_a = run_backend(case, "cuda")
    h_b, out_b = run_backend(case, "cuda")
    assert torch.equal(h_a, h_b) and torch.equal(out_a, out_b), "two runs differ"
    dev = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = dev["h"].clone()
        out = torch.full_like(h, float("nan"))
        ops.steer_norm_(h, out, dev["slot"], dev["gate"], dev["meta"], dev["params"], dev["bank"],
                        dev["weight"], norm_kind=L.NORM_RMS, eps=case["eps"], backend="cuda")
    side.synchronize()
    assert torch.equal(h.cpu(), h_a) and torch.equal(out.cpu(), out_a), "side stream differs"


def test_cuda_graph_capture_with_tables_updated_in_place():
    """No sync, no allocation inside the op: it captures, and replays read the tables'
    current values (alpha changed in place between replays needs no re-capture)."""
    case = make_case(33, 6, 2048, 2, 2, torch.bfloat16, "rms_llama")
    case["gate"].fill_(1)
    case["slot"] = torch.tensor([0, 1, -1, 0, 1, 0], dtype=torch.int32)
    dev = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    h_in = dev["h"].clone()
    h = h_in.clone()
    out = torch.empty_like(h)

    def step():
        h.copy_(h_in)
        # the carriers' entry point: tables checked once, no per-call value reads in capture
        ops._steer_norm_fast_(h, out, dev["slot"], dev["gate"], dev["meta"], dev["params"],
                              dev["bank"], dev["weight"], norm_kind=L.NORM_RMS, eps=case["eps"],
                              backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                            # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for alpha_scale in (1.0, -2.5):
        dev["params"][..., 0] = case["params"][..., 0].to(DEVICE) * alpha_scale   # in place
        graph.replay()
        torch.cuda.synchronize()
        expected = dict(case, params=dev["params"].cpu())
        h_ref, out_ref = run_backend(expected, "reference")
        _, _, margins = oracle_of(expected)
        rows = [r for r, m in enumerate(margins) if m > 1e-3]
        scale = [float(case["h"][r].double().abs().max() + h_ref[r].double().abs().max())
                 for r in range(6)]
        what = f"graph replay, alpha x{alpha_scale}"
        assert_rows_close(h.cpu(), h_ref, torch.bfloat16, rows, what, scale)
        assert_rows_close(out.cpu(), out_ref, torch.bfloat16, rows, what)


@pytest.mark.parametrize("d", [40, 4096, 20000])
def test_rows_whose_edits_all_skip_are_not_written(d):
    """A float16 NaN with a payload changes bits if a row is stored back (conversions make
    NaNs canonical), so it shows whether the kernel wrote the row at all."""
    h, meta, params, bank, slot = skipped_rows_case(d)
    hd = h.to(DEVICE)
    out = torch.full_like(hd, float("nan"))
    ops._steer_norm_fast_(hd, out, slot.to(DEVICE),
                          torch.ones(3, dtype=torch.uint8, device=DEVICE), meta.to(DEVICE),
                          params.to(DEVICE), bank.to(DEVICE), norm_kind=L.NORM_RMS,
                          backend="cuda")
    assert_only_row_1_written(hd.cpu(), h)


def test_slot_at_or_beyond_table_is_untouched():
    case = make_case(7, 6, 40, 2, 2, torch.float32, "rms_llama")
    slot = torch.tensor([2, 3, 100, -1, 0, 1], dtype=torch.int32, device=DEVICE)
    h = case["h"].to(DEVICE)
    out = torch.empty_like(h)
    # slot >= S: the carriers' entry point (the public op refuses it before the kernel)
    ops._steer_norm_fast_(h, out, slot, torch.ones(6, dtype=torch.bool, device=DEVICE),
                          case["meta"].to(DEVICE), case["params"].to(DEVICE),
                          case["bank"].to(DEVICE), case["weight"].to(DEVICE),
                          norm_kind=L.NORM_RMS, backend="cuda")
    assert torch.equal(h[:4].cpu(), case["h"][:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_unsteered_norm_matches_hf_modules(dtype):
    check_unsteered_norm_matches_hf(dtype, "cuda", DEVICE)


def test_wide_rows_with_too_many_edits_are_refused():
    d = 16385
    h = torch.zeros(1, d, device=DEVICE)
    meta = torch.zeros(1, 2049, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 2048 edits"):
        ops.steer_(h, torch.zeros(1, dtype=torch.int32, device=DEVICE),
                   torch.ones(1, dtype=torch.uint8, device=DEVICE), meta,
                   torch.zeros(1, 2049, 8, device=DEVICE), torch.zeros(1, d, device=DEVICE),
                   backend="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device_than_the_current_one():
    case = make_case(9, 4, 1024, 2, 2, torch.bfloat16, "rms_llama")
    expected_h, expected_out = run_backend(case, "cuda")
    dev = {k: (v.to("cuda:1") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    h = dev["h"].clone()
    out = torch.empty_like(h)
    with torch.cuda.device(0):
        ops.steer_norm_(h, out, dev["slot"], dev["gate"], dev["meta"], dev["params"], dev["bank"],
                        dev["weight"], norm_kind=L.NORM_RMS, eps=case["eps"], backend="cuda")
        torch.cuda.synchronize(1)
    assert torch.equal(h.cpu(), expected_h) and torch.equal(out.cpu(), expected_out)
