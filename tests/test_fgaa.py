"""`fasteer.extract.fgaa` against a direct computation: each prompt run alone (no padding)
with ``output_hidden_states=True``, the SAE's own ``encode`` in float64, the filters and the
top-k written out here, the decode as ``sum_k v[k] W_dec[k] / s``."""
from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fasteer as fs
from fasteer.extract import feature_density, fgaa
from sae_reference import random_sae

WORDS = "the a cat dog sat ran on mat happy sad very not is was big small red blue it we they".split()
D, F = 40, 61


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                           special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   model_input_names=["input_ids", "attention_mask"],
                                   unk_token="[UNK]", pad_token="[PAD]")


def _scaled(model):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def tiny_llama():
    """(model, tokenizer): a 3-layer Llama over WORDS with O(1) random weights, BOS added
    (shared by test_effects and test_sae_quality)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=D, intermediate_size=56,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return _scaled(LlamaForCausalLM(config)), make_tokenizer(bos=True)


def tiny_gpt2():
    """(model, tokenizer): a 3-layer GPT-2 over WORDS, no BOS."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS) + 4, n_embd=D, n_layer=3, n_head=4, n_positions=64)
    return _scaled(GPT2LMHeadModel(config)), make_tokenizer(bos=False)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def prompts(n, seed, lo=2, hi=8):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _latents(model, tokenizer, sae, texts, layer):
    """Per prompt: float64 latents [T, F] of resid_post[layer] and whether token 0 is BOS."""
    s64 = sae.to(dtype=torch.float64)
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append((s64.encode(hs[layer + 1][0].double()), int(ids[0, 0]) == tokenizer.bos_token_id))
    return out


def direct_fgaa(model, tokenizer, sae, pos, neg, *, threshold, top_k, bos_filter, density=None):
    lp, ln = _latents(model, tokenizer, sae, pos, sae.layer), _latents(model, tokenizer, sae, neg, sae.layer)
    v = torch.stack([z.mean(0) for z, _ in lp]).mean(0) - torch.stack([z.mean(0) for z, _ in ln]).mean(0)
    every = torch.cat([z for z, _ in lp + ln])
    rate = density.double() if density is not None else (every > 0).double().mean(0)
    keep = (rate <= threshold) & (v > 0)
    if bos_filter:
        for z, is_bos in lp + ln:
            if is_bos:
                keep &= ~(z[0] > 0)
    idx = torch.nonzero(keep).flatten()
    order = idx[torch.argsort(v[idx], descending=True)][:top_k]
    vec = (v[order].unsqueeze(-1) * sae.W_dec.double()[order] / sae.input_scale).sum(0)
    return vec, order.tolist(), v


@pytest.mark.parametrize("which,activation,scale", [("llama", "relu", None), ("llama", "jumprelu", 1.7),
                                                   ("gpt2", "topk", None)])
