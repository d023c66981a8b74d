"""`fasteer.sae.sae_quality` and `fasteer.sae.top_contexts` against direct computations.

The reference runs every text alone (no padding) and reaches the stream through a
hand-written forward pre-hook on the norm that reads the site (``input_layernorm`` /
``post_attention_layernorm`` / the final norm; ``ln_1`` / ``ln_2`` / ``ln_f``), which
captures it and, for splicing, overwrites it *in place* (the residual variable of the
decoder layer is the same tensor) -- a different mechanism from the layer hooks
`sae_quality` uses.  The SAE math is redone in float64.
"""
from __future__ import annotations

import random

import pytest
import torch

import fasteer as fs
from fasteer.sae import format_contexts, label_table, sae_quality, top_contexts
from sae_reference import random_sae
from test_fgaa import D, F, WORDS, gpt2, llama, tiny_gpt2, tiny_llama  # noqa: F401
from transformers import GPT2LMHeadModel


def texts_(n, seed, lo=1, hi=9):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


# --------------------------------------------------------------------------- reference

def reading_norm(model, layer, site):
    """The norm module that reads ``site[layer]`` (the reference's own table)."""
    if isinstance(model, GPT2LMHeadModel):
        blocks, final, pre, mid = model.transformer.h, model.transformer.ln_f, "ln_1", "ln_2"
    else:
        blocks, final, pre, mid = model.model.layers, model.model.norm, "input_layernorm", "post_attention_layernorm"
    if site == "resid_pre":
        return getattr(blocks[layer], pre)
    if site == "resid_mid":
        return getattr(blocks[layer], mid)
    return getattr(blocks[layer + 1], pre) if layer + 1 < len(blocks) else final


def run_one(model, ids, norm, replace=None):
    """Logits [T, V] of one unpadded text and the clean stream [T, D] read at ``norm``;
    ``replace(h)`` -> the stream written back in place."""
    got = {}

    def pre_hook(module, args):
        h = args[0]
        got["h"] = h[0].clone()
        if replace is not None:
            h.copy_(replace(h))

    handle = norm.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    return logits, got["h"]


