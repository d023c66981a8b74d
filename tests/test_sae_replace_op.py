"""The full SAE replace op: reference vs float64, cpu vs reference, every activation,
with and without the error term, per-row slots, odd D and F."""
from __future__ import annotations

import zlib

import pytest
import torch

import fasteer.ops as ops
from fasteer.ops import layout as L
from fasteer.ops.reference.sae_replace import sae_replace as reference

ACTS = [L.ACT_RELU, L.ACT_JUMPRELU, L.ACT_LINEAR, L.ACT_TOPK]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def make(seed, n, d, f, n_slots, n_k, dtype, act, w_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_enc = (torch.randn(d, f, generator=g) / d ** 0.5).to(w_dtype)
    w_dec = (torch.randn(f, d, generator=g) / f ** 0.5).to(w_dtype)
    b_enc = (torch.randn(f, generator=g) * 0.1).to(w_dtype)
    b_dec = (torch.randn(d, generator=g) * 0.1).to(w_dtype)
    threshold = (torch.rand(f, generator=g) * 0.3).to(w_dtype)
    h = torch.randn(n, d, generator=g).to(dtype)
    edit_feat = torch.randint(-1, f, (n_slots, n_k), generator=g, dtype=torch.int32)
    edit_code = torch.randint(0, 4, (n_slots, n_k), generator=g, dtype=torch.int32)
    lo = torch.randn(n_slots, n_k, generator=g)
    edit_val = torch.stack([lo, lo + torch.rand(n_slots, n_k, generator=g)], -1)
    keep_error = torch.randint(0, 2, (n_slots,), generator=g, dtype=torch.uint8)
    slot = torch.randint(-1, n_slots, (n,), generator=g, dtype=torch.int32)
    gate = (torch.rand(n, generator=g) > 0.2).to(torch.uint8)
    k = max(1, f // 7)
    return dict(h=h, slot=slot, gate=gate, w_enc=w_enc, b_enc=b_enc, w_dec=w_dec, b_dec=b_dec,
                threshold=threshold, edit_feat=edit_feat, edit_code=edit_code, edit_val=edit_val,
                keep_error=keep_error, activation=act, k=k)


def args_of(c):
    return (c["slot"], c["gate"], c["w_enc"], c["b_enc"], c["w_dec"], c["b_dec"], c["threshold"],
            c["edit_feat"], c["edit_code"], c["edit_val"], c["keep_error"])


def safe_rows(c, in_scale, apply_b):
    """Rows far from a discontinuity (JumpReLU threshold, TopK boundary) in float64."""
    x = c["h"].double() * in_scale
    xe = x - c["b_dec"].double() if apply_b else x
    pre = xe @ c["w_enc"].double() + c["b_enc"].double()
    if c["activation"] == L.ACT_JUMPRELU:
        margin = (pre - c["threshold"].double().clamp_min(0)).abs().amin(-1)
    elif c["activation"] == L.ACT_TOPK:
        top = pre.topk(c["k"] + 1, dim=-1).values
        margin = (top[:, -2] - top[:, -1]).abs()
    else:
        margin = torch.full((x.shape[0],), 1.0, dtype=torch.float64)
    return margin > 1e-4


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7, 33), (9, 64, 257), (3, 1, 5)])
@pytest.mark.parametrize("keep", ["mixed", "all", "all_distinct"])
def test_reference_vs_float64_and_cpu_vs_reference(act, dtype, shape, keep):
    # keep "all*": every row keeps the error term, the cpu backend's sparse encode (not
    # TopK); "all": with a feature edited twice (edits in order), "all_distinct": without
    n, d, f = shape
    c = make(zlib.crc32(f"{act}{dtype}{shape}{keep}".encode()), n, d, f, 3, 4, dtype, act)
    if keep.startswith("all"):
        c["keep_error"].fill_(1)
    if keep == "all":
        c["edit_feat"][1, 2] = c["edit_feat"][1, 0] = f - 1     # a feature edited twice
    if keep == "all_distinct":
        perm = torch.randperm(f, generator=torch.Generator().manual_seed(f))
        ids = perm.repeat(12)[:12].view(3, 4).to(torch.int32)  # distinct while f >= 4
        c["edit_feat"] = torch.where(c["edit_feat"] < 0, -1, ids)
    c["slot"][0], c["gate"][0] = 0, 1                 # at least one steered row
    c["edit_feat"][0, 0], c["edit_code"][0, 0] = 0, L.FEAT_SET
    in_scale, apply_b = 1.7, True
    expect64 = reference(c["h"], *args_of(c), act, c["k"], in_scale, apply_b, compute_dtype=torch.float64)
    ok = safe_rows(c, in_scale, apply_b)
    ref = c["h"].clone()
    ops.sae_replace_(ref, *args_of(c), activation=act, k=c["k"], in_scale=in_scale,
                     apply_b_dec_to_input=apply_b, backend="reference")
    cpu = c["h"].clone()
    ops.sae_replace_(cpu, *args_of(c), activation=act, k=c["k"], in_scale=in_scale,
                     apply_b_dec_to_input=apply_b, backend="cpu")
    active = (c["gate"] != 0) & (c["slot"] >= 0)
    assert torch.equal(ref[~active], c["h"][~active])
    assert torch.equal(cpu[~active], c["h"][~active])
    scale = c["h"].double().abs().amax(-1, keepdim=True) + expect64.double().abs().amax(-1, keepdim=True) + 1
    tol = TOL[dtype]
    err_ref = ((ref.double() - expect64.double()).abs() / scale)[ok].max()
    err_cpu = ((cpu.double() - ref.double()).abs() / scale)[ok].max()
    assert err_ref <= tol, err_ref
    assert err_cpu <= tol, err_cpu
    # the edit actually did something on active rows
    assert not torch.equal(ref[active], c["h"][active])


