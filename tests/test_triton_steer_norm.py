"""The Triton steer+norm kernel, run by Triton's interpreter on the CPU.

Three-way check on seeded random inputs: triton backend == reference backend (to a
dtype ulp), and reference == an independent float64 computation written here, row by
row, straight from the layout's math. Odd D (1, 7, 33, 4099: never a multiple of the
block), every edit kind / feature op / activation / condition / norm preservation,
mixed slots and gates, fp32 / fp16 / bf16 (the interpreter runs bf16), every norm
variant. ``out`` is poisoned with NaN before each run; rows that are not edited must
come back bitwise unchanged. A last test compiles the kernel for sm_80 / sm_90 (no GPU
needed) because the interpreter does not type-check the kernel the way the compiler does.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / fasteer.kernels are imported

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fasteer.ops as ops  # noqa: E402
from fasteer.ops import layout as L  # noqa: E402
from fasteer.ops.reference.steer_norm import normalize as reference_normalize  # noqa: E402
from fasteer.ops.triton import kernels_module  # noqa: E402
from fasteer.ops.triton.steer_norm import steer_norm_triton  # noqa: E402

_kernels = kernels_module("steer_norm")
if type(_kernels.steer_norm_kernel).__name__ != "InterpretedFunction":
    # imported earlier in this process without the interpreter: @triton.jit decides at
    # decoration time, so decorate again now that TRITON_INTERPRET is set
    importlib.reload(_kernels)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol): triton vs reference may differ by the rounding of one fp32 sum order
# (fp32) or by one ulp of the output dtype; the float64 bounds allow two roundings.
TOL_BACKENDS = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-3, 1e-3),
                torch.bfloat16: (8e-3, 8e-3)}
TOL_F64 = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
           torch.bfloat16: (1.6e-2, 1.6e-2)}

# every edit description of the layout at least once
EDIT_SPECS = ([(L.ADD, 0, 0), (L.CLAMP, 0, 0), (L.ABLATE, 0, 0), (L.SCALE, 0, 0), (L.NONE, 0, 0),
               (L.DYN_SCALE, 0, 0)]
              + [(L.FEATURE, op, act) for op in range(4) for act in range(3)])
CONDITIONS = (L.COND_NONE, L.COND_COSINE, L.COND_PROJ)


# --------------------------------------------------------------------------- inputs

def make_tables(gen: torch.Generator, hidden: int, n_slots: int = 4, n_edits: int = 5):
    """Slot tables using every edit spec, condition and norm preservation (shuffled)."""
    n_entries = n_slots * n_edits
    specs = [EDIT_SPECS[i % len(EDIT_SPECS)] for i in range(n_entries)]
    order = torch.randperm(n_entries, generator=gen).tolist()
    n_dirs, n_enc, n_dec, n_cond = 3, 3, 3, 3
    bank = torch.randn(n_dirs + n_enc + n_dec + n_cond, hidden, generator=gen)
    bank[:n_dirs] /= bank[:n_dirs].norm(dim=-1, keepdim=True)  # unit directions (host-normalised)
    bank[n_dirs:n_dirs + n_enc + n_dec] /= hidden ** 0.5       # SAE-like scales: pre ~ N(0, 1)
    meta = torch.zeros(n_slots, n_edits, 4, dtype=torch.int32)
    meta[..., 1:] = -1
    params = torch.zeros(n_slots, n_edits, 8)

    def uniform(lo, hi):
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    def pick(first, count):
        return first + int(torch.randint(count, (), generator=gen))

    for entry, k in enumerate(order):
        s, e = divmod(entry, n_edits)
        kind, fop, act = specs[k]
        cond = CONDITIONS[k % 3]
        meta[s, e, 0] = L.pack_code(kind, feature_op=fop, activation=act, condition=cond,
                                    preserve_norm=(k % 4 == 1))
        p = params[s, e]
        if kind in (L.ADD, L.CLAMP, L.ABLATE):
            meta[s, e, 1] = pick(0, n_dirs) if kind != L.ADD else pick(0, n_dirs + n_enc)
            p[0] = uniform(-3, 3)
        elif kind == L.SCALE:
            p[0] = uniform(-2, 2)
        elif kind == L.DYN_SCALE:
            # u a unit direction or an SAE-scaled (raw) row: h.u ~ N(0, 4)
            meta[s, e, 1] = pick(0, n_dirs + n_enc)
            p[0] = uniform(-2, 2)
            p[1] = uniform(-0.5, 0.5)
        elif kind == L.FEATURE:
            meta[s, e, 1] = pick(n_dirs, n_enc)
            meta[s, e, 2] = pick(n_dirs + n_enc, n_dec)
            p[0] = uniform(-0.5, 0.5)            # encoder bias
            p[1] = uniform(-0.5, 0.5)            # jumprelu threshold
            p[2] = uniform(-2, 4)                # add / set / scale / clamp low
            p[3] = p[2] + uniform(0, 3)          # clamp high
        if cond != L.COND_NONE:
            meta[s, e, 3] = pick(n_dirs + n_enc + n_dec, n_cond)
            if cond == L.COND_COSINE:
                # cos(h, c) of random vectors is ~ N(0, 1/D): thresholds in that range
                # make some rows pass and some fail
                p[4] = uniform(-1.5, 1.5) / hidden ** 0.5
            else:
                p[4] = uniform(-1, 1)
                p[5] = uniform(-1, 1)
    return meta, params, bank


def make_rows(gen: torch.Generator, n_rows: int, n_slots: int, gate_dtype=torch.uint8):
    slot = torch.randint(-1, n_slots, (n_rows,), generator=gen, dtype=torch.int32)
    gate = (torch.rand(n_rows, generator=gen) < 0.8).to(gate_dtype)
    # make sure the set has an edited row, a gated-off row and an unslotted row
    slot[0], gate[0] = 0, 1
    if n_rows > 2:
        slot[1], gate[1] = 1 % max(n_slots, 1), 0
        slot[2], gate[2] = -1, 1
    return slot, gate


# --------------------------------------------------------------------------- float64 math

def edits_f64(h, slot, gate, meta, params, bank):
    """The layout's edit math, row by row in float64; returns (rows, edited mask)."""
    x = h.double().clone()
    bank = bank.double()
    n_slots, n_edits = meta.shape[0], meta.shape[1]
    active = torch.zeros(h.shape[0], dtype=torch.bool)
    for i in range(h.shape[0]):
        s = int(slot[i])
        if not (int(gate[i]) != 0 and 0 <= s < n_slots):
            continue
        active[i] = True
        row_in = x[i].clone()
        row = row_in.clone()
        read = row  # the row edit e reads: JOINT keeps the previous edit's
        for e in range(n_edits):
            code, iu, iw, ic = (int(v) for v in meta[s, e])
            p = [float(v) for v in params[s, e]]
            f = L.unpack_code(code)
            if not f["joint"]:
                read = row
            if f["kind"] == L.NONE:
                continue
            if f["condition"] != L.COND_NONE:
                c = bank[ic]
                proj = float(row_in @ c)
                if f["condition"] == L.COND_COSINE:
                    denom = float(row_in.norm() * c.norm())
                    passed = (proj / denom if denom > 0 else 0.0) >= p[4]
                else:
                    passed = proj + p[5] >= p[4]
                if not passed:
                    continue
            before = row.norm()
            if f["kind"] == L.ADD:
                new = row + p[0] * bank[iu]
            elif f["kind"] == L.CLAMP:
                new = row + (p[0] - read @ bank[iu]) * bank[iu]
            elif f["kind"] == L.ABLATE:
                new = row - (read @ bank[iu]) * bank[iu]
            elif f["kind"] == L.SCALE:
                new = p[0] * row
            elif f["kind"] == L.DYN_SCALE:
                new = (p[0] + p[1] * float(read @ bank[iu])) * row
            else:
                pre = float(read @ bank[iu]) + p[0]
                act = f["activation"]
                z = (max(pre, 0.0) if act == L.ACT_RELU else
                     (pre if pre > p[1] else 0.0) if act == L.ACT_JUMPRELU else pre)
                z_new = {L.FEAT_ADD: z + p[2], L.FEAT_SET: p[2], L.FEAT_SCALE: z * p[2],
                         L.FEAT_CLAMP: min(max(z, p[2]), p[3])}[f["feature_op"]]
                new = row + (z_new - z) * bank[iw]
            if f["preserve_norm"] and new.norm() > 0:
                new = new * (before / new.norm())
            row = new
        x[i] = row
    return x, active