def direct_quality(model, tokenizer, sae, texts, layer, site, skip_first=True, splice_first=True):
    norm = reading_norm(model, layer, site)
    s64 = sae.to(dtype=torch.float64)
    hs, ce = [], {"clean": [], "spliced": [], "zero": []}

    def keep0(h, new):
        if not splice_first:
            new = new.clone()
            new[:, 0] = h[:, 0]
        return new

    for text in texts:
        ids = tokenizer(text)["input_ids"]
        logits, h = run_one(model, ids, norm)
        hs.append(h[1:] if skip_first else h)
        runs = {"clean": logits,
                "spliced": run_one(model, ids, norm, lambda h: keep0(h, s64(h.double()).float()))[0],
                "zero": run_one(model, ids, norm, lambda h: keep0(h, torch.zeros_like(h)))[0]}
        for name, lg in runs.items():
            if len(ids) > 1:
                ce[name].append(torch.nn.functional.cross_entropy(
                    lg[:-1].double(), torch.tensor(ids[1:]), reduction="none"))
    x = torch.cat(hs).double()
    z = s64.encode(x)
    rec = s64.decode(z)
    ce = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    active = (z > 0).sum(0)
    return {
        "fve": float(1 - ((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
        "mse": float(((x - rec) ** 2).sum(-1).mean()),
        "mean_cosine": float(torch.nn.functional.cosine_similarity(x, rec, dim=-1).mean()),
        "mean_l0": float((z > 0).sum(-1).double().mean()),
        "density": active.double() / x.shape[0],
        "dead_ids": [int(i) for i in (active == 0).nonzero().flatten()],
        "n_tokens": x.shape[0],
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
    }


def assert_matches(got, ref):
    for key in ("fve", "mse", "mean_cosine", "ce_clean", "ce_spliced", "ce_zero", "loss_recovered"):
        assert got[key] == pytest.approx(ref[key], rel=2e-5, abs=2e-6), key
    assert got["mean_l0"] == pytest.approx(ref["mean_l0"], abs=1e-12)
    torch.testing.assert_close(got["density"], ref["density"], rtol=0, atol=1e-12)
    assert got["dead_ids"] == ref["dead_ids"]
    assert got["dead_features"] == len(ref["dead_ids"])
    assert got["dead_fraction"] == pytest.approx(len(ref["dead_ids"]) / got["density"].numel())
    assert got["n_tokens"] == ref["n_tokens"]


# --------------------------------------------------------------------------- sae_quality

CASES = [  # model, activation, layer, site, skip_first
    ("llama", "relu", 1, "resid_post", True),
    ("llama", "jumprelu", 1, "resid_mid", True),
    ("llama", "topk", 0, "resid_pre", False),
    ("llama", "relu", 2, "resid_post", True),      # last layer: read at the final norm
    ("gpt2", "jumprelu", 1, "resid_mid", True),
    ("gpt2", "relu", 2, "resid_post", False),
]


@pytest.mark.parametrize("which,activation,layer,site,skip_first", CASES)
def test_quality_matches_direct(request, which, activation, layer, site, skip_first):
    model, tok = request.getfixturevalue(which)
    sae = random_sae(D, F, activation, seed=layer + 7, layer=layer, site=site, gain=1.3)
    texts = texts_(7, seed=layer + 3)
    got = sae_quality(model, tok, sae, texts, batch_size=3, skip_first=skip_first, progress=False)
    ref = direct_quality(model, tok, sae, texts, layer, site, skip_first=skip_first)
    assert_matches(got, ref)
    # a random SAE: far from perfect, so the exact value above is a real check
    assert got["fve"] < 0.9 and abs(got["ce_spliced"] - got["ce_clean"]) > 1e-3
    assert got["layer"] == layer and got["site"] == site
    n_pred = sum(len(tok(t)["input_ids"]) - 1 for t in texts)
    assert got["n_predicted"] == n_pred
    if site != "resid_mid":
        assert got["splice_max_abs_diff"] == 0.0


def test_quality_splice_first_false_and_explicit_site(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=3, layer=0, site="resid_post")
    texts = texts_(5, seed=11, lo=2)
    with pytest.warns(UserWarning):   # applied away from its own site: warned, then done
        got = sae_quality(model, tok, sae, texts, layer=1, site="resid_mid", batch_size=2,
                          splice_first=False, progress=False)
    ref = direct_quality(model, tok, sae, texts, 1, "resid_mid", splice_first=False)
    assert_matches(got, ref)
    assert got["splice_first"] is False


def test_quality_perfect_sae(gpt2):
    """relu(x) - relu(-x) = x: FVE 1, cosine 1, CE unchanged, loss recovered 1."""
    model, tok = gpt2
    eye = torch.eye(D)
    sae = fs.SAE(torch.cat([eye, -eye], 1), torch.zeros(2 * D), torch.cat([eye, -eye], 0),
                 torch.zeros(D), layer=1, site="resid_post")
    got = sae_quality(model, tok, sae, texts_(4, seed=5, lo=2), batch_size=4, progress=False)
    assert got["fve"] == pytest.approx(1.0, abs=1e-6)
    assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["ce_spliced"] == pytest.approx(got["ce_clean"], abs=1e-6)
    assert got["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert got["mean_l0"] == D and got["dead_features"] < D  # one of x_d, -x_d fires per dim


def test_quality_max_length_truncates(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=6, layer=1, site="resid_post")
    texts = texts_(5, seed=21, lo=3)
    got = sae_quality(model, tok, sae, texts, max_length=3, progress=False)
    ref = direct_quality(model, tok, sae, [" ".join(t.split()[:2]) for t in texts], 1, "resid_post")
    assert_matches(got, ref)


def _hooks(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()}


def test_quality_hooks_removed_after_error(llama):
    model, tok = llama
    model.train()
    sae = random_sae(D, F, "relu", seed=1, layer=1, site="resid_mid")
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:       # the spliced forward
            raise RuntimeError("boom")

    handle = model.lm_head.register_forward_hook(boom)
    before = _hooks(model)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sae_quality(model, tok, sae, texts_(3, seed=2, lo=2), progress=False)
        assert _hooks(model) == before
        assert model.training        # train mode restored after the error too
    finally:
        handle.remove()
        model.eval()
    # and the model still gives its clean output
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    with torch.no_grad():
        a = model(input_ids=ids).logits
    sae_quality(model, tok, sae, ["the cat sat"], progress=False, skip_first=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, a)


def test_quality_restores_training_mode(gpt2):
    model, tok = gpt2
    model.train()
    try:
        sae_quality(model, tok, random_sae(D, F, layer=0), ["the cat sat"], progress=False)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=True), ValueError, "batch_size"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(layer=7), ValueError, "out of range"),
    (dict(layer=1.0), TypeError, "layer"),
    (dict(site="attn_out"), ValueError, "site"),
    (dict(site="resid_side"), ValueError, "site"),
    (dict(skip_first=1), TypeError, "skip_first"),
    (dict(splice_first=None), TypeError, "splice_first"),
    (dict(texts=[]), ValueError, "texts"),
    (dict(texts="the cat"), TypeError, "texts"),
    (dict(texts=["the", "a"]), ValueError, "skip_first"),        # one token each, first skipped
    (dict(texts=["the"], skip_first=False), ValueError, "two or more"),
    (dict(sae="nope"), TypeError, "sae"),
    (dict(sae=random_sae(D + 1, F, layer=1)), ValueError, "d_in"),
])
def test_quality_argument_errors_before_any_forward(gpt2, kwargs, error, match):
    model, tok = gpt2
    forwards = {"n": 0}
    handle = model.register_forward_pre_hook(lambda m, a: forwards.__setitem__("n", forwards["n"] + 1))
    args = dict(sae=random_sae(D, F, layer=1), texts=texts_(3, seed=1, lo=2))
    args.update(kwargs)
    before = _hooks(model)
    try:
        with pytest.raises(error, match=match):
            sae_quality(model, tok, args.pop("sae"), args.pop("texts"), progress=False, **args)
    finally:
        handle.remove()
    assert forwards["n"] == 0
    assert {k: v for k, v in _hooks(model).items() if k} == {k: v for k, v in before.items() if k}


