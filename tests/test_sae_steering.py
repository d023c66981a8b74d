"""SAE steering: `FeatureEdit` and `SAEReplace` against the full SAE math in float64.

* Op level (many rows): the fused single-feature FEATURE edit and the multi-feature /
  TopK / SAEReplace stages, on random SAEs of odd sizes, every activation and op, with and
  without b_dec subtraction and input normalisation, on the reference and cpu backends,
  equal ``enc -> edit -> dec (+ error)`` computed with the SAE's own encode/decode in
  float64, to float32 tolerance.
* Model level: tiny Llama and GPT-2 steered with per-row slots, positions and several
  interventions equal `sae_reference.SAEHookReference` (plain forward hooks, float64),
  logits and greedy tokens.
* Which path each intervention takes, the order rule at a site, unpatch, autograd, and
  bad input (d_in mismatch, wrong site warning naming both, ids out of range, NaN).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fasteer as fs
from fasteer.ops import layout as L
from fasteer.plan import LoweringContext, Request, compile_plan
from fasteer.sae.carrier import sync_sae_stages
from hook_reference import cached_model, one_thread, pair, prompt_batch, random_vectors  # noqa: F401
from sae_reference import (assert_close, feature_pair, full_reference, random_sae, replace_pair,
                           run_fasteer, run_reference)

D = 32          # hidden size of the tiny models
F = 45          # odd dictionary size


class _Sites:
    """Just enough of `ModelSites` for `compile_plan` at op level."""

    def stream_point(self, layer, site):
        return {"resid_pre": ("pre", layer), "resid_post": ("pre", layer + 1)}.get(site, ("mid", layer))


def _apply_plan(interventions, h: torch.Tensor, backend: str) -> torch.Tensor:
    """Edit rows h [N, D] with the lowered plan of ``interventions`` (all at one point)."""
    d = h.shape[-1]
    ctx = LoweringContext(n_layers=4, hidden=d, model_type="test")
    plan = compile_plan([Request(tuple(interventions), None)], _Sites(), ctx)
    (point,) = set(plan.points) | set(plan.sae_points)
    slot = torch.zeros(h.shape[0], dtype=torch.int32)
    gate = torch.ones(h.shape[0], dtype=torch.uint8)
    out = h.clone()
    if point in plan.sae_points:
        sync_sae_stages(None, plan.sae_points[point], out.device).apply_(out, slot, gate, backend)
    if point in plan.points:
        t = plan.points[point]
        fs.ops.steer_(out, slot, gate, t.meta, t.params, t.bank, backend=backend)
    return out


def _margin_rows(sae, h, features):
    """Rows whose edited features are far from the JumpReLU / TopK discontinuity."""
    s64 = sae.to(dtype=torch.float64)
    pre = s64.pre_activation(h.double())
    if sae.activation == "jumprelu":
        margin = (pre[:, features] - s64.threshold[features].clamp_min(0)).abs().amin(-1)
        margin = torch.minimum(margin, pre[:, features].abs().amin(-1))
    elif sae.activation == "topk":
        top = pre.topk(sae.k + 1, dim=-1).values
        margin = top[:, -2] - top[:, -1]
    else:
        return torch.ones(h.shape[0], dtype=torch.bool)
    return margin > 1e-4


OPS = [("add", 1.5, None), ("set", 2.5, None), ("scale", -0.5, None), ("clamp", 0.2, 0.6)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation,apply_b_dec,scale", [
    ("relu", True, None), ("relu", False, 2.5), ("jumprelu", True, 0.7), ("jumprelu", False, None),
    ("linear", True, None)])
def test_fused_single_feature_edits_equal_the_full_sae(activation, apply_b_dec, scale, backend):
    d, f = 37, 53
    sae = random_sae(d, f, activation, seed=3, apply_b_dec=apply_b_dec, scale=scale,
                     gain=1.0 / (scale or 1.0))
    h = torch.randn(301, d, generator=torch.Generator().manual_seed(4)) * 1.5
    for i, (op, value, hi) in enumerate(OPS):
        feature = 5 + 11 * i
        iv = fs.FeatureEdit(sae, feature, op, value, hi)
        assert iv.fused
        got = _apply_plan([iv], h, backend)
        want = full_reference(sae, h, [(feature, op, value, hi)])
        rows = _margin_rows(sae, h, [feature])
        assert int(rows.sum()) > 250
        err = float((got.double() - want)[rows].abs().max())
        assert err <= 2e-5 * float(want.abs().max()), f"{op}: max error {err:.3g}"
        moved = float((want - h.double()).abs().max())
        assert moved > 0.05, f"{op}: the edit should move the stream (moved {moved:.3g})"

    # several single-feature edits apply one after another, each exact on the row it sees
    ivs = [fs.FeatureEdit(sae, 7, "set", 3.0), fs.FeatureEdit(sae, 8, "scale", 2.0)]
    got = _apply_plan(ivs, h, backend)
    want = full_reference(sae, full_reference(sae, h, [(7, "set", 3.0, None)]).float(),
                          [(8, "scale", 2.0, None)])
    rows = _margin_rows(sae, h, [7, 8])
    assert float((got.double() - want)[rows].abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fused_feature_edit_with_a_condition_on_its_own_activation(backend):
    """``when=`` on the folded encoder: edit only tokens where the feature's pre-activation
    is at least 0.3 (conditions need the fused path)."""
    sae = random_sae(37, 53, "relu", seed=13, scale=1.9, gain=1 / 1.9)
    h = torch.randn(199, 37, generator=torch.Generator().manual_seed(14)) * 1.5
    enc = sae.feature_encoder(9)
    iv = fs.FeatureEdit(sae, 9, "scale", 3.0, when=fs.Projection(enc.column, 0.3,
                                                                  bias=float(enc.bias)))
    got = _apply_plan([iv], h, backend)
    pre = sae.to(dtype=torch.float64).pre_activation(h.double())[:, 9]
    on = pre >= 0.3
    want = torch.where(on.unsqueeze(-1), full_reference(sae, h, [(9, "scale", 3.0, None)]),
                       h.double())
    safe = (pre - 0.3).abs() > 1e-4
    assert 20 < int(on.sum()) < 180
    assert float((got.double() - want)[safe].abs().max()) <= 2e-5 * float(want.abs().max())
    assert torch.equal(got[~on & safe], h[~on & safe])          # untouched rows: bitwise


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "linear", "topk"])
def test_joint_feature_edits_and_sae_replace_equal_the_full_sae(activation, backend):
    d, f = 37, 53
    sae = random_sae(d, f, activation, seed=5, scale=1.3 if activation == "jumprelu" else None)
    h = torch.randn(257, d, generator=torch.Generator().manual_seed(6)) * 1.5
    feats = [2, 19, 40]
    rows = _margin_rows(sae, h, feats)
    assert int(rows.sum()) > 150
    cases = [
        (fs.FeatureEdit(sae, feats, "set", [1.0, 0.0, 2.0]),
         [(2, "set", 1.0, None), (19, "set", 0.0, None), (40, "set", 2.0, None)], True),
        (fs.FeatureEdit(sae, feats, "clamp", (0.8, None)),
         [(x, "clamp", 0.8, None) for x in feats], True),
        (fs.SAEReplace(sae, [(2, "add", 1.0), (2, "clamp", 0.0, 1.2), (40, "scale", 3.0)]),
         [(2, "add", 1.0, None), (2, "clamp", 0.0, 1.2), (40, "scale", 3.0, None)], True),
        (fs.SAEReplace(sae, {19: 4.0}, keep_error=False), [(19, "set", 4.0, None)], False),
        (fs.SAEReplace(sae, keep_error=False), [], False),
    ]
    for iv, edits, keep in cases:
        # several features of a ReLU/JumpReLU/linear SAE: JOINT fused edits; TopK and
        # SAEReplace: the full SAE op
        fused = isinstance(iv, fs.FeatureEdit) and activation != "topk"
        assert getattr(iv, "fused", False) == fused
        lowered = iv.lower(LoweringContext(n_layers=4, hidden=d, model_type="test"))
        assert all(isinstance(e, fs.plan.Edit) == fused for e in lowered)
        if fused:
            assert [e.joint for e in lowered] == [False, True, True]
        got = _apply_plan([iv], h, backend)
        want = full_reference(sae, h, edits, keep)
        err = float((got.double() - want)[rows].abs().max())
        assert err <= 3e-5 * float(want.abs().max()), f"{iv}: max error {err:.3g}"
        assert float((want - h.double()).abs().max()) > 0.05


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_joint_feature_edit_with_a_condition(backend):
    """A multi-feature FeatureEdit with ``when``: rows where the condition holds get the full
    SAE's joint edit, the others stay bitwise unchanged (every feature shares the condition)."""
    d, f = 29, 41
    sae = random_sae(d, f, "jumprelu", seed=8, scale=1.3)
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(120, d, generator=gen) * 1.5
    c = torch.randn(d, generator=gen)
    feats = [4, 11, 30, 38]
    iv = fs.FeatureEdit(sae, feats, "add", [1.5, -2.0, 0.7, 3.0],
                        when=fs.Projection(c, 0.5, bias=-0.2))
    got = _apply_plan([iv], h, backend)
    proj = h.double() @ c.double() - 0.2
    on = proj >= 0.5
    safe = _margin_rows(sae, h, feats) & ((proj - 0.5).abs() > 1e-3)
    want = full_reference(sae, h, [(k, "add", v, None) for k, v in zip(feats, iv.values)], True)
    assert 20 < int((on & safe).sum()) < 100
    err = float((got.double() - want)[on & safe].abs().max())
    assert err <= 3e-5 * float(want.abs().max()), err
    assert torch.equal(got[~on & safe], h[~on & safe])