def norm_f64(x, norm_kind, weight, bias, eps, weight_offset, cast_before_weight, dtype):
    """The norm in float64 of rows ``x`` (already in the model dtype)."""
    x = x.double()
    if norm_kind == L.NORM_RMS:
        r = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if weight is None:
            return r
        w = weight.double() + weight_offset
        if cast_before_weight:  # the model rounds r to its dtype before the weight
            r = r.to(dtype).double()
        return r * w
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


# --------------------------------------------------------------------------- checks

def assert_close(actual, expected, tol, what):
    rtol, atol = tol
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten NaN poison?)"
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    if err.numel() and err.max() > 0:
        i = int(err.flatten().argmax())
        raise AssertionError(f"{what}: worst element {i}: got {actual.flatten()[i].item()!r}, "
                             f"expected {expected.flatten()[i].item()!r} (rtol={rtol}, atol={atol})")


def assert_mostly_exact(what, a, b):
    """fp16/bf16 results of both backends round the same float32 values (up to sum
    order) to nearest even, so nearly all elements must agree bit for bit; a rounding
    mode error (e.g. truncation) would still pass a 1-ulp tolerance, not this."""
    if a.dtype == torch.float32:
        return
    frac = (a == b).double().mean().item()
    assert frac >= 0.99, f"{what}: only {frac:.2%} of {a.dtype} elements bitwise equal"


