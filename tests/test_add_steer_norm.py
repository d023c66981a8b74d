"""The fused add+steer+norm op (`fasteer.ops.add_steer_norm_`), in every backend.

Per row: h <- round(h + x) (every row: the model's own residual add), then steer_norm_'s
edits on that sum (conditions read it), then out <- norm(h). Checked here:

* the reference against a float64 computation (the steer_oracle run on the sum, which
  for these dtypes is exactly round(h + x): checked too);
* cpu, triton (interpreter) and cuda (the emulated kernel of test_cuda_build, driven
  through the public op) against the reference and float64, on fresh random inputs: odd D,
  1 / 3 / 17 rows, every dtype, slot -1 and gate 0 rows mixed in, every edit kind with
  conditions, JOINT feature runs, every norm variant, padded / misaligned x, and every
  CUDA kernel shape (warp rows, block rows, loop kernel, aligned or not);
* rows without edits: h is round(h + x) bit for bit and out is the model's norm of it
  (Hugging Face's own modules);
* per backend, add_steer_norm_(h, x) is bit for bit ``h = round(h + x); steer_norm_(h)``:
  the add is a prologue of the same kernel, the rest of the op is unchanged, and
  steer_norm_ without x still never writes a row it does not edit;
* bad x / aliasing arguments raise before anything is written;
* torch.compile(fullgraph=True) sees one opaque op, and a new alpha reuses the graph.

``out`` is poisoned with NaN before every call.
"""
from __future__ import annotations

import pytest
import torch

import fasteer.ops as ops
from fasteer.ops import dispatch
from fasteer.ops import layout as L
from fasteer.ops.reference.add_steer_norm import add_rows
from fasteer.ops.reference.add_steer_norm import add_steer_norm as reference
from steer_oracle import NORMS, assert_rows_close, oracle, random_case, skipped_rows_case
from test_cuda_build import emulated, emulated_lib, strided_rows  # noqa: F401 (fixtures)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("reference", "cpu", "triton", "cuda")
# D never a multiple of 4 or 8 (no 16-byte path) except where a launch needs it below
SHAPES = [(1, 1), (1, 7), (3, 33), (17, 65), (3, 4099)]
NORM_NAMES = [name for name in sorted(NORMS) if name != "none"]
KEYS = ("slot", "gate", "meta", "params", "bank", "weight", "bias", "norm_kind", "eps",
        "weight_offset", "cast_before_weight")
NAN = float("nan")


def dtype_id(t):
    return str(t).split(".")[-1]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A backend name for `ops.add_steer_norm_(..., backend=name)`. 'cuda' runs the
    emulated CUDA kernel: dispatch is told to pick it for CPU tensors, and the cuda
    launcher is routed to the emulation (test_cuda_build's `emulated` fixture)."""
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        from fasteer.ops.triton import kernels_module
        kernels = kernels_module("steer_norm")
        if type(kernels.steer_norm_kernel).__name__ != "InterpretedFunction":
            pytest.fail("the triton kernels were imported without TRITON_INTERPRET=1 "
                        "(tests/conftest.py sets it before any import)")
    if name == "cuda":
        request.getfixturevalue("emulated")
        pick_cuda_for_cpu_tensors(monkeypatch)
    return name


def pick_cuda_for_cpu_tensors(monkeypatch):
    """Let dispatch run backend 'cuda' on CPU tensors: with the `emulated` fixture the
    cuda launcher calls the emulated kernel, so the whole public op path is exercised."""
    real = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve",
                        lambda b, dev, n: "cuda" if b == "cuda" else real(b, dev, n))


# --------------------------------------------------------------------------- inputs and checks

def make_case(seed, n, d, dtype, norm, n_slots=3, n_edits=3, kinds=None, with_conditions=True):
    """steer_oracle's random case (row 0 edited; other rows get slot -1, gate 0 or an
    edited slot at random) plus the addend x: fresh random rows of varied scale."""
    case = random_case(seed, n, d, n_slots, n_edits, dtype, norm, kinds, with_conditions,
                       edit_first_row=True)
    gen = torch.Generator().manual_seed(seed + 7919)
    case["x"] = (torch.randn(n, d, generator=gen)
                 * (0.5 + 2 * torch.rand(n, 1, generator=gen))).to(dtype)
    if n > 2:  # always some rows that are not edited, whatever the draw
        case["slot"][1], case["gate"][1] = -1, 1
        case["slot"][2], case["gate"][2] = (0 if n_slots else -1), 0
    return case