def _llama_sets_and_reference(sae, arch):
    """Per-row SAE steering: row 0 joint + fused edits, row 1 none, row 2 positions."""
    ids, mask = prompt_batch(3, 7, "left", seed=21)
    a = feature_pair(sae, [3, 17, 30], "add", [2.0, -1.0, 1.5])                # joint, resid_post[1]
    b = feature_pair(sae, 11, "set", 3.0, layers=[2], site="resid_pre")        # fused, same point
    c = feature_pair(sae, 5, "clamp", 0.5, 1.0, positions="prompt")            # fused, prompt only
    with pytest.warns(UserWarning, match=r"trained at resid_post\[1\].*resid_mid\[1\]"):
        d = feature_pair(sae, 24, "scale", 4.0, site="resid_mid", positions="generated",
                         allow_other_site=True)
    v = random_vectors([1], D, seed=5, scale=2.0)
    add = pair("add", [1], vectors=v, value=1.0)                               # after the SAE edits
    sets = [([a[0], b[0], add[0]], [0]), ([c[0], d[0]], [2])]
    row_edits = [[a[1], b[1], add[1]], [], [c[1], d[1]]]
    return ids, mask, sets, row_edits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_feature_edits_in_a_model_match_the_hook_reference(arch, activation):
    model = cached_model(arch)
    sae = random_sae(D, F, activation, seed=7, layer=1, site="resid_post")
    ids, mask, sets, row_edits = _llama_sets_and_reference(sae, arch)
    out = run_fasteer(model, sets, ids, mask)
    ref = run_reference(model, arch, row_edits, ids, mask)
    assert_close(out, ref)
    plain = run_reference(model, arch, [[], [], []], ids, mask, generate=False)[0]
    effect = (out[0] - plain).abs().amax(dim=(1, 2))
    assert float(effect[0]) > 1e-2 and float(effect[2]) > 1e-2
    assert float(effect[1]) <= 1e-5           # row 1 unsteered (fused norm: rounding only)


