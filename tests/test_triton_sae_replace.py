"""The Triton full-SAE replace, run by Triton's interpreter on the CPU.

Three-way check on seeded random inputs: backend "triton" vs "reference" vs the
reference computed in float64, for ReLU, JumpReLU, linear and TopK SAEs; slots that
keep the error term and slots that replace h by the reconstruction, mixed per row with
gates; odd D and F (never a multiple of a block or tile; several F tiles and D chunks);
fp32 / fp16 / bf16 rows and 16-bit weights (the tensor-core path). h is edited in
place: rows that are not steered must come back bitwise unchanged and every steered row
must change. Further tests pin down what the design promises: with the error kept only
the edited features' tiles are read (the rest of both matrices is NaN-poisoned), the
TopK select is exact with ties (lowest ids win), row chunks give the same result, row
strides are honoured. A last test compiles every kernel for sm_80 / sm_90 (no GPU
needed), since the interpreter does not type-check kernels the way the compiler does.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / fasteer.kernels are imported

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fasteer.ops as ops  # noqa: E402
from fasteer.ops import layout as L  # noqa: E402
from fasteer.ops.reference.sae_replace import sae_replace as reference  # noqa: E402
from fasteer.ops.triton import kernels_module  # noqa: E402
import fasteer.ops.triton.sae_replace as launcher  # noqa: E402

_kernels = kernels_module("sae_fused")
if type(_kernels.sae_dense_kernel).__name__ != "InterpretedFunction":
    # imported earlier in this process without the interpreter: @triton.jit decides at
    # decoration time, so decorate again now that TRITON_INTERPRET is set
    importlib.reload(_kernels)

ACTS = [L.ACT_RELU, L.ACT_JUMPRELU, L.ACT_LINEAR, L.ACT_TOPK]
ACT_IDS = ["relu", "jumprelu", "linear", "topk"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to max|h| + max|expected| + 1 of the row: fp32 allows sum-order differences,
# 16-bit rows one rounding of the output
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# 16-bit weights: the kernel rounds the activation operand (x, and the latents) to the
# weights' dtype for the tensor-core products (the reference multiplies in fp32)
TOL_WEIGHTS = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------- inputs

def make_case(seed, n, d, f, act, dtype, w_dtype=torch.float32, n_slots=4, n_k=3):
    g = torch.Generator().manual_seed(seed)
    c = dict(
        w_enc=(torch.randn(d, f, generator=g) / d ** 0.5).to(w_dtype),
        w_dec=(torch.randn(f, d, generator=g) / f ** 0.5).to(w_dtype),
        b_enc=(torch.randn(f, generator=g) * 0.1).to(w_dtype),
        b_dec=(torch.randn(d, generator=g) * 0.1).to(w_dtype),
        threshold=(torch.rand(f, generator=g) * 0.3).to(w_dtype),
        h=torch.randn(n, d, generator=g).to(dtype),
        activation=act, k=max(1, f // 7))
    feat = torch.randint(-1, f, (n_slots, n_k), generator=g, dtype=torch.int32)
    code = torch.randint(0, 4, (n_slots, n_k), generator=g, dtype=torch.int32)
    lo = torch.randn(n_slots, n_k, generator=g)
    val = torch.stack([lo, lo + torch.rand(n_slots, n_k, generator=g)], -1)
    # edit 0 of every slot adds >= 1 to a real feature, so every steered row changes
    feat[:, 0] = torch.randint(0, f, (n_slots,), generator=g, dtype=torch.int32)
    code[:, 0] = L.FEAT_ADD
    val[:, 0, 0] = 1 + torch.rand(n_slots, generator=g)
    if n_k >= 2 and n_slots >= 2:       # slot 1 edits one feature twice: order matters
        feat[1, 1], code[1, 1] = feat[1, 0], L.FEAT_SCALE
    c.update(edit_feat=feat, edit_code=code, edit_val=val,
             keep_error=torch.tensor([1, 0, 1, 0] * n_slots, dtype=torch.uint8)[:n_slots])
    slot = torch.randint(-1, n_slots, (n,), generator=g, dtype=torch.int32)
    gate = (torch.rand(n, generator=g) > 0.2).to(torch.uint8)
    slot[0], gate[0] = 0, 1                     # a row that keeps the error term
    if n > 1:
        slot[1], gate[1] = 1 % n_slots, 1       # a row replaced by the reconstruction
    if n > 3:
        slot[2], gate[2] = 2 % n_slots, 0       # gated off
        slot[3], gate[3] = -1, 1                # no slot
    c.update(slot=slot, gate=gate)
    return c


def table_args(c):
    return (c["slot"], c["gate"], c["w_enc"], c["b_enc"], c["w_dec"], c["b_dec"], c["threshold"],
            c["edit_feat"], c["edit_code"], c["edit_val"], c["keep_error"])


def run_op(c, backend, in_scale, apply_b, h=None):
    # the SAE carrier's entry point: weights and tables checked when planned, so tests may
    # plant NaNs in weights the kernel must never read (the public op refuses them)
    h = (c["h"] if h is None else h).clone()
    ops._sae_replace_fast_(h, *table_args(c), activation=c["activation"], k=c["k"], in_scale=in_scale,
                     apply_b_dec_to_input=apply_b, backend=backend)
    return h


def active_rows(c):
    return (c["gate"].view(-1) != 0) & (c["slot"].view(-1) >= 0) & \
        (c["slot"].view(-1) < c["edit_feat"].shape[0])


def safe_rows(c, in_scale, apply_b):
    """Rows far from a discontinuity (JumpReLU threshold, TopK boundary), both for the
    exact pre-activation and for the one the kernel sees with 16-bit weights (x rounded
    to the weights' dtype); continuous activations are safe everywhere."""
    act = c["activation"]
    x = c["h"].view(-1, c["h"].shape[-1]).double() * in_scale
    if apply_b:
        x = x - c["b_dec"].double()
    margins = []
    for xe in {x, x.to(c["w_enc"].dtype).double()}:
        pre = xe @ c["w_enc"].double() + c["b_enc"].double()
        if act == L.ACT_JUMPRELU:
            margins.append((pre - c["threshold"].double().clamp_min(0)).abs().amin(-1))
        elif act == L.ACT_TOPK and c["k"] < pre.shape[-1]:
            top = pre.topk(c["k"] + 1, dim=-1).values
            margins.append((top[:, -2] - top[:, -1]).abs())
        else:
            margins.append(torch.full((x.shape[0],), 1.0, dtype=torch.float64))
    return torch.stack(margins).amin(0) > 1e-4


def rel_err(actual, expected, rows_h):
    scale = rows_h.double().abs().amax(-1, keepdim=True) + \
        expected.double().abs().amax(-1, keepdim=True) + 1
    return ((actual.double() - expected.double()).abs() / scale)


def check_three_way(c, in_scale=1.7, apply_b=True):
    h = c["h"]
    d = h.shape[-1]
    rows = h.view(-1, d)
    expect64 = reference(rows, c["slot"].view(-1), c["gate"].view(-1), *table_args(c)[2:],
                         c["activation"], c["k"], in_scale, apply_b, compute_dtype=torch.float64)
    ref = run_op(c, "reference", in_scale, apply_b).view(-1, d)
    tri = run_op(c, "triton", in_scale, apply_b).view(-1, d)
    active = active_rows(c)
    assert active.any() and (~active).any(), "inputs must mix steered and untouched rows"
    assert torch.equal(tri[~active], rows[~active]), "triton modified an untouched row"
    assert torch.equal(ref[~active], rows[~active]), "reference modified an untouched row"
    assert (tri[active] != rows[active]).any(-1).all(), "a steered row came back unchanged"
    assert torch.isfinite(tri).all()
    ok = safe_rows(c, in_scale, apply_b) & active
    assert ok.any(), "no steered row is far from a discontinuity: pick another seed"
    tol = max(TOL[h.dtype], TOL_WEIGHTS[c["w_enc"].dtype])
    err_ref = rel_err(tri, ref, rows)[ok].max().item()
    err_64 = rel_err(tri, expect64, rows)[ok].max().item()
    assert err_ref <= tol, f"triton vs reference: {err_ref:.3g} > {tol}"
    assert err_64 <= tol, f"triton vs float64: {err_64:.3g} > {tol}"
    if h.dtype != torch.float32 and c["w_enc"].dtype == torch.float32:
        # both round the same fp32 values (up to sum order) to nearest even: nearly all
        # elements agree bitwise; truncation instead of rounding would not
        same = (tri[ok] == ref[ok]).double().mean().item()
        assert same >= 0.95, f"only {same:.1%} of {h.dtype} elements bitwise equal to the reference"
    return tri, ref


# --------------------------------------------------------------------------- three-way

@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(9, 33, 257), (21, 130, 100), (5, 1, 5)], ids=str)
def test_triton_vs_reference_vs_float64(act, dtype, shape):
    """(9, 33, 257): five F tiles, the last partial, D over three K chunks; (21, 130, 100):
    BLOCK_M = 32, D over two decode chunks; (5, 1, 5): D = 1, one partial tile."""
    n, d, f = shape
    c = make_case(zlib.crc32(f"{act}{dtype}{shape}".encode()), n, d, f, act, dtype)
    check_three_way(c)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_two_row_tiles(act):
    """70 rows: two 64-row tiles, the second partial (few rows steered, to keep the
    interpreter's per-row TopK programs cheap)."""
    c = make_case(400 + act, 70, 9, 40, act, torch.bfloat16)
    g = torch.Generator().manual_seed(act)
    c["gate"][4:] = (torch.rand(66, generator=g) < 0.25).to(torch.uint8)
    c["gate"][66], c["slot"][66] = 1, 1      # a steered row in the second tile
    check_three_way(c)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_weights(act, w_dtype):
    """bf16/fp16 weights: tensor-core products in the weights' dtype (20 rows: the
    two-phase pass, whose latents are stored in the weights' dtype)."""
    c = make_case(zlib.crc32(f"w{act}{w_dtype}".encode()), 20, 40, 90, act, w_dtype, w_dtype)
    check_three_way(c)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_fp32_rows_with_bf16_weights_and_no_input_bias(act):
    c = make_case(77 + act, 7, 24, 70, act, torch.float32, torch.bfloat16)
    check_three_way(c, in_scale=1.0, apply_b=False)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_3d_rows_bool_gates_single_slot(act):
    c = make_case(300 + act, 6, 19, 45, act, torch.bfloat16, n_slots=2, n_k=2)
    c["h"] = c["h"].view(2, 3, 19)
    c["slot"], c["gate"] = c["slot"].view(2, 3), c["gate"].view(2, 3).bool()
    c["keep_error"] = c["keep_error"].bool()
    check_three_way(c, in_scale=0.6)