def test_fgaa_matches_the_direct_computation(which, activation, scale, request):
    model, tok = request.getfixturevalue(which)
    sae = random_sae(D, F, activation, seed=51, layer=1, site="resid_post", scale=scale,
                     gain=0.5 / (scale or 1.0))
    pos, neg = prompts(6, 1), prompts(5, 2)
    sv = fgaa(model, tok, sae, pos, neg, density_threshold=0.35, top_k=6, batch_size=4,
              progress=False)
    vec, order, v = direct_fgaa(model, tok, sae, pos, neg, threshold=0.35, top_k=6, bos_filter=True)
    assert sv.site == "resid_post" and sv.layers == [1]
    assert sv.metadata["method"] == "fgaa" and sv.metadata["features"] == order
    assert len(order) == 6
    assert torch.allclose(torch.tensor(sv.metadata["feature_weights"], dtype=torch.float64),
                          v[order], rtol=1e-5, atol=1e-6)
    got = sv.directions[1].double()
    assert float((got - vec).abs().max()) <= 1e-5 * float(vec.abs().max())
    # Add(vec) is what a user applies: it steers
    ids = torch.tensor([tok(pos[0])["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with fs.steer(model, fs.Add(sv, 4.0)):
            steered = model(input_ids=ids).logits
    assert float((steered - plain).abs().max()) > 1e-2


def test_fgaa_filters(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=52, layer=1, site="resid_post", gain=0.5,
                     apply_b_dec=False)
    # feature 0 reads the BOS token's residual; short positive prompts weigh their BOS token
    # more in the token average, so it gets a large positive contrast -- the artefact the
    # BOS filter is for
    with torch.no_grad():
        h_bos = model(input_ids=torch.tensor([[tok.bos_token_id]]),
                      output_hidden_states=True).hidden_states[2][0, 0]
    sae.W_enc[:, 0] = 3 * h_bos / h_bos.norm()
    sae.b_enc[0] = -2.4 * h_bos.norm()
    pos, neg = prompts(6, 3, 2, 3), prompts(6, 4, 6, 9)
    common = dict(top_k=8, progress=False)
    # the BOS filter removes features that fire on [BOS]; without it they can be picked
    with_bos = fgaa(model, tok, sae, pos, neg, density_threshold=0.5, **common)
    no_bos = fgaa(model, tok, sae, pos, neg, density_threshold=0.5, bos_feature_filter=False, **common)
    _, want_with, _ = direct_fgaa(model, tok, sae, pos, neg, threshold=0.5, top_k=8, bos_filter=True)
    _, want_without, _ = direct_fgaa(model, tok, sae, pos, neg, threshold=0.5, top_k=8, bos_filter=False)
    assert with_bos.metadata["features"] == want_with
    assert no_bos.metadata["features"] == want_without
    assert 0 in want_without and 0 not in want_with and with_bos.metadata["dropped_bos"] > 0
    # a given density replaces the one measured on the prompts
    density = torch.zeros(F, dtype=torch.float64)
    density[want_without[:3]] = 0.2
    given = fgaa(model, tok, sae, pos, neg, density_threshold=0.01, density=density,
                 bos_feature_filter=False, **common)
    _, want_given, _ = direct_fgaa(model, tok, sae, pos, neg, threshold=0.01, top_k=8,
                                   bos_filter=False, density=density)
    assert given.metadata["features"] == want_given
    assert not set(want_without[:3]) & set(want_given)
    assert given.metadata["density_source"] == "given"
    # the measured density drops features firing on more than the threshold of tokens
    strict = fgaa(model, tok, sae, pos, neg, density_threshold=0.3, bos_feature_filter=False, **common)
    _, want_strict, _ = direct_fgaa(model, tok, sae, pos, neg, threshold=0.3, top_k=8, bos_filter=False)
    assert strict.metadata["features"] == want_strict and want_strict != want_without
    # nothing left: a clear error saying why
    with pytest.raises(ValueError, match=r"fgaa: no feature left: \d+ dropped as denser than 0.0"):
        fgaa(model, tok, sae, pos, neg, density_threshold=0.0, **common)


def test_feature_density_matches_direct(gpt2):
    model, tok = gpt2
    sae = random_sae(D, F, "jumprelu", seed=53, layer=1, site="resid_post", gain=0.5)
    texts = prompts(7, 5)
    got = feature_density(model, tok, sae, texts, batch_size=3, progress=False)
    every = torch.cat([z for z, _ in _latents(model, tok, sae, texts, 1)])
    assert torch.allclose(got, (every > 0).double().mean(0))
    assert 0 < float(got.max()) <= 1


def test_fgaa_bad_input(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=54, layer=1, site="resid_post")
    pos, neg = prompts(3, 6), prompts(3, 7)
    with pytest.raises(ValueError, match=r"sae: d_in = 33 but the model's hidden size is 40"):
        fgaa(model, tok, random_sae(33, F, "relu", seed=55, layer=1), pos, neg, progress=False)
    with pytest.raises(TypeError, match="sae: expected a fasteer.SAE"):
        fgaa(model, tok, "sae", pos, neg, progress=False)
    with pytest.raises(ValueError, match="density_threshold: expected a fraction in"):
        fgaa(model, tok, sae, pos, neg, density_threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="top_k: expected a positive int"):
        fgaa(model, tok, sae, pos, neg, top_k=0, progress=False)
    with pytest.raises(ValueError, match=rf"density: expected a float tensor \[d_sae\] = \[{F}\]"):
        fgaa(model, tok, sae, pos, neg, density=torch.zeros(F + 1), progress=False)
    with pytest.raises(ValueError, match="positive: expected at least one prompt"):
        fgaa(model, tok, sae, [], neg, progress=False)
    with pytest.warns(UserWarning, match=r"trained at resid_post\[1\].*resid_post\[4\]"), \
            pytest.raises(ValueError, match="out of range"):
        fgaa(model, tok, sae, pos, neg, layer=4, progress=False)


# ------------------------------------------------------------- effect mapping (SAE-TS)
def _unit(x):
    return x / x.norm()


def _approximator(layer=1, site="resid_post", d=D, f=F, seed=71):
    from fasteer.extract import EffectApproximator
    g = torch.Generator().manual_seed(seed)
    return EffectApproximator(torch.randn(d, f, generator=g), torch.randn(f, generator=g),
                              layer=layer, site=site, metadata={"vector_norm": 3.0})


def test_fgaa_effect_mapping_matches_the_formula(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=51, layer=1, site="resid_post", gain=0.5)
    pos, neg = prompts(6, 1), prompts(5, 2)
    approx = _approximator()
    common = dict(density_threshold=0.35, top_k=6, batch_size=4, progress=False)
    sv = fgaa(model, tok, sae, pos, neg, approximator=approx, **common)
    _, order, v = direct_fgaa(model, tok, sae, pos, neg, threshold=0.35, top_k=6, bos_filter=True)
    t = torch.zeros(F, dtype=torch.float64)
    t[order] = v[order]
    W, b = approx.W.double(), approx.b.double()
    want = _unit(_unit(W @ t) - _unit(W @ b))
    got = sv.directions[1].double()
    assert torch.allclose(got, want, atol=1e-6)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)
    assert sv.metadata["mapping"] == "effect" and sv.metadata["features"] == order
    assert "unit(W v_target)" in sv.metadata["formula"]
    # explicit mapping="decoder" with an approximator ignores it; the default without one
    # is the decoder mapping, unchanged
    dec = fgaa(model, tok, sae, pos, neg, approximator=approx, mapping="decoder", **common)
    plain = fgaa(model, tok, sae, pos, neg, **common)
    assert plain.metadata["mapping"] == "decoder" and dec.metadata["mapping"] == "decoder"
    assert torch.equal(dec.directions[1], plain.directions[1])
    vec, _, _ = direct_fgaa(model, tok, sae, pos, neg, threshold=0.35, top_k=6, bos_filter=True)
    assert float((plain.directions[1].double() - vec).abs().max()) <= 1e-5 * float(vec.abs().max())
    assert not torch.allclose(plain.directions[1].double() / vec.norm(), got, atol=1e-2)


def test_fgaa_effect_mapping_errors_before_any_forward(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=54, layer=1, site="resid_post")
    pos, neg = prompts(3, 6), prompts(3, 7)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="mapping='effect' needs approximator="):
            fgaa(model, tok, sae, pos, neg, mapping="effect", progress=False)
        with pytest.raises(ValueError, match="mapping: expected 'decoder' or 'effect'"):
            fgaa(model, tok, sae, pos, neg, mapping="pinv", progress=False)
        with pytest.raises(TypeError, match="approximator: expected a fasteer.extract.EffectApproximator"):
            fgaa(model, tok, sae, pos, neg, approximator="fx", progress=False)
        with pytest.raises(ValueError, match=rf"approximator: fitted for d_model={D}, d_sae={F + 1}"):
            fgaa(model, tok, sae, pos, neg, approximator=_approximator(f=F + 1), progress=False)
        with pytest.raises(ValueError, match=r"approximator: fitted at resid_post\[2\], but the vector "
                                             r"is built for resid_post\[1\]"):
            fgaa(model, tok, sae, pos, neg, approximator=_approximator(layer=2), progress=False)
        with pytest.raises(ValueError, match=r"fitted at resid_pre\[1\]"):
            fgaa(model, tok, sae, pos, neg, approximator=_approximator(site="resid_pre"), progress=False)
        assert calls == []
    finally:
        handle.remove()


# ------------------------------------------------------------- degenerate results warn

def _direct_retained(sae, v, kept):
    W = sae.W_dec.double() / sae.input_scale
    target = torch.zeros_like(v)
    target[kept] = v[kept]
    return float((target @ W).norm() / (v.clamp(min=0) @ W).norm())


def test_fgaa_warns_when_the_filters_leave_a_degenerate_vector(llama):
    import warnings
    from fasteer.extract import FGAADegenerateWarning
    from fasteer.extract.fgaa import MIN_RETAINED
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=57, layer=1, site="resid_post", gain=0.5)
    pos, neg = prompts(6, 8), prompts(6, 9)
    _, _, v = direct_fgaa(model, tok, sae, pos, neg, threshold=1.0, top_k=F, bos_filter=False)
    positive = torch.nonzero(v > 0).flatten()
    ranked = positive[torch.argsort(v[positive])]            # smallest contrast first
    assert len(ranked) >= 6
    common = dict(density_threshold=0.01, bos_feature_filter=False, top_k=F, progress=False)
    seen = set()
    # keep the n smallest-contrast features (the rest marked dense): small n degenerate
    for n in (1, 2, len(ranked) // 2, len(ranked) - 1, len(ranked)):
        kept = ranked[:n]
        density = torch.full((F,), 0.5, dtype=torch.float64)
        density[kept] = 0.0
        want = _direct_retained(sae, v, kept)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vec = fgaa(model, tok, sae, pos, neg, density=density, **common)
        ours = [w for w in caught if issubclass(w.category, FGAADegenerateWarning)]
        assert vec.metadata["retained_fraction"] == pytest.approx(want, rel=1e-4, abs=1e-9)
        assert sorted(vec.metadata["features"]) == sorted(kept.tolist())
        assert len(ours) == (1 if want < MIN_RETAINED else 0), (n, want)
        seen.add(want < MIN_RETAINED)
        if ours:
            msg = str(ours[0].message)
            dropped = len(ranked) - n
            assert issubclass(ours[0].category, UserWarning)
            assert f"{dropped} feature(s) with a positive difference were dropped as denser " \
                   f"than 0.01" in msg
            assert "density=" in msg and "density_threshold" in msg
            assert ours[0].filename == __file__            # points at the caller
    assert seen == {True, False}                           # both sides of the criterion ran
    # the density measured on the prompts themselves (the everyday case): the warning
    # names that source, and fires exactly when the direct ratio is under the bound
    measured = _latents(model, tok, sae, pos + neg, 1)
    rate = (torch.cat([z for z, _ in measured]) > 0).double().mean(0)
    for threshold in sorted(set(rate[v > 0].tolist()))[:3]:
        survivors = torch.nonzero((rate <= threshold) & (v > 0)).flatten()
        expect = _direct_retained(sae, v, survivors)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fgaa(model, tok, sae, pos, neg, density_threshold=threshold,
                 bos_feature_filter=False, top_k=F, progress=False)
        ours = [w for w in caught if issubclass(w.category, FGAADegenerateWarning)]
        assert len(ours) == (1 if expect < MIN_RETAINED else 0), (threshold, expect)
        if ours:
            assert "measured on the positive and negative prompts" in str(ours[0].message)


def test_fgaa_normal_case_does_not_warn(llama):
    import warnings
    from fasteer.extract import FGAADegenerateWarning
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=58, layer=1, site="resid_post", gain=0.5)
    pos, neg = prompts(6, 10), prompts(6, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FGAADegenerateWarning)
        vec = fgaa(model, tok, sae, pos, neg, density_threshold=None, top_k=F, progress=False,
                   bos_feature_filter=False)
    assert vec.metadata["retained_fraction"] == pytest.approx(1.0, rel=1e-9)