def test_topk_feature_edit_and_sae_replace_match_the_hook_reference():
    model = cached_model("llama")
    topk = random_sae(D, F, "topk", seed=8, layer=1, k=7)
    relu = random_sae(D, 41, "relu", seed=9, layer=1, site="resid_pre")
    ids, mask = prompt_batch(4, 7, "right", seed=22)
    mask_pos = torch.zeros(4, 7, dtype=torch.bool)
    mask_pos[:, 2:5] = True
    a = feature_pair(topk, [4, 9], "set", [3.0, 0.0])                            # TopK -> full path
    b = replace_pair(topk, [(4, "add", 1.0), (12, "clamp", 0.0, 0.3)], keep_error=True,
                     positions="last_prompt")
    c = replace_pair(topk, [(20, "set", 2.0)], keep_error=False, positions=mask_pos)
    e = replace_pair(relu, {6: 2.0}, keep_error=False, positions="generated")    # resid_pre[1]
    f = replace_pair(relu, [], keep_error=True)                                  # identity
    sets = [([a[0]], [0]), ([b[0], e[0]], [1]), ([c[0], f[0]], [2]), ([e[0], a[0]], [3])]
    row_edits = [[a[1]], [b[1], e[1]], [c[1], f[1]], [e[1], a[1]]]
    out = run_fasteer(model, sets, ids, mask)
    ref = run_reference(model, "llama", row_edits, ids, mask)
    assert_close(out, ref)
    plain = run_reference(model, "llama", [[]] * 4, ids, mask, generate=False)[0]
    assert all(float((out[0][r] - plain[r]).abs().max()) > 1e-2 for r in range(4))


