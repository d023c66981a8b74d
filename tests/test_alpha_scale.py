"""One meaning for alpha across extractors: metadata ``resid_norm`` and ``Add(scale="resid")``.

* every extractor's ``resid_norm`` equals the median of float64 norms read by plain hooks,
  each prompt run alone (no padding), at the positions the extractor used;
* ``Add(v, a, scale="resid")`` on the fused path equals a plain hook adding
  ``a * n_l * v_l / |v_l|`` (logits, Llama and GPT-2, left-padded batch);
* ``resid_norm`` survives safetensors and GGUF (renumbered with a resid_pre vector);
* every error is raised before the model changes.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import fasteer as fs
from fasteer.sites import decoder_layers
from sae_reference import random_sae
from test_fgaa import D, F, gpt2, llama, prompts  # noqa: F401  (fixtures)


# ----------------------------------------------------------------------------- references

def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def direct_norms(model, tok, texts, layers, *, site="resid_post", position="last"):
    """{layer: median float64 norm} from plain hooks, each prompt alone."""
    got = {l: [] for l in layers}
    mods = decoder_layers(model)
    captured = {}
    handles = []
    for l in layers:
        if site == "resid_post":
            handles.append(mods[l].register_forward_hook(
                lambda m, a, o, l=l: captured.__setitem__(l, _out(o).detach().clone())))
        else:
            handles.append(mods[l].register_forward_pre_hook(
                lambda m, a, kw, l=l: captured.__setitem__(l, (a[0] if a else kw["hidden_states"]).detach().clone()),
                with_kwargs=True))
    try:
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                model(input_ids=ids)
            for l in layers:
                h = captured[l][0].double()                      # [T, D]
                n = h.norm(dim=-1)
                got[l].extend(n[-1:].tolist() if position == "last" else n.tolist())
    finally:
        for h in handles:
            h.remove()
    return {l: statistics.median(v) for l, v in got.items()}


def _check_norms(vec, ref, layers):
    stored = vec.metadata["resid_norm"]
    assert sorted(stored) == sorted(str(l) for l in layers)
    for l in layers:
        assert stored[str(l)] == pytest.approx(ref[l], rel=1e-5), (l, stored, ref)
    assert vec.resid_norm == {l: stored[str(l)] for l in layers}


# ----------------------------------------------------------------------------- resid_norm

@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["last", "mean"])
def test_extractors_record_median_norms(which, position, request):
    model, tok = request.getfixturevalue(which)
    pos, neg = prompts(7, 11), prompts(7, 12)
    layers = [0, 2]
    for site in ("resid_post", "resid_pre"):
        ref = direct_norms(model, tok, pos + neg, layers, site=site,
                           position="last" if position == "last" else "all")
        opts = dict(layers=layers, site=site, position=position, progress=False, batch_size=3)
        _check_norms(fs.extract.caa(model, tok, pos, neg, **opts), ref, layers)
        _check_norms(fs.extract.pca(model, tok, pos, neg, method="pca_center", **opts), ref, layers)
        _check_norms(fs.extract.instruction(model, tok, pos, neg, **opts).vector, ref, layers)
        _check_norms(fs.extract.ablation_direction(model, tok, pos, neg, **opts), ref, layers)
    # unpaired sets of different sizes: the pooled median
    more = prompts(4, 13)
    ref = direct_norms(model, tok, pos + more, layers,
                       position="last" if position == "last" else "all")
    _check_norms(fs.extract.ablation_direction(model, tok, pos, more, layers=layers,
                                               position=position, progress=False), ref, layers)


@pytest.mark.parametrize("position", ["all", "last"])
def test_resid_norms_helper_and_with_resid_norm(llama, position):
    model, tok = llama
    texts = prompts(9, 21)
    ref = direct_norms(model, tok, texts, [1, 2], position=position)
    got = fs.extract.resid_norms(model, tok, texts, [1, 2], position=position, progress=False,
                                 batch_size=4)
    assert got == pytest.approx(ref, rel=1e-5)
    g = torch.Generator().manual_seed(3)
    vec = fs.SteeringVector({1: torch.randn(D, generator=g), 2: torch.randn(D, generator=g)})
    assert vec.resid_norm is None
    with_norm = vec.with_resid_norm(model, tok, texts, position=position, progress=False)
    assert with_norm.resid_norm == pytest.approx(ref, rel=1e-5)
    assert with_norm.allclose(vec)
    given = vec.with_resid_norm({1: 3.5, "2": 7.25})
    assert given.resid_norm == {1: 3.5, 2: 7.25}
    with pytest.raises(ValueError, match="no norm for layers \\[2\\]"):
        vec.with_resid_norm({1: 3.5})
    with pytest.raises(ValueError, match="> 0"):
        vec.with_resid_norm({1: 3.5, 2: 0.0})
    with pytest.raises(ValueError, match="position"):
        fs.extract.resid_norms(model, tok, texts, [1], position="mean")


def test_fgaa_records_norms_of_every_real_token(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=5, site="resid_post", layer=1)
    pos, neg = prompts(5, 31), prompts(5, 32)
    vec = fs.extract.fgaa(model, tok, sae, pos, neg, density_threshold=None, progress=False,
                          batch_size=3)
    ref = direct_norms(model, tok, pos + neg, [1], position="all")
    _check_norms(vec, ref, [1])


# ----------------------------------------------------------------------------- Add(scale="resid")

def hook_logits(model, ids, mask, added: dict[int, torch.Tensor]):
    """Logits with ``added[l]`` (float64) added to resid_post[l] of every token by hooks."""
    mods = decoder_layers(model)

    def hook(l):
        def fn(m, a, o):
            h = _out(o)
            h.add_(added[l].to(h.dtype))
            return o
        return fn
    handles = [mods[l].register_forward_hook(hook(l)) for l in added]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()


def _batch(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_add_resid_matches_hook_reference(which, request):
    model, tok = request.getfixturevalue(which)
    vocab = model.config.vocab_size
    pos, neg = prompts(6, 41), prompts(6, 42)
    layers = [0, 2]
    vec = fs.extract.caa(model, tok, pos, neg, layers=layers, progress=False)
    g = torch.Generator().manual_seed(43)
    rnd = fs.SteeringVector({l: torch.randn(D, generator=g) * (l + 0.3) for l in layers}) \
        .with_resid_norm({0: 2.75, 2: 11.5})
    ids, mask = _batch(44, vocab)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    for v in (vec, rnd):
        norms = v.resid_norm
        for alpha in (0.37, -0.13):
            added = {l: alpha * norms[l] * v[l].double() / v[l].double().norm() for l in layers}
            ref = hook_logits(model, ids, mask, added)
            with fs.steer(model, fs.Add(v, alpha, scale="resid")):
                with torch.no_grad():
                    got = model(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()
            assert torch.allclose(got[real], ref[real], atol=2e-4, rtol=1e-4), \
                (got[real] - ref[real]).abs().max()
            assert not torch.allclose(got[real], plain[real], atol=1e-2)
            # the length added is alpha * n_l whatever |v| is
            ctx = fs.plan.LoweringContext(3, D, "x")
            for e in fs.Add(v, alpha, scale="resid").lower(ctx):
                assert abs(e.p[0]) * float(e.u.double().norm()) == \
                    pytest.approx(abs(alpha) * norms[e.layer], rel=1e-6)
    # raw stays what it was: alpha * v
    with fs.steer(model, fs.Add(rnd, 0.5)):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
    ref = hook_logits(model, ids, mask, {l: 0.5 * rnd[l].double() for l in layers})
    assert torch.allclose(got[mask.bool()], ref[mask.bool()], atol=2e-4, rtol=1e-4)


def test_add_resid_same_meaning_for_unit_and_raw_vectors(llama):
    """A unit pca vector and the raw CAA vector of the same direction add the same thing."""
    model, tok = llama
    pos, neg = prompts(6, 51), prompts(6, 52)
    caa = fs.extract.caa(model, tok, pos, neg, layers=[1], progress=False)
    unit = caa.normalized()
    assert unit.resid_norm == caa.resid_norm
    ctx = fs.plan.LoweringContext(3, D, "x")
    a = fs.Add(caa, 0.2, scale="resid").lower(ctx)[0]
    b = fs.Add(unit, 0.2, scale="resid").lower(ctx)[0]
    assert torch.allclose(a.u * a.p[0], b.u * b.p[0], atol=1e-6)


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_resid_norm_round_trips(tmp_path, llama, suffix, site):
    model, tok = llama
    vec = fs.extract.caa(model, tok, prompts(5, 61), prompts(5, 62), layers=[1, 2], site=site,
                         progress=False)
    path = tmp_path / f"v{suffix}"
    vec.save(path, **({"allow_layer_zero": True} if suffix == ".gguf" else {}))
    back = fs.SteeringVector.load(path)
    if suffix == ".gguf" and site == "resid_pre":
        # resid_pre[l] is written as direction.{l-1} (= resid_post[l-1], the same point)
        assert back.site == "resid_post" and back.layers == [0, 1]
        assert back.resid_norm == {l - 1: n for l, n in vec.resid_norm.items()}
    else:
        assert back.resid_norm == vec.resid_norm
    ctx = fs.plan.LoweringContext(3, D, "x")
    for e0, e1 in zip(fs.Add(vec, 0.3, scale="resid").lower(ctx),
                      fs.Add(back, 0.3, scale="resid").lower(ctx)):
        assert torch.equal(e0.u, e1.u)


# ----------------------------------------------------------------------------- errors

def test_errors_before_the_model_changes(llama):
    model, tok = llama
    ids, mask = _batch(71, model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits.clone()
    g = torch.Generator().manual_seed(72)
    raw = {1: torch.randn(D, generator=g), 2: torch.randn(D, generator=g)}
    vec = fs.SteeringVector(raw)
    normed = vec.with_resid_norm({1: 4.0, 2: 5.0})
    only1 = fs.SteeringVector(raw, metadata={"resid_norm": {"1": 4.0}})
    zero = fs.SteeringVector({1: torch.zeros(D)}).with_resid_norm({1: 3.0})
    cases = [
        (lambda: fs.Add(normed, 0.1, scale="bogus"), "scale: expected one of"),
        (lambda: fs.Add(normed, 0.1, scale=None), "scale: expected one of"),
        (lambda: fs.Add(raw[1], 0.1, layers=[1], scale="resid"), "with_resid_norm"),
        (lambda: fs.Add(raw, 0.1, scale="resid"), "with_resid_norm"),
        (lambda: fs.Add(vec, 0.1, scale="resid"), "no resid_norm.*with_resid_norm"),
        (lambda: fs.Add(only1, 0.1, scale="resid"), "no norm for layers \\[2\\]"),
        (lambda: fs.Add(torch.randn(4, D), 0.1, layers=[1], scale="resid"), "per-position"),
        (lambda: fs.Add(normed, 0.1, site="resid_pre", scale="resid"), "site"),
        (lambda: fs.Add(zero, 0.1, scale="resid"), "zero vector"),
        (lambda: fs.Add(normed, 1e300, scale="resid"), "alpha"),
    ]
    st = fs.patch(model)
    try:
        for make, match in cases:
            with pytest.raises((ValueError, TypeError), match=match):
                st.set(make())
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    finally:
        st.unpatch()
    for make, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fs.steer(model, make())
        assert "generate" not in model.__dict__
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    fs.patch(model).unpatch()          # nothing was left patched