def run_both(h, slot, gate, meta, params, bank, weight=None, bias=None, norm_kind=L.NORM_RMS,
             eps=1e-5, weight_offset=0.0, cast_before_weight=True):
    """Run reference and triton on copies of h; returns {backend: (h after, out)}."""
    results = {}
    for backend in ("reference", "triton"):
        hh = h.clone()
        if norm_kind == L.NORM_NONE:
            ops.steer_(hh, slot, gate, meta, params, bank, backend=backend)
            results[backend] = (hh, None)
        else:
            out = torch.full_like(h, float("nan"))
            ops.steer_norm_(hh, out, slot, gate, meta, params, bank, weight, bias,
                            norm_kind=norm_kind, eps=eps, weight_offset=weight_offset,
                            cast_before_weight=cast_before_weight, backend=backend)
            results[backend] = (hh, out)
    return results


def check_three_way(h, slot, gate, meta, params, bank, weight=None, bias=None,
                    norm_kind=L.NORM_RMS, eps=1e-5, weight_offset=0.0, cast_before_weight=True):
    dtype = h.dtype
    res = run_both(h, slot, gate, meta, params, bank, weight, bias, norm_kind, eps, weight_offset,
                   cast_before_weight)
    (h_ref, out_ref), (h_tri, out_tri) = res["reference"], res["triton"]
    rows = h.view(-1, h.shape[-1])
    x64, active = edits_f64(rows, slot.view(-1), gate.view(-1), meta, params, bank)
    untouched = ~active
    assert active.any(), "test inputs should edit at least one row"
    # rows that are not edited: bitwise unchanged by both backends
    for name, got in (("reference", h_ref), ("triton", h_tri)):
        got = got.view(-1, h.shape[-1])
        assert torch.equal(got[untouched], rows[untouched]), f"{name}: an unedited row was modified"
    assert_close(h_tri, h_ref, TOL_BACKENDS[dtype], f"h triton vs reference ({dtype})")
    assert_mostly_exact("h", h_tri, h_ref)
    assert_close(h_ref.view(-1, h.shape[-1])[active], x64[active], TOL_F64[dtype],
                 f"h reference vs float64 ({dtype})")
    if norm_kind != L.NORM_NONE:
        # the norm of the row each backend stored: a 1-ulp difference in an edited h
        # element (fp32 sum order, then rounding) would otherwise be amplified by the norm
        ref_of_tri = reference_normalize(h_tri.view(-1, h.shape[-1]), norm_kind, weight, bias, eps,
                                         weight_offset, cast_before_weight).view(h.shape)
        assert_close(out_tri, ref_of_tri, TOL_BACKENDS[dtype], f"out triton vs reference ({dtype})")
        assert_mostly_exact("out", out_tri, ref_of_tri)
        expected = norm_f64(h_ref, norm_kind, weight, bias, eps, weight_offset,
                            cast_before_weight, dtype)
        assert_close(out_ref, expected, TOL_F64[dtype], f"out reference vs float64 ({dtype})")
    return res, active


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,n_rows", [(1, 6), (7, 9), (33, 12), (4099, 3)])
def test_all_edits_rmsnorm(dtype, hidden, n_rows):
    gen = torch.Generator().manual_seed(1000 * hidden + DTYPES.index(dtype))
    meta, params, bank = make_tables(gen, hidden)
    slot, gate = make_rows(gen, n_rows, meta.shape[0])
    h = (2 * torch.randn(n_rows, hidden, generator=gen)).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    check_three_way(h, slot, gate, meta, params, bank, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [5, 64, 131])