def test_each_intervention_takes_its_path():
    model = cached_model("llama")
    relu = random_sae(D, F, "relu", seed=10, layer=1)
    topk = random_sae(D, F, "topk", seed=11, layer=1)
    st = fs.patch(model)
    try:
        point = ("pre", 2)
        st.set(fs.FeatureEdit(relu, 3, "set", 1.0))
        carrier = st.carriers[point]
        assert carrier.sae_stages is None
        kinds = (carrier.tables.meta[..., 0] & 0xFF)
        assert int((kinds == L.FEATURE).sum()) == 1
        # joint edit of three features: three fused FEATURE edits, the last two JOINT
        st.set(fs.FeatureEdit(relu, [3, 8, 44], "add", 1.0))
        assert carrier.sae_stages is None
        codes = carrier.tables.meta[0, :, 0]
        assert ((codes & 0xFF) == L.FEATURE).tolist() == [True] * 3
        assert ((codes & L.JOINT) != 0).tolist() == [False, True, True]
        # default rows keep the fused edits; named rows get a stage of the TopK SAE
        st.set(fs.FeatureEdit(topk, 3, "set", 1.0), rows=[0])
        assert len(carrier.sae_stages.stages) == 1
        assert int(((carrier.tables.meta[..., 0] & 0xFF) == L.FEATURE).sum()) == 3
        # TopK: the whole SAE, shared by two requests (one stage, per-row edits)
        st.clear()
        st.set(fs.FeatureEdit(topk, 3, "set", 1.0), rows=[0])
        st.set(fs.SAEReplace(topk, {5: 1.0}, keep_error=False), rows=[1])
        (stage,) = carrier.sae_stages.stages
        assert stage.tensors[0] is topk.W_enc          # on the model's device already: no copy
        assert stage.keep_error[:2].tolist() == [1, 0]
        buffers = [t.data_ptr() for t in (stage.edit_feat, stage.edit_val, stage.remap)]
        st.set(fs.FeatureEdit(topk, 9, "add", 2.0), rows=[0])    # same structure: in place
        (stage2,) = carrier.sae_stages.stages
        assert stage2 is stage and buffers == [t.data_ptr() for t in
                                               (stage.edit_feat, stage.edit_val, stage.remap)]
        st.clear()
        assert carrier.sae_stages is None and not carrier.installed
    finally:
        st.unpatch()


def test_full_sae_edits_must_come_first_at_a_site():
    model = cached_model("llama")
    sae = random_sae(D, F, "relu", seed=12, layer=1)
    v = random_vectors([1], D, seed=3)
    with fs.patch(model) as st:
        st.set(fs.SAEReplace(sae, {1: 1.0}), fs.Add(v, 1.0))               # fine
        before = st.carriers[("pre", 2)].tables.meta.clone()
        with pytest.raises(ValueError, match="SAEReplace runs the full SAE op.*before"):
            st.set(fs.Add(v, 1.0), fs.SAEReplace(sae, {1: 1.0}))
        topk = random_sae(D, F, "topk", seed=14, layer=1)
        with pytest.raises(ValueError, match="FeatureEdit runs the full SAE op"):
            st.set(fs.FeatureEdit(sae, [2, 5], "set", 1.0), fs.FeatureEdit(topk, 3, "set", 1.0))
        # refused before anything changed
        assert torch.equal(st.carriers[("pre", 2)].tables.meta, before)
        assert st.carriers[("pre", 2)].sae_stages is not None
        # at different sites any order is fine
        st.set(fs.Add(v[1], 1.0, layers=[0]), fs.SAEReplace(sae, {1: 1.0}))
        assert st.carriers[("pre", 2)].sae_stages is not None


def test_unpatch_restores_the_model_and_autograd_flows():
    model = cached_model("llama")
    sae = random_sae(D, F, "topk", seed=13, layer=1)
    ids, mask = prompt_batch(2, 6, "none", seed=23)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    iv = fs.SAEReplace(sae, {3: 2.0}, keep_error=True)
    st = fs.steer(model, iv, fs.FeatureEdit(random_sae(D, F, "relu", seed=14, layer=1), 2,
                                           "set", 1.0))
    try:
        with torch.no_grad():
            steered = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        assert float((logits.detach() - steered).abs().max()) <= 1e-5
        logits.sum().backward()
        assert embeds.grad is not None and bool(torch.isfinite(embeds.grad).all())
    finally:
        st.unpatch()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert float((steered - before).abs().max()) > 1e-2