# --------------------------------------------------------------------------- top_contexts

def brute_force_top(model, tok, sae, texts, features, k, layer, site, skip_first=False):
    norm = reading_norm(model, layer, site)
    s64 = sae.to(dtype=torch.float64)
    rows = []
    for t, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        z = s64.encode(run_one(model, ids, norm)[1].double())
        for p in range(1 if skip_first else 0, len(ids)):
            rows.append((t, p, ids, z[p]))
    out = {}
    for f in features:
        cands = [(-float(z[f]), t, p, ids) for t, p, ids, z in rows if z[f] > 0]
        cands.sort(key=lambda c: c[:3])
        out[f] = ([(t, p, ids[p], -v) for v, t, p, ids in cands[:k]], len(cands), len(rows))
    return out


@pytest.mark.parametrize("which,activation,layer,site,skip_first", [
    ("llama", "relu", 1, "resid_post", False),
    ("gpt2", "topk", 1, "resid_mid", True),
])
def test_top_contexts_equal_brute_force(request, which, activation, layer, site, skip_first):
    model, tok = request.getfixturevalue(which)
    sae = random_sae(D, F, activation, seed=4, layer=layer, site=site)
    texts = texts_(9, seed=8)
    features = [5, 0, 60, 17, 33]
    got = top_contexts(model, tok, sae, texts, features, k=4, window=3, batch_size=4,
                       skip_first=skip_first, progress=False)
    ref = brute_force_top(model, tok, sae, texts, features, 4, layer, site, skip_first)
    assert list(got) == features
    for f in features:
        want, n_active, n_tokens = ref[f]
        have = got[f]
        assert [(c.text_index, c.position, c.token_id) for c in have] == [w[:3] for w in want]
        for c, w in zip(have, want):
            assert c.value == pytest.approx(w[3], rel=1e-5, abs=1e-6)
            ids = tok(texts[c.text_index])["input_ids"]
            assert c.left_ids == tuple(ids[max(0, c.position - 3):c.position])
            assert c.token == tok.decode([c.token_id])
        assert have.n_active == n_active and have.n_tokens == n_tokens
        assert have.density == pytest.approx(n_active / n_tokens)


def test_top_contexts_ties_are_deterministic(llama):
    """The same text three times: equal activations, ordered by text index then position,
    whatever the batch size."""
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=2, layer=1, site="resid_post")
    texts = ["the cat sat on the mat"] * 3
    feature = next(f for f in range(F) if top_contexts(model, tok, sae, texts[:1], [f], k=1,
                                                        progress=False)[f])
    results = [top_contexts(model, tok, sae, texts, [feature], k=5, batch_size=b, progress=False)[feature]
               for b in (1, 2, 3)]
    keys = [[(c.text_index, c.position) for c in r] for r in results]
    assert keys[0] == keys[1] == keys[2]
    # the best position appears for text 0, 1, 2 in that order before anything lower
    best = results[0][0]
    assert [(c.text_index, c.position) for c in results[0][:3]] == [(t, best.position) for t in range(3)]


def test_top_contexts_arguments_and_rendering(gpt2):
    model, tok = gpt2
    sae = random_sae(D, F, "relu", seed=4, layer=1)
    with pytest.raises(ValueError, match="features"):
        top_contexts(model, tok, sae, ["the cat"], [F], progress=False)
    with pytest.raises(TypeError, match="features"):
        top_contexts(model, tok, sae, ["the cat"], "3", progress=False)
    with pytest.raises(ValueError, match="window"):
        top_contexts(model, tok, sae, ["the cat"], [1], window=-1, progress=False)
    with pytest.raises(ValueError, match="k"):
        top_contexts(model, tok, sae, ["the cat"], [1], k=0, progress=False)
    table = label_table(model, tok, sae, texts_(4, seed=3, lo=2), [1, 2], k=2, window=2, progress=False)
    assert "### feature 1" in table and "### feature 2" in table
    assert "⟦" in table or "_never active" in table
    ctx = {7: [fs.sae.Context(0, 2, 5, "a|b", "x\ny", (1, 2), 1.5)]}
    text = format_contexts(ctx)
    assert "x⏎y⟦a\\|b⟧" in text and "1.5" in text
