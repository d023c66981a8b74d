"""JOINT runs (multi-feature FeatureEdits) through the emulated CUDA kernel (see
tests/test_cuda_build.py: the .cu source compiled by g++ against a CUDA emulation), every
kernel shape -- warp-per-row, block-per-row with the read row in shared memory up to the
64 KB opt-in, the loop kernel -- vs the reference and the float64 oracle, only on cases
where the JOINT bit changes the result. Also the DYN_SCALE kind (a scale-only record whose
factor follows a dot product with u) through the same kernel shapes."""
import pytest
import torch

from fasteer.ops import layout as L
from steer_oracle import oracle
from test_cuda_build import (check_case, emulated, emulated_lib, make_case,  # noqa: F401
                             nvcc_job, run_emulated)

SHAPES = [  # (n, d, offset, expected launch)
    (5, 7, 1, "ALIGNED = false; bool WARP_ROWS = true"),
    (6, 64, 0, "ALIGNED = true; bool WARP_ROWS = true"),
    (3, 1000, 0, "WARP_ROWS = false"),
    (3, 4099, 1, "ALIGNED = false; bool WARP_ROWS = false"),
    (2, 8192, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (2, 12288, 1, "WARP_ROWS = false"),
    (2, 16384, 0, "block=1024"),
    (2, 16400, 0, "launch_typed"),
]


def joint_case(seed, n, d, dtype, norm, n_edits=8, e0_joint=False):
    case = make_case(seed, n, d, dtype, norm, n_slots=3, n_edits=n_edits,
                     kinds=[L.FEATURE, L.FEATURE, L.FEATURE, L.FEATURE, L.ADD, L.CLAMP, L.SCALE,
                            L.NONE], with_conditions=seed % 2 == 1)
    meta = case["meta"]
    # longer runs: every FEATURE after a FEATURE without preserve_norm reads jointly in slot 0
    for e in range(1, n_edits):
        c, p = int(meta[0, e, 0]), int(meta[0, e - 1, 0])
        if c & 0xFF == L.FEATURE and p & 0xFF == L.FEATURE and not c & L.PRESERVE_NORM:
            meta[0, e, 0] = c | L.JOINT
    if e0_joint:  # a JOINT bit at e = 0 (and a run right after it) changes nothing: r_0 = h_in
        for sl in range(3):
            meta[sl, 0, 0] |= L.JOINT
            c = int(meta[sl, 1, 0])
            if c & 0xFF == L.FEATURE and not c & L.PRESERVE_NORM:
                meta[sl, 1, 0] = c | L.JOINT
    return case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,d,offset,launch", SHAPES, ids=[f"{s[0]}x{s[1]}" for s in SHAPES])
@pytest.mark.parametrize("e0_joint", [False, True])
def test_joint_runs_emulated(emulated, dtype, n, d, offset, launch, e0_joint):
    checked = 0
    for seed in range(40):  # until 3 cases where the JOINT bit changes the result
        case = joint_case(d * 7 + seed + 1000 * e0_joint, n, d, dtype, "rms_llama",
                          e0_joint=e0_joint)
        if not joint_bit_matters(case) or not well_conditioned(case):
            continue
        h_new, out = run_emulated(case, offset)
        assert launch in emulated.last_kernel(), emulated.last_kernel()
        check_case(case, h_new, out)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def joint_bit_matters(case):
    keys = ("slot", "gate", "meta", "params", "bank", "weight", "bias", "norm_kind", "eps",
            "weight_offset", "cast_before_weight")
    args = [case[k] for k in keys]
    joint, _, _ = oracle(case["h"], *args)
    plain = case["meta"].clone()
    plain[..., 0] &= ~L.JOINT
    args[2] = plain
    ordered, _, _ = oracle(case["h"], *args)
    return float((joint - ordered).abs().max()) > 1e-2


def well_conditioned(case):
    """The float32 reference itself within tolerance of float64 and finite (chains of
    feature edits on wide rows can amplify rounding; fp16 can overflow), and most rows away
    from a condition / JumpReLU threshold: otherwise a case says nothing about the kernel."""
    from fasteer.ops.reference.steer_norm import steer_norm as reference
    from steer_oracle import TOLERANCE
    keys = ("slot", "gate", "meta", "params", "bank", "weight", "bias", "norm_kind", "eps",
            "weight_offset", "cast_before_weight")
    args = [case[k] for k in keys]
    h_ref, out_ref = reference(case["h"], *args)
    h64, _, margins = oracle(case["h"], *args)
    if not torch.isfinite(h_ref).all() or not torch.isfinite(out_ref).all():
        return False
    n = case["h"].shape[0]
    if sum(m > 1e-3 for m in margins) < max(1, n // 2):   # rows at a threshold: undecided
        return False
    tol = TOLERANCE[case["h"].dtype]
    for r, m in enumerate(margins):
        if m <= 1e-3:
            continue
        scale = float(case["h"][r].double().abs().max() + h64[r].abs().max())
        if float((h_ref[r].double() - h64[r]).abs().max()) > tol * scale:
            return False
    return True


DYN_KINDS = [L.DYN_SCALE, L.DYN_SCALE, L.ADD, L.CLAMP, L.FEATURE, L.SCALE, L.ABLATE, L.NONE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,d,offset,launch", SHAPES, ids=[f"{s[0]}x{s[1]}" for s in SHAPES])
def test_dyn_scale_emulated(emulated, dtype, n, d, offset, launch):
    """DYN_SCALE mixed with the other kinds (conditions and PRESERVE_NORM on some edits) in
    every kernel shape, the loop kernel's replay of scale-only records included; a case
    counts only if its DYN_SCALE edits change the result (vs the same tables without them)."""
    checked = 0
    for seed in range(40):
        case = make_case(d * 11 + seed + 7, n, d, dtype, "rms_llama", n_slots=3, n_edits=5,
                         kinds=DYN_KINDS, with_conditions=seed % 2 == 0)
        if not dyn_scale_matters(case) or not well_conditioned(case):
            continue
        h_new, out = run_emulated(case, offset)
        assert launch in emulated.last_kernel(), emulated.last_kernel()
        check_case(case, h_new, out)
        checked += 1
        if checked == 2:
            break
    assert checked == 2


def dyn_scale_matters(case):
    keys = ("slot", "gate", "meta", "params", "bank", "weight", "bias", "norm_kind", "eps",
            "weight_offset", "cast_before_weight")
    args = [case[k] for k in keys]
    with_dyn, _, _ = oracle(case["h"], *args)
    without = case["meta"].clone()
    dyn = (without[..., 0] & 0xFF) == L.DYN_SCALE
    without[..., 0][dyn] = L.NONE
    args[2] = without
    plain, _, _ = oracle(case["h"], *args)
    return float((with_dyn - plain).abs().max()) > 1e-2