# --------------------------------------------------------------------------- bad input

def test_d_in_mismatch_and_layer_out_of_range_fail_before_anything_changes():
    model = cached_model("llama")
    wide = random_sae(40, F, "relu", seed=15, layer=1)
    sae = random_sae(D, F, "relu", seed=16, layer=1)
    with fs.patch(model) as st:
        st.set(fs.FeatureEdit(sae, 1, "set", 1.0))
        before = st.carriers[("pre", 2)].tables.meta.clone()
        for iv in (fs.FeatureEdit(wide, 1, "set", 1.0), fs.SAEReplace(wide, {1: 1.0})):
            with pytest.raises(ValueError, match=r"sae: d_in = 40 but the model's hidden size is 32"):
                st.set(iv)
        with pytest.warns(UserWarning, match="trained at"):
            far = fs.FeatureEdit(sae, 1, "set", 1.0, layers=[7], allow_other_site=True)
        with pytest.raises(ValueError, match=r"layers: \[7\] out of range"):
            st.set(far)
        with pytest.raises(ValueError, match="d_in = 40"):
            st.watch(wide, [1])
        assert torch.equal(st.carriers[("pre", 2)].tables.meta, before)


def test_site_mismatch_is_refused_or_warns_naming_both_places():
    sae = random_sae(D, F, "relu", seed=17, layer=1, site="resid_post",
                     hook_name="blocks.1.hook_resid_post")
    both = (r"trained at resid_post\[1\] \(hook 'blocks.1.hook_resid_post'\) "
            r"but is applied at resid_pre\[1\]")
    with pytest.raises(ValueError, match=both + ".*allow_other_site=True"):
        fs.FeatureEdit(sae, 1, "set", 1.0, site="resid_pre")
    with pytest.raises(ValueError, match=r"resid_post\[1\].*resid_post\[0\], resid_post\[2\]"):
        fs.SAEReplace(sae, {1: 1.0}, layers=[0, 1, 2])
    with pytest.raises(TypeError, match="allow_other_site: expected a bool"):
        fs.FeatureEdit(sae, 1, "set", 1.0, site="resid_pre", allow_other_site="yes")
    with pytest.warns(UserWarning, match=both):
        fs.FeatureEdit(sae, 1, "set", 1.0, site="resid_pre", allow_other_site=True)
    with pytest.warns(UserWarning, match=r"resid_post\[1\].*resid_post\[0\], resid_post\[2\]"):
        fs.SAEReplace(sae, {1: 1.0}, layers=[0, 1, 2], allow_other_site=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs.FeatureEdit(sae, 1, "set", 1.0, layers=[2], site="resid_pre")   # the same point
        fs.FeatureEdit(sae, 1, "set", 1.0)
    mlp = random_sae(D, F, "relu", seed=18, layer=None, site=None, hook_name="blocks.1.hook_mlp_out")
    assert mlp.site is None and mlp.layer == 1
    with pytest.raises(ValueError, match="hook_mlp_out.*not a residual-stream site"):
        fs.FeatureEdit(mlp, 1, "set", 1.0)
    with pytest.warns(UserWarning, match="hook_mlp_out.*applied at resid_post"):
        fs.FeatureEdit(mlp, 1, "set", 1.0, site="resid_post")
    nowhere = random_sae(D, F, "relu", seed=19, layer=None, site=None)
    with pytest.raises(ValueError, match="layers: the SAE does not record the layer"):
        fs.FeatureEdit(nowhere, 1, "set", 1.0)


def test_bad_feature_ids_values_and_nan_weights():
    sae = random_sae(D, F, "relu", seed=20, layer=1)
    with pytest.raises(ValueError, match=rf"feature: ids \[{F}\] out of range; expected 0 <= id < d_sae = {F}"):
        fs.FeatureEdit(sae, F, "set", 1.0)
    with pytest.raises(ValueError, match=r"feature: ids \[-1\] out of range"):
        fs.FeatureEdit(sae, [1, -1], "set", 1.0)
    with pytest.raises(ValueError, match=r"feature: ids .*out of range"):
        fs.SAEReplace(sae, {F + 3: 1.0})
    with pytest.raises(ValueError, match="feature: ids must be distinct"):
        fs.FeatureEdit(sae, [2, 2], "set", 1.0)
    with pytest.raises(TypeError, match="feature: expected"):
        fs.FeatureEdit(sae, 1.5, "set", 1.0)
    with pytest.raises(ValueError, match="op: expected one of"):
        fs.FeatureEdit(sae, 1, "multiply", 1.0)
    with pytest.raises(ValueError, match="value: expected a finite number, got nan"):
        fs.FeatureEdit(sae, 1, "set", float("nan"))
    with pytest.raises(ValueError, match="value: required"):
        fs.FeatureEdit(sae, 1, "add")
    with pytest.raises(ValueError, match=r"value: expected one value or 2 values"):
        fs.FeatureEdit(sae, [1, 2], "set", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lo <= hi"):
        fs.FeatureEdit(sae, 1, "clamp", 2.0, 1.0)
    with pytest.raises(ValueError, match="hi: only used with op='clamp'"):
        fs.FeatureEdit(sae, 1, "set", 1.0, 2.0)
    with pytest.raises(ValueError, match="preserve_norm: FeatureEdit on 2 features"):
        fs.FeatureEdit(sae, [1, 2], "set", 1.0, preserve_norm=True)
    topk = random_sae(D, F, "topk", seed=22, layer=1)
    with pytest.raises(ValueError, match="when: FeatureEdit on a TopK SAE"):
        fs.FeatureEdit(topk, [1, 2], "set", 1.0, when=fs.Projection(torch.ones(D), 0.0, bias=0.0))
    with pytest.raises(TypeError, match="sae: expected a fasteer.SAE"):
        fs.FeatureEdit(sae.W_enc, 1, "set", 1.0)
    with pytest.raises(TypeError, match=r"edits\[0\]: expected \(feature, op, value\)"):
        fs.SAEReplace(sae, [(1, "set")])
    with pytest.raises(TypeError, match="keep_error: expected a bool"):
        fs.SAEReplace(sae, {1: 1.0}, keep_error=1)
    # NaN weights: refused when the SAE is built, and when they appear afterwards
    W = sae.W_enc.clone()
    W[3, 7] = float("nan")
    with pytest.raises(ValueError, match="W_enc: contains 1 NaN/inf"):
        fs.SAE(W, sae.b_enc, sae.W_dec, sae.b_dec, layer=1, site="resid_post")
    broken = random_sae(D, F, "relu", seed=21, layer=1)
    broken.W_dec[7, 0] = float("nan")
    with pytest.raises(ValueError, match="W_dec of feature 7 contains NaN"):
        fs.FeatureEdit(broken, 7, "set", 1.0)
    fs.FeatureEdit(broken, 6, "set", 1.0)         # the fused edit reads feature 6 only
    with pytest.raises(ValueError, match="NaN"):
        fs.FeatureEdit(broken, [6, 7], "set", 1.0).lower(LoweringContext(3, D, "llama"))
    with pytest.raises(ValueError, match="sae.W_dec: contains NaN"):
        fs.SAEReplace(broken, {1: 1.0}).lower(LoweringContext(3, D, "llama"))


def test_sae_edits_under_torch_compile_fullgraph():
    """The full-SAE stages run inside a compiled forward (the op is a torch.library op)."""
    model = cached_model("llama")
    topk = random_sae(D, F, "topk", seed=22, layer=1)
    relu = random_sae(D, F, "relu", seed=23, layer=1)
    ids, mask = prompt_batch(3, 6, "left", seed=24)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
              return_dict_in_generate=True, output_logits=True)
    with fs.steer(model, fs.SAEReplace(topk, {3: 2.0}, keep_error=False, positions="prompt"),
                  fs.FeatureEdit(relu, [1, 2], "set", 3.0), fs.FeatureEdit(relu, 5, "add", 1.0)):
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **kw)
        torch._dynamo.reset()
        original = model.forward
        model.forward = torch.compile(original, fullgraph=True, backend="aot_eager")
        try:
            with torch.no_grad():
                got = model.generate(input_ids=ids, attention_mask=mask, **kw)
        finally:
            model.forward = original
            torch._dynamo.reset()
    assert torch.equal(got.sequences, want.sequences)
    assert max(float((g - w).abs().max()) for g, w in zip(got.logits, want.logits)) <= 1e-5
