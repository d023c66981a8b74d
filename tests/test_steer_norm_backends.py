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
    """Through the carriers' entry point (tables validated when built, slots not range
    checked per call), slots >= S are treated as untouched (never read out of bounds)."""
    case = make_case(7, 6, 40, 2, 2, torch.float32, "rms_llama")
    case["slot"] = torch.tensor([2, 3, 100, -1, 0, 1], dtype=torch.int32)
    case["gate"] = torch.ones(6, dtype=torch.uint8)
    h = case["h"].clone()
    out = torch.empty_like(h)
    ops._steer_norm_fast_(h, out, case["slot"], case["gate"], case["meta"], case["params"],
                          case["bank"], case["weight"], norm_kind=L.NORM_RMS, backend=backend)
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
    h_new, out = ops.steer_norm(h, slot, gate, meta, params, bank, torch.ones(d))
    (out.sum() + h_new.pow(2).sum()).backward()
    assert params.grad is not None and params.grad[0, 0, 0] != 0
    expected = 2 * (h.detach() + 1.5 * bank[0]) @ bank[0]
    # d/d alpha of sum(h_new^2) alone:
    params.grad = None
    h_new, _ = ops.steer_norm(h, slot, gate, meta, params, bank, norm_kind=L.NORM_NONE)
    h_new.pow(2).sum().backward()
    assert math.isclose(float(params.grad[0, 0, 0]), float(expected.sum()), rel_tol=1e-4)


def test_layout_constants_match_cpp():
    from fasteer.ops.dispatch import cpu_module
    consts = cpu_module().layout_constants()
    for name, value in consts.items():
        assert getattr(L, name) == value, name


# ------------------------------------------------------------- portable build, ISA paths

_ISA_SCRIPT = r"""
import json, sys, torch
import fasteer.ops as ops
from fasteer.ops import dispatch
sys.path.insert(0, {tests!r})
from test_steer_norm_backends import make_case, run_backend
res = {{"isa": dispatch.cpu_module().isa(), "info": dispatch.cpu_module().build_info()}}
worst = 0.0
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for d in (7, 64, 300):
        case = make_case(11, 9, d, 3, 4, dtype, "rms_llama", with_conditions=False)
        outs = {{b: run_backend(case, b) for b in ("reference", "cpu")}}
        for i in range(2):
            a, b = outs["cpu"][i].float(), outs["reference"][i].float()
            worst = max(worst, float(((a - b).abs() / (1 + b.abs())).max()))
res["worst"] = worst
print(json.dumps(res))
"""


def _cpu_supports(*flags):
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return all(f in line.split() for f in flags)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fasteer._C not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_path_matches_reference(isa):
    """The module is built for a portable baseline and picks AVX2 / AVX-512 code at run
    time; FASTEER_CPU_ISA caps the choice, so each path runs here and matches."""
    import json
    import os
    import platform
    import subprocess
    import sys
    if platform.machine() not in ("x86_64", "AMD64") and isa != "baseline":
        pytest.skip("x86-64 only")
    want = isa
    if isa == "avx512" and not _cpu_supports("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        want = "avx2" if _cpu_supports("avx2", "fma", "f16c") else "baseline"
    if isa == "avx2" and not _cpu_supports("avx2", "fma", "f16c"):
        want = "baseline"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FASTEER_CPU_ISA=isa)
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["isa"] == want, res
    assert f"runs the {want} path" in res["info"], res["info"]
    assert res["worst"] < 2e-2, res       # bf16 rounding of near-tie rows at most


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fasteer._C not built")
def test_build_is_portable():
    """Default build: -march=x86-64-v2 (not native), and no AVX / AVX-512 instruction
    outside the functions chosen at run time -- so the module loads and runs on any
    x86-64-v2 CPU instead of dying with SIGILL."""
    import os
    import platform
    import re
    import shutil
    import subprocess
    from fasteer.ops import dispatch
    mod = dispatch.cpu_module()
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    if os.environ.get("FASTEER_CPU_ARCH", "x86-64-v2") == "x86-64-v2":
        assert "built for -march=x86-64-v2" in mod.build_info(), mod.build_info()
    if "-march=x86-64-v2" not in mod.build_info() or shutil.which("objdump") is None:
        pytest.skip("custom FASTEER_CPU_ARCH build, or no objdump")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", mod.__file__],
                         capture_output=True, text=True, check=True).stdout
    fn, wide = None, {}
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
        elif re.match(r"^\s+[0-9a-f]+:\s+(v[a-z0-9]+|k(mov|and|or|xor|not)[bwdq])\s", line):
            wide[fn] = wide.get(fn, 0) + 1
    assert wide, "no AVX code at all: the wide paths were not compiled"
    stray = [f for f in wide if "run_rows_avx2" not in f and "run_rows_avx512" not in f]
    assert not stray, f"AVX instructions outside the run-time-dispatched functions: {stray[:5]}"