# --------------------------------------------------------------------------- design promises

def test_error_kept_without_edits_is_bitwise_identity():
    for act in ACTS:
        c = make_case(11, 8, 17, 50, act, torch.bfloat16)
        c["keep_error"].fill_(1)
        c["edit_feat"].fill_(-1)
        assert torch.equal(run_op(c, "triton", 1.0, True), c["h"])


@pytest.mark.parametrize("n", [6, 20], ids=["fused", "two_phase"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_error_kept_reads_only_the_edited_tiles(act, n):
    """With every row keeping the error term, unedited latents cancel exactly, so the
    dense kernel must not read any other F tile: poison both matrices there with NaN
    (TopK must read all of W_enc, so only W_dec is poisoned) and get the clean result."""
    d, f = 40, 200
    c = make_case(21 + act + n, n, d, f, act, torch.float32, n_slots=2, n_k=2)
    c["keep_error"].fill_(1)
    c["edit_feat"] = torch.tensor([[5, -1], [150, 5]], dtype=torch.int32)
    block_f = launcher.dense_tiles(n, d, f, torch.float32, torch.float32, 1)["BLOCK_F"]
    assert f // block_f >= 3, "the test needs untouched tiles"
    needed = torch.zeros(f, dtype=torch.bool)
    for feature in (5, 150):
        needed[feature // block_f * block_f:(feature // block_f + 1) * block_f] = True
    expected = run_op(c, "reference", 1.3, True)
    if act != L.ACT_TOPK:
        c["w_enc"] = c["w_enc"].masked_fill(~needed[None, :], float("nan"))
        c["b_enc"] = c["b_enc"].masked_fill(~needed, float("nan"))
    c["w_dec"] = c["w_dec"].masked_fill(~needed[:, None], float("nan"))
    got = run_op(c, "triton", 1.3, True)
    assert torch.isfinite(got).all(), "read a tile the error term cancels"
    active = active_rows(c)
    assert (rel_err(got, expected, c["h"])[active].max() <= TOL[torch.float32])


def test_topk_edits_on_selected_and_unselected_features():
    """z of an edited feature depends on the selection: selected -> relu(pre), else 0
    (so add makes it active and scale leaves it at 0)."""
    n, d, f = 4, 16, 60
    c = make_case(5, n, d, f, L.ACT_TOPK, torch.float32, n_slots=4, n_k=2)
    c["k"] = 6
    x = c["h"].double() * 0.9 - c["b_dec"].double()
    pre = x @ c["w_enc"].double() + c["b_enc"].double()
    order = pre[0].argsort(descending=True)
    top, outside = int(order[0]), int(order[-1])
    c["edit_feat"] = torch.tensor([[top, outside]] * 4, dtype=torch.int32)
    c["edit_code"] = torch.tensor([[L.FEAT_SCALE, L.FEAT_ADD], [L.FEAT_SET, L.FEAT_SCALE],
                                   [L.FEAT_CLAMP, L.FEAT_CLAMP], [L.FEAT_ADD, L.FEAT_SET]],
                                  dtype=torch.int32)
    c["edit_val"] = torch.tensor([[[3.0, 0.0], [2.0, 0.0]], [[0.5, 0.0], [4.0, 0.0]],
                                  [[0.1, 0.2], [1.0, 2.0]], [[1.0, 0.0], [-1.5, 0.0]]])
    c["keep_error"] = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    c["slot"] = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)
    c["gate"] = torch.tensor([1, 1, 1, 1, 0], dtype=torch.uint8)
    c["h"] = c["h"][:1].expand(5, d).contiguous()      # same row, four edit lists, one gated off
    check_three_way(c, in_scale=0.9)


def test_topk_select_is_exact_with_ties():
    """The select kernel directly, with heavy ties and F over several tiles: idx holds
    the k largest (ties to the lowest ids) in ascending order; inactive rows untouched."""
    g = torch.Generator().manual_seed(3)
    n, f = 4, 300
    pre = (torch.randint(-6, 7, (n, f), generator=g) * 0.5).float()
    pre[1] = torch.randn(f, generator=g)               # no ties
    pre[2, :] = 0.25                                    # all tied
    slot = torch.zeros(n, dtype=torch.int32)
    gate = torch.tensor([1, 1, 1, 0], dtype=torch.uint8)
    for k in (1, 37, f):
        idx = torch.full((n, k), -7, dtype=torch.int32)
        sel = torch.full((n, 2), -7, dtype=torch.int64)
        _kernels.sae_topk_select_kernel[(n,)](pre, idx, sel, slot, gate, f, 1, k, BLOCK_F=64)
        for r in range(3):
            ranked = sorted(range(f), key=lambda i: (-float(pre[r, i]), i))
            assert idx[r].tolist() == sorted(ranked[:k]), (r, k)
        assert (idx[3] == -7).all() and (sel[3] == -7).all()


def test_row_chunks_match_one_launch(monkeypatch):
    """Batches beyond the scratch budget run in row chunks with the same result (the
    two-phase dense pass in 16-row chunks, TopK in 3-row chunks)."""
    for act, (n, d, f) in ((L.ACT_RELU, (40, 24, 70)), (L.ACT_TOPK, (10, 12, 50))):
        c = make_case(8 + act, n, d, f, act, torch.float32)
        whole = run_op(c, "triton", 1.1, True)
        monkeypatch.setattr(launcher, "_SCRATCH_ELEMENTS", 3 * f)   # 16-row / 3-row chunks
        chunked = run_op(c, "triton", 1.1, True)
        monkeypatch.undo()
        assert (rel_err(chunked, whole, c["h"]).max() <= TOL[torch.float32])
        active = active_rows(c)
        assert torch.equal(chunked[~active], c["h"][~active])


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_and_two_phase_passes_agree(monkeypatch, w_dtype):
    """The same 12 rows through the fused pass (atomics) and the two-phase pass."""
    for act in (L.ACT_RELU, L.ACT_JUMPRELU, L.ACT_LINEAR):
        c = make_case(50 + act, 12, 35, 77, act, torch.float32, w_dtype)
        fused = run_op(c, "triton", 1.0, True)
        monkeypatch.setattr(launcher, "FUSED_MAX_ROWS", 0)
        two_phase = run_op(c, "triton", 1.0, True)
        monkeypatch.undo()
        ok = safe_rows(c, 1.0, True)
        assert rel_err(two_phase, fused, c["h"])[ok].max() <= 2e-5 + TOL_WEIGHTS[w_dtype] / 4
        assert torch.equal(two_phase[~active_rows(c)], c["h"][~active_rows(c)])


@pytest.mark.parametrize("act", [L.ACT_JUMPRELU, L.ACT_TOPK], ids=["jumprelu", "topk"])
def test_strided_rows_and_out_of_range_slot(act):
    """A row stride wider than D (a column slice) and slot >= S (unvalidated): the row
    padding and that row are never written."""
    n, d, f = 7, 21, 66
    c = make_case(31 + act, n, d, f, act, torch.float16)
    c["slot"][4], c["gate"][4] = c["edit_feat"].shape[0] + 1, 1
    base = torch.randn(n, d + 5).to(torch.float16)
    base[:, :d] = c["h"]
    before = base.clone()
    h = base[:, :d]
    launcher.sae_replace_triton(h, *table_args(c), act, c["k"], 1.0, True)
    expected = reference(c["h"], *table_args(c), act, c["k"], 1.0, True)
    assert torch.equal(base[:, d:], before[:, d:]), "wrote past D into the row padding"
    assert torch.equal(h[4], before[4, :d]), "slot >= S edited a row"
    ok = safe_rows(c, 1.0, True)
    assert rel_err(h, expected, c["h"])[ok].max() <= TOL[torch.float16]


def test_kernel_constants_mirror_the_layout():
    for name in ("ACT_RELU", "ACT_JUMPRELU", "ACT_LINEAR", "ACT_TOPK", "FEAT_ADD", "FEAT_SET",
                 "FEAT_SCALE"):
        assert getattr(_kernels, name).value == getattr(L, name), name
    assert L.FEAT_CLAMP == 3  # the kernel's fall-through branch
    assert _kernels.RADIX_DIGITS.value == 1 << _kernels.RADIX_BITS.value


def test_dense_tiles_fill_the_gpu_at_decode_size():
    """One row tile at decode size: the F tiles alone give >= 4 programs per SM, tiles
    respect tl.dot's minimum of 16 and the grid's axis-1 limit."""
    for n_rows, n_feat, n_sm in ((1, 131072, 132), (16, 16384, 108), (4096, 131072, 132),
                                 (3, 40, 132), (1, 1 << 24, 132)):
        t = launcher.dense_tiles(n_rows, 8192, n_feat, torch.bfloat16, torch.bfloat16, n_sm)
        assert min(t["BLOCK_M"], t["BLOCK_F"], t["BLOCK_K"], t["BLOCK_D"]) >= 16
        f_tiles = -(-n_feat // t["BLOCK_F"])
        assert f_tiles <= 65535
        if n_feat >= 16 * 4 * n_sm and n_rows <= 16:
            assert f_tiles >= 4 * n_sm, (n_rows, n_feat, t)


# --------------------------------------------------------------------------- GPU compile

_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, sys.argv[1])
    from fasteer.ops.triton import kernels_module
    K = kernels_module("sae_fused")
    report = []
    for name, types, const, aligned, cap, opts in json.loads(sys.argv[2]):
        fn = getattr(K, name)
        sig = dict(types)
        sig.update({n: "constexpr" for n in const})
        try:
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(fn.arg_names.index(n),): v for n, v in const.items()},
                            attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        except TypeError as exc:  # a Triton whose internal compile API differs
            print(json.dumps({"api": str(exc)})); sys.exit(0)
        c = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
        ptx = c.asm["ptx"]
        report.append({"case": [name, cap, const], "shared": c.metadata.shared,
                       "mma": len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)", ptx)),
                       "cp_async_16": len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*\], (?:16|0x10)\b", ptx)),
                       "red": len(re.findall(r"\bred\.global", ptx)), "local": ptx.count(".local")})
    print(json.dumps({"report": report}))