def test_joint_feature_runs(dtype, hidden):
    """Runs of JOINT feature edits (multi-feature FeatureEdits) between other edits: every
    feature of a run reads the row as the run started, and differs from reading in order."""
    gen = torch.Generator().manual_seed(hidden + 10 * DTYPES.index(dtype))
    n_slots, n_edits, n_rows = 3, 6, 10
    bank = torch.randn(13, hidden, generator=gen)
    bank[0] /= bank[0].norm()
    bank[1:] /= hidden ** 0.5
    meta = torch.full((n_slots, n_edits, 4), -1, dtype=torch.int32)
    params = torch.zeros(n_slots, n_edits, 8)
    # slot 0: clamp, then a 4-feature run, then another feature on its own
    # slot 1: a 3-feature run (first JOINT is ignored at e = 0), add, 2-feature run
    # slot 2: a 6-feature run, all activations and ops
    layouts = [
        [(L.CLAMP, False), (L.FEATURE, False), (L.FEATURE, True), (L.FEATURE, True),
         (L.FEATURE, True), (L.FEATURE, False)],
        [(L.FEATURE, True), (L.FEATURE, True), (L.FEATURE, True), (L.ADD, False),
         (L.FEATURE, False), (L.FEATURE, True)],
        [(L.FEATURE, False)] + [(L.FEATURE, True)] * 5,
    ]
    for s, edits in enumerate(layouts):
        for e, (kind, joint) in enumerate(edits):
            act, fop = (s + e) % 3, (s + 2 * e) % 4
            meta[s, e, 0] = L.pack_code(kind, feature_op=fop, activation=act, joint=joint)
            meta[s, e, 1] = 0 if kind != L.FEATURE else 1 + (s + e) % 6
            meta[s, e, 2] = 7 + (s * 5 + e) % 6
            params[s, e, :4] = torch.tensor([0.3 * (e - 2), 0.2, 1.5 - 0.4 * e, 2.0 + e])
    slot, gate = make_rows(gen, n_rows, n_slots)
    h = (2 * torch.randn(n_rows, hidden, generator=gen)).to(dtype)
    res, active = check_three_way(h, slot, gate, meta, params, bank, None, norm_kind=L.NORM_NONE)
    # the same tables read in order (JOINT dropped) give another result: the bit matters
    in_order = meta.clone()
    in_order[..., 0] &= ~L.JOINT
    x_joint, _ = edits_f64(h.view(-1, hidden), slot, gate, meta, params, bank)
    x_order, _ = edits_f64(h.view(-1, hidden), slot, gate, in_order, params, bank)
    assert (x_joint[active] - x_order[active]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 129])