def test_keep_error_without_edits_is_identity_and_replace_is_reconstruction():
    c = make(5, 6, 16, 40, 2, 2, torch.float32, L.ACT_RELU)
    c["edit_feat"].fill_(-1)
    c["gate"].fill_(1)
    c["slot"] = torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.int32)
    c["keep_error"] = torch.tensor([1, 0], dtype=torch.uint8)
    h = c["h"].clone()
    ops.sae_replace_(h, *args_of(c), activation=L.ACT_RELU, backend="cpu")
    assert torch.allclose(h[0::2], c["h"][0::2], atol=1e-6)       # error kept, no edit: identity
    z = (c["h"] - c["b_dec"]) @ c["w_enc"] + c["b_enc"]
    recon = z.clamp_min(0) @ c["w_dec"] + c["b_dec"]
    assert torch.allclose(h[1::2], recon[1::2], atol=1e-5)        # no error: the reconstruction


def test_duplicate_feature_edits_apply_in_order():
    c = make(9, 2, 8, 12, 1, 2, torch.float32, L.ACT_RELU)
    c["edit_feat"] = torch.tensor([[3, 3]], dtype=torch.int32)
    c["edit_code"] = torch.tensor([[L.FEAT_SET, L.FEAT_ADD]], dtype=torch.int32)
    c["edit_val"] = torch.tensor([[[2.0, 0.0], [1.5, 0.0]]])
    c["keep_error"] = torch.tensor([1], dtype=torch.uint8)
    c["slot"].fill_(0)
    c["gate"].fill_(1)
    outs = []
    for backend in ("reference", "cpu"):
        h = c["h"].clone()
        ops.sae_replace_(h, *args_of(c), activation=L.ACT_RELU, backend=backend)
        outs.append(h)
    z3 = ((c["h"] - c["b_dec"]) @ c["w_enc"][:, 3] + c["b_enc"][3]).clamp_min(0)
    expect = c["h"] + (3.5 - z3).unsqueeze(-1) * c["w_dec"][3]
    assert torch.allclose(outs[0], expect, atol=1e-5)
    assert torch.allclose(outs[1], expect, atol=1e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(w_enc=c["w_enc"].t().contiguous()), "w_enc"),
    (lambda c: c.update(w_dec=torch.randn(3, 3)), "w_dec"),
    (lambda c: c["edit_feat"].__setitem__((0, 0), 10_000), "edit_feat"),
    (lambda c: c.update(k=0), "k"),
    (lambda c: c["edit_val"].__setitem__((0, 0, 0), float("nan")), "edit_val"),
    (lambda c: c.update(slot=c["slot"].long()), "slot"),
])
def test_bad_input(mutate, match):
    c = make(1, 4, 8, 20, 2, 2, torch.float32, L.ACT_TOPK)
    mutate(c)
    h = c["h"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        ops.sae_replace_(h, *args_of(c), activation=L.ACT_TOPK, k=c["k"], backend="cpu")
    assert torch.equal(h, c["h"])


def test_cuda_rows_run_on_triton_or_fall_back_without_it(monkeypatch):
    """No CUDA kernel exists for the full-SAE op: where dispatch picks 'cuda', Triton runs
    it; without Triton, 'auto' falls back to the reference and an explicit 'cuda' says why."""
    from fasteer.ops import dispatch
    from fasteer.ops.sae_replace import implementation

    real_import = dispatch._import
    monkeypatch.setattr(dispatch, "cuda_module", lambda: object())  # as if fasteer._cuda were built
    assert implementation("auto", "cuda", 1) in ("triton", "reference")
    monkeypatch.setattr(dispatch, "_import",
                        lambda name: (None, "missing") if name == "triton" else real_import(name))
    assert implementation("auto", "cuda", 1) == "reference"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        implementation("cuda", "cuda", 1)
    monkeypatch.setattr(dispatch, "_import",
                        lambda name: (object(), None) if name == "triton" else real_import(name))
    assert implementation("auto", "cuda", 1) == "triton"
    assert implementation("cuda", "cuda", 1) == "triton"
    assert implementation("auto", "cpu", 1) in ("cpu", "reference")


def _inf_w_dec(c):
    c["w_dec"] = c["w_dec"].clone()
    c["w_dec"][2, 1] = float("inf")


@pytest.mark.parametrize("in_scale,mutate,match", [
    (0.0, None, "in_scale"),
    (float("nan"), None, "in_scale"),
    (float("inf"), None, "in_scale"),
    (1.0, _inf_w_dec, "w_dec"),
    (1.0, lambda c: c["w_enc"].__setitem__((0, 0), float("nan")), "w_enc"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_scale_or_weights_raise(in_scale, mutate, match, backend):
    """in_scale 0 / NaN / inf, or a NaN / inf weight, would write NaN / inf into a finite h."""
    c = make(2, 4, 8, 20, 2, 2, torch.float32, L.ACT_RELU)
    if mutate is not None:
        mutate(c)
    h = c["h"].clone()
    with pytest.raises(ValueError, match=match):
        ops.sae_replace_(h, *args_of(c), activation=L.ACT_RELU, in_scale=in_scale,
                         backend=backend)
    assert torch.equal(h, c["h"])
    # the carriers' entry point checks the scale too (weights are checked when planned)
    if mutate is None:
        with pytest.raises(ValueError, match="in_scale"):
            ops._sae_replace_fast_(h, *args_of(c), activation=L.ACT_RELU, in_scale=in_scale,
                                   backend=backend)


def test_weights_changed_in_place_are_checked_again():
    c = make(3, 4, 8, 20, 2, 2, torch.float32, L.ACT_RELU)
    ops.sae_replace_(c["h"].clone(), *args_of(c), activation=L.ACT_RELU, backend="cpu")
    c["w_dec"][0, 0] = float("inf")                       # same tensor, new version
    with pytest.raises(ValueError, match="w_dec"):
        ops.sae_replace_(c["h"].clone(), *args_of(c), activation=L.ACT_RELU, backend="cpu")


@pytest.mark.parametrize("act", [L.ACT_RELU, L.ACT_TOPK])
@pytest.mark.parametrize("keep", [0, 1])
def test_zero_edits_per_slot_matches_reference(act, keep):
    """K = 0 (slots without feature edits): the identity with the error term kept, the
    reconstruction without it -- as the reference, not an IndexError."""
    c = make(4, 5, 8, 20, 2, 0, torch.float32, act)
    c["keep_error"].fill_(keep)
    want = reference(c["h"].clone(), *args_of(c), act, c["k"], 1.0, True)
    h = c["h"].clone()
    ops.sae_replace_(h, *args_of(c), activation=act, k=c["k"], backend="cpu")
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
    if keep:
        torch.testing.assert_close(h, c["h"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_rows(backend):
    c = make(5, 0, 8, 20, 2, 2, torch.float32, L.ACT_RELU)
    h = c["h"].clone()
    ops.sae_replace_(h, *args_of(c), activation=L.ACT_RELU, backend=backend)
    assert h.shape == (0, 8)