""")


def _compile_cases():
    """Every kernel at real sizes with the launcher's own tiles and modes."""
    d, f = 8192, 131072
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cases = []
    for h_dt, w_dt, act, n_rows, cap, n_sm in [("bf16", "bf16", L.ACT_RELU, 1, 80, 108),
                                               ("bf16", "bf16", L.ACT_JUMPRELU, 4096, 90, 132),
                                               ("fp16", "fp16", L.ACT_LINEAR, 24, 90, 132),
                                               ("fp32", "fp32", L.ACT_RELU, 16, 80, 108),
                                               ("bf16", "fp32", L.ACT_JUMPRELU, 64, 80, 108),
                                               ("bf16", "bf16", L.ACT_TOPK, 8, 90, 132)]:
        t = launcher.dense_tiles(n_rows, d, f, names[w_dt], names[w_dt], n_sm)
        prec = "tf32x3" if w_dt == "fp32" else "tf32"
        output = (_kernels.OUT_PRE if act == L.ACT_TOPK else _kernels.OUT_ACCUMULATE
                  if n_rows <= launcher.FUSED_MAX_ROWS else _kernels.OUT_LATENT).value
        out_dt = "fp32" if output != _kernels.OUT_LATENT.value else w_dt
        types = {"h_ptr": f"*{h_dt}", "out_ptr": f"*{out_dt}", "flag_ptr": "*i32", "slot_ptr": "*i32",
                 "gate_ptr": "*u8", "keep_ptr": "*u8", "w_enc_ptr": f"*{w_dt}", "b_enc_ptr": f"*{w_dt}",
                 "w_dec_ptr": f"*{w_dt}", "b_dec_ptr": f"*{w_dt}", "theta_ptr": f"*{w_dt}",
                 "feat_ptr": "*i32", "code_ptr": "*i32", "val_ptr": "*fp32", "n_rows": "i32",
                 "D": "i32", "F": "i32", "stride_h": "i64", "n_slots": "i32", "n_k": "i32",
                 "in_scale": "fp32"}
        const = dict(ACTIVATION=act, APPLY_B_DEC=True, OUTPUT=output,
                     BLOCK_M=t["BLOCK_M"], BLOCK_F=t["BLOCK_F"], BLOCK_K=t["BLOCK_K"],
                     BLOCK_D=t["BLOCK_D"], ENC_PRECISION=prec, DEC_PRECISION=prec, SOFT_BF16=False)
        aligned = [n for n in types if n.endswith("_ptr")] + ["D", "F", "stride_h"]
        opts = {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}
        cases.append(["sae_dense_kernel", types, const, aligned, cap, opts])
        if output == _kernels.OUT_LATENT.value:
            types = {"h_ptr": f"*{h_dt}", "lat_ptr": f"*{w_dt}", "flag_ptr": "*i32", "slot_ptr": "*i32",
                     "gate_ptr": "*u8", "keep_ptr": "*u8", "w_dec_ptr": f"*{w_dt}", "b_dec_ptr": f"*{w_dt}",
                     "n_rows": "i32", "D": "i32", "F": "i32", "stride_h": "i64", "n_slots": "i32",
                     "n_f_tiles": "i32", "in_scale": "fp32"}
            const = dict(BLOCK_M=t["BLOCK_M"], BLOCK_F=t["BLOCK_F"], BLOCK_D=t["DECODE_BLOCK_D"],
                         DEC_PRECISION=prec, SOFT_BF16=False)
            aligned = [n for n in types if n.endswith("_ptr")] + ["D", "F", "stride_h"]
            cases.append(["sae_decode_kernel", types, const, aligned, cap,
                          {"num_warps": t["decode_num_warps"], "num_stages": t["num_stages"]}])
    for cap in (80, 90):
        cases.append(["sae_finalize_kernel",
                      {"h_ptr": "*bf16", "acc_ptr": "*fp32", "slot_ptr": "*i32", "gate_ptr": "*u8",
                       "keep_ptr": "*u8", "b_dec_ptr": "*bf16", "D": "i32", "stride_h": "i64",
                       "n_slots": "i32", "in_scale": "fp32"},
                      {"BLOCK_D": 1024, "SOFT_BF16": False}, ["h_ptr", "acc_ptr", "b_dec_ptr", "D", "stride_h"],
                      cap, {"num_warps": 4}])
        cases.append(["sae_topk_select_kernel",
                      {"pre_ptr": "*fp32", "idx_ptr": "*i32", "sel_ptr": "*i64", "slot_ptr": "*i32",
                       "gate_ptr": "*u8", "F": "i32", "n_slots": "i32", "k": "i32"},
                      {"BLOCK_F": 1024}, ["pre_ptr", "F"], cap, {"num_warps": 4}])
        cases.append(["sae_topk_decode_kernel",
                      {"h_ptr": "*bf16", "pre_ptr": "*fp32", "idx_ptr": "*i32", "sel_ptr": "*i64",
                       "slot_ptr": "*i32", "gate_ptr": "*u8", "keep_ptr": "*u8", "w_dec_ptr": "*bf16",
                       "b_dec_ptr": "*bf16", "feat_ptr": "*i32", "code_ptr": "*i32", "val_ptr": "*fp32",
                       "D": "i32", "F": "i32", "stride_h": "i64", "n_slots": "i32", "n_k": "i32",
                       "k": "i32", "in_scale": "fp32"},
                      {"BLOCK_D": 256, "BLOCK_S": 16, "K_PAD": 4, "SOFT_BF16": False},
                      ["h_ptr", "w_dec_ptr", "D", "stride_h"], cap, {"num_warps": 4}])
    return cases