def run(backend, case, x_offset=0, x_pad=0, h_offset=0, h_pad=0):
    """One add_steer_norm_ call on copies (h and x possibly padded / misaligned views);
    returns (h after, out). x must come back untouched."""
    h = strided_rows(case["h"], h_offset, h_pad)
    x = strided_rows(case["x"], x_offset, x_pad)
    x_before = x.clone()
    out = torch.full_like(case["h"], NAN)                      # poisoned
    result = ops.add_steer_norm_(h, x, out, *[case[k] for k in KEYS[:7]],
                                 norm_kind=case["norm_kind"], eps=case["eps"],
                                 weight_offset=case["weight_offset"],
                                 cast_before_weight=case["cast_before_weight"], backend=backend)
    assert result is out
    assert torch.equal(x, x_before), "x was written"
    return h, out


def inactive_rows(case):
    return (case["gate"] == 0) | (case["slot"] < 0) | (case["slot"] >= case["meta"].shape[0])


def check(case, h_new, out):
    """Rows without edits: exactly round(h + x). Every row away from a threshold: h and
    out vs the reference and vs float64 (the oracle on the sum)."""
    dtype = case["h"].dtype
    summed = add_rows(case["h"], case["x"])
    args = [case[k] for k in KEYS]
    h_ref, out_ref = reference(case["h"], case["x"], *args)
    h64, out64, margins = oracle(summed, *args)
    inactive = inactive_rows(case)
    assert torch.equal(h_new[inactive], summed[inactive]), "rows without edits: not h + x"
    n = case["h"].shape[0]
    rows = [r for r, m in enumerate(margins) if m > 1e-3]
    assert len(rows) >= max(1, n // 2), "too few rows away from a threshold: change the seed"
    scale = [float(summed[r].double().abs().max() + h64[r].abs().max()) for r in range(n)]
    assert_rows_close(h_new, h_ref, dtype, rows, "h vs reference", scale)
    assert_rows_close(h_new, h64, dtype, rows, "h vs float64", scale)
    assert not torch.isnan(out).any(), "out: some elements were not written"
    assert_rows_close(out, out_ref, dtype, rows, "out vs reference")
    assert_rows_close(out, out64, dtype, rows, "out vs float64")


# --------------------------------------------------------------------------- the math

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_float32_sum_is_the_correctly_rounded_sum(dtype):
    """round(h + x) as every backend forms it (float32 sum, one rounding) equals the exact
    sum rounded once, so the float64 checks below compare against the true value."""
    gen = torch.Generator().manual_seed(1)
    e = 4 if dtype == torch.float16 else 6   # float16 overflows past 65504
    scales = torch.logspace(-e, e, 1 << 16)
    h = (torch.randn(1 << 16, generator=gen) * scales).to(dtype)
    # x: every magnitude against every other, and near-cancelling pairs
    x = (torch.randn(1 << 16, generator=gen) * scales[torch.randperm(1 << 16, generator=gen)])
    x[::4] = -h[::4].float() * (1 + 1e-3 * torch.randn(1 << 14, generator=gen))
    x = x.to(dtype)
    assert torch.isfinite(h).all() and torch.isfinite(x).all()
    assert torch.equal(add_rows(h, x), (h.double() + x.double()).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("norm", NORM_NAMES)
def test_reference_matches_float64(dtype, n, d, norm):
    case = make_case(100 * d + n, n, d, dtype, norm)
    check(case, *run("reference", case))


# --------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d", SHAPES)
def test_backend_matches_reference_and_float64(backend, dtype, n, d):
    norm = NORM_NAMES[(SHAPES.index((n, d)) + DTYPES.index(dtype)) % len(NORM_NAMES)]
    case = make_case(31 * d + n, n, d, dtype, norm)
    check(case, *run(backend, case))


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_backend_norm_variants(backend, norm):
    case = make_case(17, 17, 33, torch.bfloat16, norm)
    check(case, *run(backend, case))


EDIT_KINDS = {"add": [L.ADD], "clamp": [L.CLAMP], "ablate": [L.ABLATE], "scale": [L.SCALE],
              "feature": [L.FEATURE], "joint_features": [L.FEATURE, L.FEATURE, L.FEATURE, L.ADD]}


@pytest.mark.parametrize("kinds", EDIT_KINDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_backend_every_edit_kind_with_conditions(backend, kinds, dtype):
    """Slots made of one edit kind (FEATURE: every op and activation; JOINT runs), about
    two in three edits with a cosine or projection condition, some with preserve_norm."""
    n_edits = 5 if kinds == "joint_features" else 3
    case = make_case(len(kinds) * 13, 17, 33, dtype, "rms_llama", n_edits=n_edits,
                     kinds=EDIT_KINDS[kinds])
    codes = case["meta"][..., L.M_CODE]
    assert bool(((codes & 0xFF) == EDIT_KINDS[kinds][0]).any())
    if kinds == "joint_features":
        assert bool(((codes & L.JOINT) != 0).any()), "no JOINT run drawn: change the seed"
    check(case, *run(backend, case))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backend_padded_and_misaligned_rows(backend, dtype):
    """h and x with their own row strides and offsets (x's row stride is passed apart)."""
    case = make_case(5, 6, 40, dtype, "layer")
    check(case, *run(backend, case, x_offset=1, x_pad=5, h_offset=3, h_pad=2))


def test_backend_empty_tables_are_add_then_norm(backend):
    """No slots or no edits: h + x on every row and its norm, the tables never read."""
    for n_slots, n_edits in ((0, 3), (2, 0)):
        case = make_case(9, 5, 24, torch.bfloat16, "rms_gemma", n_slots=n_slots, n_edits=n_edits)
        h_new, out = run(backend, case)
        assert torch.equal(h_new, add_rows(case["h"], case["x"]))
        check(case, h_new, out)


def test_cpu_many_rows_split_across_threads():
    """Prefill-sized work is split across the CPU module's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(1234, 700, 257, torch.bfloat16, "rms_llama")
        h_new, out = run("cpu", case)
    finally:
        torch.set_num_threads(before)
    check(case, h_new, out)


# (n, d, x offset, x pad, launch the emulation must report): every kernel shape, and the
# 16-byte path decided with x's alignment and stride too
CUDA_SHAPES = [
    (5, 7, 1, 0, "ALIGNED = false; bool WARP_ROWS = true"),
    (9, 64, 0, 8, "ALIGNED = true; bool WARP_ROWS = true"),
    (3, 1000, 0, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (3, 4099, 0, 0, "ALIGNED = false; bool WARP_ROWS = false"),
    (2, 8192, 1, 0, "ALIGNED = false; bool WARP_ROWS = false"),   # only x misaligned
    (2, 8192, 0, 0, "ALIGNED = true; bool WARP_ROWS = false"),
    (1, 16400, 0, 0, "launch_typed"),                             # the loop kernel
    (2, 16401, 1, 3, "launch_typed"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,d,x_offset,x_pad,launch", CUDA_SHAPES,
                         ids=[f"{c[0]}x{c[1]}-xoff{c[2]}" for c in CUDA_SHAPES])
def test_cuda_kernel_shapes_emulated(emulated, monkeypatch, dtype, n, d, x_offset, x_pad,
                                     launch):
    pick_cuda_for_cpu_tensors(monkeypatch)
    case = make_case(d + n, n, d, dtype, "rms_llama")
    h_new, out = run("cuda", case, x_offset=x_offset, x_pad=x_pad)
    assert launch in emulated.last_kernel(), emulated.last_kernel()
    check(case, h_new, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the kernels "
                    "run under emulation and the interpreter above)")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_gpu_backends_on_a_gpu(gpu_backend):
    """The same checks with the compiled kernels on a GPU (every dtype, the shapes above
    and the loop kernel's), x one element into its storage for odd D (no 16-byte path)."""
    if gpu_backend == "triton":
        pytest.importorskip("triton")
    for dtype in DTYPES:
        for n, d in SHAPES + [(2, 8192), (2, 16401)]:
            case = make_case(7 * d + n, n, d, dtype, "rms_llama" if d % 2 else "layer")
            dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
            offset = d % 2
            x = torch.empty(n * d + offset, dtype=dtype, device="cuda")[offset:].view(n, d)
            x.copy_(dev["x"])
            out = torch.full_like(dev["h"], NAN)
            ops.add_steer_norm_(dev["h"], x, out, *[dev[k] for k in KEYS[:7]],
                                norm_kind=case["norm_kind"], eps=case["eps"],
                                weight_offset=case["weight_offset"],
                                cast_before_weight=case["cast_before_weight"],
                                backend=gpu_backend)
            torch.cuda.synchronize()
            check(case, dev["h"].cpu(), out.cpu())


# --------------------------------------------------------------------------- rows without edits

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_without_edits_are_the_sum_and_the_models_norm(backend, dtype):
    """Rows with slot -1 or gate 0, next to edited rows: h = round(h + x) exactly, and out
    is what the model's own norm module computes from that sum."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d, n = 48, 6
    # edits that always change the row (no conditions, no NONE): row 0 must differ
    case = make_case(3, n, d, dtype, "rms_llama", kinds=[L.ADD, L.CLAMP, L.SCALE],
                     with_conditions=False)
    case["slot"] = torch.tensor([0, -1, 1, -1, 2, 0], dtype=torch.int32)
    case["gate"] = torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.uint8)
    plain = torch.tensor([False, True, True, True, False, False])
    summed = add_rows(case["h"], case["x"])
    llama, gemma = LlamaRMSNorm(d, eps=1e-6).to(dtype), GemmaRMSNorm(d, eps=1e-6).to(dtype)
    layer = torch.nn.LayerNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        for mod in (llama, gemma, layer):
            mod.weight.normal_(0.2, 0.5, generator=torch.Generator().manual_seed(4))
        layer.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    variants = [
        ("llama", llama, dict(norm_kind=L.NORM_RMS, eps=1e-6), None),
        ("gemma", gemma, dict(norm_kind=L.NORM_RMS, eps=1e-6, weight_offset=1.0,
                              cast_before_weight=False), None),
        ("layer", layer, dict(norm_kind=L.NORM_LAYER, eps=1e-5), layer.bias),
    ]
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    for name, mod, kw, bias in variants:
        h = case["h"].clone()
        out = torch.full_like(h, NAN)
        with torch.no_grad():
            expected = mod(summed)
            ops.add_steer_norm_(h, case["x"], out, *[case[k] for k in KEYS[:5]],
                                mod.weight.detach(), None if bias is None else bias.detach(),
                                backend=backend, **kw)
        assert torch.equal(h[plain], summed[plain]), name
        assert not torch.equal(h[0], summed[0]), f"{name}: row 0 should be edited"
        err = ((out[plain].double() - expected[plain].double()).abs()
               / (expected[plain].double().abs() + 1)).max()
        assert err <= tol, f"{name}: {err}"
        if backend == "reference" and name != "layer":
            # the reference writes the norms as the modules do: bit for bit
            assert torch.equal(out[plain], expected[plain]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_same_as_adding_first_then_steer_norm_bit_for_bit(backend, dtype):
    """The add is a prologue of the same kernel: per backend, the fused op equals
    ``h = round(h + x)`` followed by steer_norm_ on that h, bit for bit (h and out)."""
    for n, d, norm in ((17, 65, "rms_llama"), (3, 4099, "layer")):
        case = make_case(n * d, n, d, dtype, norm)
        h_fused, out_fused = run(backend, case)
        h_two = add_rows(case["h"], case["x"])
        out_two = torch.full_like(h_two, NAN)
        ops.steer_norm_(h_two, out_two, *[case[k] for k in KEYS[:7]],
                        norm_kind=case["norm_kind"], eps=case["eps"],
                        weight_offset=case["weight_offset"],
                        cast_before_weight=case["cast_before_weight"], backend=backend)
        assert torch.equal(h_fused, h_two), (n, d)
        assert torch.equal(out_fused, out_two), (n, d)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaNs
@pytest.mark.parametrize("which", ["cpu", "triton", "cuda"])
def test_steer_norm_without_x_still_leaves_unedited_rows_unwritten(which, request,
                                                                   monkeypatch):
    """steer_norm_ is unchanged by the add path: a row it does not edit is not stored
    (each row holds a float16 NaN with a payload, which a store through float32 would
    quiet or make canonical: any change of bits shows a write)."""
    if which == "triton":
        pytest.importorskip("triton")
    if which == "cuda":
        request.getfixturevalue("emulated")
        pick_cuda_for_cpu_tensors(monkeypatch)
    h, meta, params, bank, slot = skipped_rows_case(40)
    before = h.clone()
    out = torch.full_like(h, NAN)
    ops.steer_norm_(h, out, slot, torch.ones(3, dtype=torch.uint8), meta, params, bank,
                    norm_kind=L.NORM_RMS, eps=1e-5, backend=which)
    bits, old = h.view(torch.int16), before.view(torch.int16)
    assert torch.equal(bits[0], old[0]), "row 0: its only edit was skipped, it must not be written"
    assert torch.equal(bits[2], old[2]), "row 2: slot -1, it must not be written"
    assert not torch.equal(bits[1], old[1]), "row 1 is edited"


# --------------------------------------------------------------------------- conditions

def test_backend_conditions_read_the_summed_row(backend):
    """A condition that holds for h + x but not for h alone applies its edit; one that
    holds for h alone but not for h + x does not (cosine and projection)."""
    gen = torch.Generator().manual_seed(11)
    n, d = 8, 33
    c = torch.randn(d, generator=gen)
    c /= c.norm()
    bank = torch.stack([torch.randn(d, generator=gen), c, -c])
    h = torch.randn(n, d, generator=gen) * 0.3 - 4 * c            # h . c ~ -4
    x = torch.randn(n, d, generator=gen) * 0.3 + 8 * c            # (h + x) . c ~ +4
    meta = torch.tensor([
        [[L.pack_code(L.ADD, condition=L.COND_PROJ), 0, -1, 1]],     # (h+x).c >= 2: yes
        [[L.pack_code(L.ADD, condition=L.COND_PROJ), 0, -1, 2]],     # (h+x).(-c) >= 2: no
        [[L.pack_code(L.ADD, condition=L.COND_COSINE), 0, -1, 1]],   # cos(h+x, c) >= .5: yes
        [[L.pack_code(L.ADD, condition=L.COND_COSINE), 0, -1, 2]],   # cos(h+x, -c) >= .5: no
    ], dtype=torch.int32)
    params = torch.zeros(4, 1, 8)
    params[:, 0, L.P_A] = 3.0
    params[:2, 0, L.P_COND_THRESH] = 2.0
    params[2:, 0, L.P_COND_THRESH] = 0.5
    slot = torch.arange(n, dtype=torch.int32) % 4
    case = dict(h=h, x=x, slot=slot, gate=torch.ones(n, dtype=torch.uint8), meta=meta,
                params=params, bank=bank, weight=None, bias=None, norm_kind=L.NORM_RMS,
                eps=1e-6, weight_offset=0.0, cast_before_weight=True)
    h_new, out = run(backend, case)
    summed = h + x
    edited = (h_new != summed).any(-1)
    assert edited.tolist() == [True, False, True, False] * 2
    assert torch.allclose(h_new[slot % 2 == 0], summed[slot % 2 == 0] + 3.0 * bank[0], atol=1e-5)
    check(case, h_new, out)


# --------------------------------------------------------------------------- bad input

def good(n=4, d=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    meta = torch.full((2, 1, 4), -1, dtype=torch.int32)
    meta[:, :, 0] = L.ADD
    meta[:, :, 1] = 0
    return dict(h=torch.randn(n, d, generator=gen).to(dtype),
                x=torch.randn(n, d, generator=gen).to(dtype),
                out=torch.full((n, d), NAN, dtype=dtype),
                slot=torch.zeros(n, dtype=torch.int32), gate=torch.ones(n, dtype=torch.uint8),
                meta=meta, params=torch.ones(2, 1, 8), bank=torch.randn(3, d, generator=gen),
                weight=torch.ones(d, dtype=dtype), norm_kind=L.NORM_RMS)


def _overlapping(first, second):
    """Mutator: `first` and `second` become [4, 8] views of one storage, 4 elements apart
    (different data pointers, shared elements)."""
    def mutate(a):
        store = torch.randn(36, generator=torch.Generator().manual_seed(2))
        a.update({first: store[:32].view(4, 8), second: store[4:].view(4, 8)})
    return mutate


BAD = {
    "x shape": (lambda a: a.update(x=torch.randn(4, 7)), ValueError, r"x: expected shape \(4, 8\)"),
    "x rows": (lambda a: a.update(x=torch.randn(2, 2, 8)), ValueError, "x: expected shape"),
    "x dtype": (lambda a: a.update(x=a["x"].half()), TypeError, "x: expected dtype torch.float32"),
    "x float64": (lambda a: a.update(x=a["x"].double()), TypeError, "x: expected dtype in"),
    "x device": (lambda a: a.update(x=torch.randn(4, 8, device="meta")), ValueError,
                 "x: expected device cpu"),
    "x not a tensor": (lambda a: a.update(x=a["x"].tolist()), TypeError, "x: expected a torch.Tensor"),
    "x last stride": (lambda a: a.update(x=torch.randn(8, 4).t()), ValueError,
                      r"x: the last dimension must be contiguous"),
    "x not viewable as rows": (lambda a: a.update(h=torch.randn(2, 3, 8), out=torch.empty(2, 3, 8),
                                                  x=torch.randn(3, 2, 8).transpose(0, 1),
                                                  slot=torch.zeros(6, dtype=torch.int32),
                                                  gate=torch.ones(6, dtype=torch.uint8)),
                               ValueError, r"x: must be viewable as \[N, 8\]"),
    "x is h": (lambda a: a.update(x=a["h"]), ValueError, "x: must not alias h"),
    "x overlaps h": (_overlapping("h", "x"), ValueError, "x: must not alias h"),
    "out is h": (lambda a: a.update(out=a["h"]), ValueError, "out: must not alias h"),
    "out overlaps h": (_overlapping("out", "h"), ValueError, "out: must not alias h"),
    "out overlaps x": (_overlapping("x", "out"), ValueError, "out: must not alias x"),
    "out is x": (lambda a: a.update(out=a["x"]), ValueError, "out: must not alias x"),
    "no norm": (lambda a: a.update(norm_kind=L.NORM_NONE), ValueError,
                "norm_kind: add_steer_norm_ needs a norm"),
    "out dtype": (lambda a: a.update(out=a["out"].half()), TypeError, "out"),
    "bad table": (lambda a: a["meta"].__setitem__((0, 0, 1), 3), ValueError, "meta"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_before_writing(name):
    mutate, exc, match = BAD[name]
    a = good()
    mutate(a)
    snapshots = {k: a[k].clone() for k in ("h", "x", "out")
                 if isinstance(a[k], torch.Tensor) and a[k].device.type == "cpu"}
    with pytest.raises(exc, match=match):
        ops.add_steer_norm_(a["h"], a["x"], a["out"], a["slot"], a["gate"], a["meta"],
                            a["params"], a["bank"], a["weight"], norm_kind=a["norm_kind"],
                            backend="cpu")
    for k, before in snapshots.items():
        assert torch.equal(a[k].nan_to_num(), before.nan_to_num()), f"{k} written before the error"


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_compile_fullgraph_one_opaque_op_and_alpha_reuses_the_graph(backend_name):
    """fullgraph=True raises on any graph break; the traced graph holds the library op
    (not its Python body), the compiled step equals eager bit for bit, and new values in
    the tables (updated in place, as Steerer.set does) reuse the compiled graph."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    case = make_case(21, 5, 24, torch.bfloat16, "rms_llama")
    args = [case[k] for k in KEYS[:6]]      # slot .. bank, weight (no bias for RMSNorm)

    def step(h, x, out, slot, gate, meta, params, bank, weight):
        # what a vLLM-style host does: residual add + steer + norm, then the next layer
        ops._add_steer_norm_fast_(h, x, out, slot, gate, meta, params, bank, weight,
                                  norm_kind=L.NORM_RMS, eps=1e-5, backend=backend_name)
        return out * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    for alpha_scale in (1.0, -2.5):
        case["params"][..., L.P_A] *= alpha_scale           # in place: same tensors
        h_c, out_c = case["h"].clone(), torch.full_like(case["h"], NAN)
        h_e, out_e = case["h"].clone(), torch.full_like(case["h"], NAN)
        got = compiled(h_c, case["x"], out_c, *args)
        want = step(h_e, case["x"], out_e, *args)
        assert torch.equal(h_c, h_e) and torch.equal(out_c, out_e) and torch.equal(got, want)
        check(case, h_c, out_c)
    assert len(graphs) == 1, "new table values recompiled"
    op = torch.ops.fasteer.add_steer_norm_
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(t in (op, op.default) for t in targets) == 1, targets