def test_dyn_scale_edits(dtype, hidden):
    """DYN_SCALE, h <- (p0 + p1 h.u) h with a raw u: alone (factors of both signs), after
    and before other kinds in one slot, with a condition and with PRESERVE_NORM."""
    gen = torch.Generator().manual_seed(400 + hidden + 7 * DTYPES.index(dtype))
    n_rows = 12
    bank = torch.randn(4, hidden, generator=gen)
    bank[1] /= bank[1].norm()                              # CLAMP's unit direction
    bank[0] *= 2.0                                         # raw: |u| ~ 2 sqrt(D)
    inv = 1.0 / float(bank[0].norm())
    pack = L.pack_code
    slots = [
        [(pack(L.DYN_SCALE), 0, -1, -1, [-0.1, 1.5 * inv])],
        [(pack(L.ADD), 2, -1, -1, [0.8]), (pack(L.DYN_SCALE), 0, -1, -1, [0.6, -inv]),
         (pack(L.CLAMP), 1, -1, -1, [1.2]),
         (pack(L.FEATURE, feature_op=L.FEAT_ADD, activation=L.ACT_LINEAR), 2, 3, -1,
          [0.1, 0.0, 0.5])],
        [(pack(L.DYN_SCALE, condition=L.COND_PROJ), 0, -1, 3, [1.4, 0.5 * inv, 0, 0, 0.0, 0.0]),
         (pack(L.DYN_SCALE, preserve_norm=True), 2, -1, -1, [-0.2, 0.7 / float(bank[2].norm())])],
    ]
    meta = torch.full((3, 4, 4), -1, dtype=torch.int32)
    meta[..., 0] = 0
    params = torch.zeros(3, 4, 8)
    for s, edits in enumerate(slots):
        for e, (code, iu, iw, ic, p) in enumerate(edits):
            meta[s, e] = torch.tensor([code, iu, iw, ic])
            params[s, e, :len(p)] = torch.tensor(p)
    slot, gate = make_rows(gen, n_rows, 3)
    slot[3:] = torch.arange(3, n_rows, dtype=torch.int32) % 3
    h = (2 * torch.randn(n_rows, hidden, generator=gen)).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    _, active = check_three_way(h, slot, gate, meta, params, bank, weight)
    check_three_way(h, slot, gate, meta, params, bank, None, norm_kind=L.NORM_NONE)
    factor = params[0, 0, 0] + params[0, 0, 1] * (h.float() @ bank[0])
    lone = active & (slot == 0)
    if hidden > 1:
        assert (factor[lone] < 0).any() and (factor[lone] > 0).any(), "want both signs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conditions_both_pass_and_fail(dtype):
    """Each condition kind both applies and skips its edit on some row."""
    gen = torch.Generator().manual_seed(7)
    hidden, n_rows = 33, 16
    bank = torch.randn(2, hidden, generator=gen)
    h = torch.randn(n_rows, hidden, generator=gen)
    h[::2] += 3 * bank[1]                            # half the rows lean towards c
    h = h.to(dtype)
    meta = torch.zeros(2, 1, 4, dtype=torch.int32)
    params = torch.zeros(2, 1, 8)
    meta[0, 0] = torch.tensor([L.pack_code(L.ADD, condition=L.COND_COSINE), 0, -1, 1])
    meta[1, 0] = torch.tensor([L.pack_code(L.ADD, condition=L.COND_PROJ), 0, -1, 1])
    params[:, 0, 0] = 5.0
    params[0, 0, 4] = 0.3                            # cosine >= 0.3
    params[1, 0, 4], params[1, 0, 5] = 40.0, 2.0     # h.c + 2 >= 40
    slot = torch.arange(n_rows, dtype=torch.int32) % 4 // 2   # 0, 0, 1, 1, ...
    gate = torch.ones(n_rows, dtype=torch.uint8)
    res, _ = check_three_way(h, slot, gate, meta, params, bank, None)
    changed = (res["triton"][0] != h).any(-1)
    for s in (0, 1):
        rows = slot == s
        assert changed[rows].any() and not changed[rows].all(), f"slot {s}: condition never split"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["llama", "gemma", "olmo2", "offset_cast", "no_weight"])
def test_rmsnorm_variants(dtype, variant):
    gen = torch.Generator().manual_seed(11 + len(variant))
    hidden, n_rows = 45, 7
    meta, params, bank = make_tables(gen, hidden, n_slots=2, n_edits=3)
    slot, gate = make_rows(gen, n_rows, 2)
    h = torch.randn(n_rows, hidden, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(hidden, generator=gen)).to(dtype)
    offset, cast = {"llama": (0.0, True), "gemma": (1.0, False), "olmo2": (0.0, False),
                    "offset_cast": (1.0, True), "no_weight": (0.0, True)}[variant]
    check_three_way(h, slot, gate, meta, params, bank, None if variant == "no_weight" else weight,
                    eps=1e-6, weight_offset=offset, cast_before_weight=cast)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "bias", "none"])