def test_kernels_compile_for_gpus(tmp_path):
    """Compile every kernel for sm_80 and sm_90 at real sizes (D = 8192, d_sae = 131072)
    with the launcher's tiles: the GEMM kernels must use tensor cores and 16-byte async
    copies for the weights, fit in 99 KiB of shared memory (sm_86/sm_89 too); only the
    fused pass uses atomics; nothing spills to local memory."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, repo, json.dumps(_compile_cases())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "api" in result:
        pytest.skip(f"this Triton's compile API differs ({result['api']})")
    for entry in result["report"]:
        name, cap, const = entry["case"]
        assert entry["local"] == 0, f"{entry['case']}: local memory (spills)"
        if name in ("sae_dense_kernel", "sae_decode_kernel"):
            assert entry["mma"] > 0, f"{entry['case']}: no tensor-core products"
            assert entry["cp_async_16"] > 0, f"{entry['case']}: no 16-byte async weight loads"
            assert entry["shared"] <= 99 * 1024, f"{entry['case']}: {entry['shared']} B of shared memory"
        if name == "sae_dense_kernel":
            fused = const["OUTPUT"] == _kernels.OUT_ACCUMULATE.value
            assert (entry["red"] > 0) == fused, f"{entry['case']}: atomics only in the fused pass"