def test_layernorm(dtype, affine):
    gen = torch.Generator().manual_seed(23 + len(affine))
    hidden, n_rows = 37, 8
    meta, params, bank = make_tables(gen, hidden, n_slots=3, n_edits=4)
    slot, gate = make_rows(gen, n_rows, 3)
    h = (torch.randn(n_rows, hidden, generator=gen) + 0.5).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    bias = (0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    check_three_way(h, slot, gate, meta, params, bank,
                    weight if "weight" in affine else None, bias if "bias" in affine else None,
                    norm_kind=L.NORM_LAYER, eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steer_only_bool_gate_3d(dtype):
    """steer_ (NORM_NONE): edit only, [B, T, D] input, bool gates."""
    gen = torch.Generator().manual_seed(31)
    hidden = 19
    meta, params, bank = make_tables(gen, hidden)
    slot, gate = make_rows(gen, 2 * 5, meta.shape[0], gate_dtype=torch.bool)
    h = torch.randn(2, 5, hidden, generator=gen).to(dtype)
    check_three_way(h, slot.view(2, 5), gate.view(2, 5), meta, params, bank,
                    norm_kind=L.NORM_NONE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["no_slots", "no_edits"])
def test_empty_tables_is_plain_norm(dtype, shape):
    gen = torch.Generator().manual_seed(41)
    hidden, n_rows = 29, 5
    meta = torch.zeros(*shape, 4, dtype=torch.int32)
    params = torch.zeros(*shape, 8)
    bank = torch.zeros(0, hidden)
    h = torch.randn(n_rows, hidden, generator=gen).to(dtype)
    slot = torch.full((n_rows,), -1, dtype=torch.int32)
    if shape[0]:
        slot[::2] = 0                                # slotted, but the slot has no edits
    gate = torch.ones(n_rows, dtype=torch.uint8)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    res = run_both(h, slot, gate, meta, params, bank, weight)
    for backend, (hh, out) in res.items():
        assert torch.equal(hh, h), f"{backend}: h modified with empty tables"
    assert_close(res["triton"][1], res["reference"][1], TOL_BACKENDS[dtype], "plain norm")
    assert_close(res["reference"][1], norm_f64(h, L.NORM_RMS, weight, None, 1e-5, 0.0, True, dtype),
                 TOL_F64[dtype], "plain norm vs float64")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_and_out_of_range_slot(dtype):
    """Row strides wider than D (a column slice) and slot >= S (unvalidated) are handled;
    the columns between rows are never written."""
    gen = torch.Generator().manual_seed(53)
    hidden, n_rows = 33, 6
    meta, params, bank = make_tables(gen, hidden, n_slots=3, n_edits=5)
    slot, gate = make_rows(gen, n_rows, 3)
    slot[3], gate[3] = 3 + 2, 1                       # out of range: untouched, not an error
    base = torch.randn(n_rows, hidden + 7, generator=gen).to(dtype)
    out_base = torch.full((n_rows, hidden + 3), float("nan"), dtype=dtype)
    h, out = base[:, :hidden], out_base[:, :hidden]
    # slot >= S is refused by the public op: the carriers' entry point takes it
    expected_h, expected_out = ops._steer_norm_fast(h, slot, gate, meta, params, bank, None,
                                                    norm_kind=L.NORM_RMS)
    before = base.clone()
    steer_norm_triton(h, out, slot, gate, meta, params, bank, None, None, L.NORM_RMS, 1e-6, 0.0,
                      True)
    assert torch.equal(base[:, hidden:], before[:, hidden:]), "wrote past D into the row padding"
    assert torch.isnan(out_base[:, hidden:]).all(), "wrote past D into out's row padding"
    assert torch.equal(h[3], before[3, :hidden]), "slot >= S edited a row"
    assert_close(h, expected_h, TOL_BACKENDS[dtype], "strided h")
    assert_close(out, expected_out, TOL_BACKENDS[dtype], "strided out")


def test_kernel_constants_mirror_the_layout():
    """The kernel module imports nothing from fasteer: its copies of the layout's
    numbers must stay equal to the contract."""
    pairs = {"KIND_NONE": L.NONE, "KIND_ADD": L.ADD, "KIND_CLAMP": L.CLAMP,
             "KIND_ABLATE": L.ABLATE, "KIND_SCALE": L.SCALE, "KIND_FEATURE": L.FEATURE,
             "KIND_DYN_SCALE": L.DYN_SCALE,
             "FEAT_ADD": L.FEAT_ADD, "FEAT_SET": L.FEAT_SET, "FEAT_SCALE": L.FEAT_SCALE,
             "ACT_RELU": L.ACT_RELU, "ACT_JUMPRELU": L.ACT_JUMPRELU, "COND_NONE": L.COND_NONE,
             "COND_COSINE": L.COND_COSINE, "PRESERVE_NORM": L.PRESERVE_NORM, "JOINT": L.JOINT,
             "NORM_NONE": L.NORM_NONE, "NORM_RMS": L.NORM_RMS, "NORM_LAYER": L.NORM_LAYER,
             "META_WIDTH": L.META_WIDTH, "PARAM_WIDTH": L.PARAM_WIDTH}
    for name, value in pairs.items():
        assert getattr(_kernels, name).value == value, name
    # the kernel's fall-through branches stand for the last value of each field
    assert L.FEAT_CLAMP == 3 and L.ACT_LINEAR == 2 and L.COND_PROJ == 2


def test_too_wide_rows_raise_before_writing():
    hidden = _kernels.MAX_BLOCK_D + 1
    h = torch.ones(1, hidden)
    out = torch.full_like(h, float("nan"))
    meta, params = torch.zeros(0, 0, 4, dtype=torch.int32), torch.zeros(0, 0, 8)
    with pytest.raises(ValueError, match="D up to"):
        ops.steer_norm_(h, out, torch.full((1,), -1, dtype=torch.int32), torch.ones(1, dtype=torch.uint8),
                        meta, params, torch.zeros(0, hidden), backend="triton")
    assert torch.isnan(out).all() and bool((h == 1).all())


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, sys.argv[1])
    from fasteer.ops.triton import kernels_module
    k = kernels_module("steer_norm").steer_norm_kernel
    types = {"h_ptr": "*{dt}", "out_ptr": "*{dt}", "slot_ptr": "*i32", "gate_ptr": "*u8",
             "meta_ptr": "*i32", "params_ptr": "*fp32", "bank_ptr": "*fp32",
             "weight_ptr": "*{dt}", "bias_ptr": "*{dt}", "add_ptr": "*{dt}", "D": "i32",
             "stride_h": "i64", "stride_out": "i64", "stride_add": "i64", "n_slots": "i32",
             "n_edits": "i32", "eps": "fp32", "weight_offset": "fp32"}
    aligned = ["h_ptr", "out_ptr", "slot_ptr", "gate_ptr", "meta_ptr", "params_ptr", "bank_ptr",
               "weight_ptr", "bias_ptr", "add_ptr", "D", "stride_h", "stride_out", "stride_add"]
    report = []
    for dt, block, norm, cap, warps, addend in json.loads(sys.argv[2]):
        const = {"BLOCK_D": block, "NORM_KIND": norm, "HAS_EDITS": True, "HAS_WEIGHT": True,
                 "HAS_BIAS": norm == 2, "CAST_BEFORE_WEIGHT": True, "SOFT_BF16": False,
                 "HAS_ADDEND": addend}
        sig = {n: t.format(dt=dt) for n, t in types.items()}
        sig.update({n: "constexpr" for n in const})
        try:
            src = ASTSource(fn=k, signature=sig,
                            constexprs={(k.arg_names.index(n),): v for n, v in const.items()},
                            attrs={(k.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        except TypeError as exc:  # a Triton whose internal compile API differs
            print(json.dumps({"api": str(exc)})); sys.exit(0)
        c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
        ptx = c.asm["ptx"]
        report.append({"case": [dt, block, norm, cap], "v4_loads": ptx.count("ld.global.v4"),
                       "local": ptx.count(".local")})
    print(json.dumps({"report": report}))
""")


def test_kernel_compiles_for_gpus(tmp_path):
    """The interpreter runs Python and does not type-check the kernel (branch types, loop
    carried values): compile it for sm_80 and sm_90 here (no GPU needed), and check that
    rows of D % 16 == 0 get 16-byte loads and no local-memory spills at D <= 8192, with
    and without the add-first path (HAS_ADDEND, `add_steer_norm_`)."""
    pytest.importorskip("triton.backends.nvidia")
    from fasteer.ops.triton.steer_norm import _num_warps
    cases = [(dt, block, norm, cap, _num_warps(block), addend)
             for dt, block, norm, cap, addend in [
                 ("bf16", 4096, L.NORM_RMS, 80, False), ("fp16", 8192, L.NORM_LAYER, 90, False),
                 ("fp32", 2048, L.NORM_NONE, 90, False), ("bf16", 1024, L.NORM_RMS, 90, False),
                 ("fp32", 1, L.NORM_LAYER, 80, False), ("bf16", 4096, L.NORM_RMS, 90, True),
                 ("fp16", 8192, L.NORM_RMS, 80, True), ("fp32", 1, L.NORM_LAYER, 90, True)]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, repo, json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "api" in result:
        pytest.skip(f"this Triton's compile API differs ({result['api']})")
    for entry in result["report"]:
        if entry["case"][1] >= 1024:  # rows too short give each thread < 16 bytes
            assert entry["v4_loads"] > 0, f"{entry['case']}: no 16-byte loads"
        assert entry["local"] == 0, f"{entry['case']}: local memory (spills) at a small D"
