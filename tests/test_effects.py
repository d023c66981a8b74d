"""`fasteer.extract.effects` (the SAE-TS effect approximator) against direct computations:
the regression against a known linear map, the measured effects against each row generated
alone (no padding, no KV cache, a hand-written hook and sampler), the file format, argument
errors before any forward, and `targeted_vector` against its formula in float64."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fasteer as fs
from fasteer.extract import EffectApproximator, fit_effect_approximator, targeted_vector
from fasteer.extract.effects import fit_effect_map, measure_effects, row_uniforms
from sae_reference import random_sae
from test_fgaa import D, F, gpt2, llama, prompts, tiny_gpt2, tiny_llama  # noqa: F401


# ------------------------------------------------------------------ regression
def test_fit_effect_map_recovers_a_linear_map():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3
    W0 = torch.randn(7, 11, generator=g, dtype=torch.float64)
    b0 = torch.randn(11, generator=g, dtype=torch.float64)
    Y = X @ W0 + b0
    W, b, m = fit_effect_map(X, Y, ridge=0.0, held_out=0.2, seed=1)
    assert torch.allclose(W, W0, atol=1e-9) and torch.allclose(b, b0, atol=1e-9)
    assert m["n_train"] == 40 and m["n_held_out"] == 10
    assert m["r2_pooled"] == pytest.approx(1.0, abs=1e-12)
    assert m["r2_mean_feature"] == pytest.approx(1.0, abs=1e-12)
    assert m["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    # ridge shrinks W; the closed form is the one written out
    Wr, br, _ = fit_effect_map(X, Y, ridge=0.5, held_out=0.0)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    G = Xc.T @ Xc
    lam = 0.5 * torch.trace(G) / 7
    want = torch.linalg.solve(G + lam * torch.eye(7, dtype=torch.float64), Xc.T @ Yc)
    assert torch.allclose(Wr, want, atol=1e-10)
    assert torch.allclose(br, Y.mean(0) - X.mean(0) @ want, atol=1e-10)
    assert float((Wr - W0).abs().max()) > 1e-2
    # noise: R^2 below 1, computed as 1 - SSE/SST on the held-out rows
    Yn = Y + torch.randn(Y.shape, generator=g, dtype=torch.float64) * 2
    Wn, bn, mn = fit_effect_map(X, Yn, ridge=0.0, held_out=0.2, seed=1)
    test = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:10]
    P = X[test] @ Wn + bn
    sst = ((Yn[test] - Yn[test].mean(0)) ** 2).sum()
    assert mn["r2_pooled"] == pytest.approx(float(1 - ((Yn[test] - P) ** 2).sum() / sst), rel=1e-10)
    assert mn["r2_pooled"] < 0.999
    with pytest.raises(ValueError, match="held_out"):
        fit_effect_map(X[:1], Y[:1], held_out=0.5)
    with pytest.raises(ValueError, match="effects: expected a tensor"):
        fit_effect_map(X, Y[:-1])



def test_ridge_grid_is_chosen_on_training_rows_only():
    """A list of ridges: each fitted on 90% of the training rows and scored on the other
    10%; the best is refitted on all training rows. Noisy targets make a large ridge win;
    changing the held-out rows changes neither the choice nor W."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(12, 9, generator=g, dtype=torch.float64) * 0.1 + \
        torch.randn(200, 9, generator=g, dtype=torch.float64) * 3
    grid = [0.0, 0.01, 1.0, 100.0]
    W, b, m = fit_effect_map(X, Y, ridge=grid, held_out=0.1, seed=2)
    scores = m["ridge_validation_r2"]
    assert set(scores) == {repr(r) for r in grid}
    assert m["ridge_chosen"] == max(grid, key=lambda r: scores[repr(r)])
    assert m["ridge_chosen"] > 0                 # noise: plain least squares does not win
    # the refit with the chosen ridge is the single-value fit
    W1, b1, _ = fit_effect_map(X, Y, ridge=m["ridge_chosen"], held_out=0.1, seed=2)
    assert torch.allclose(W, W1) and torch.allclose(b, b1)
    # the held-out rows take no part in the choice
    test = torch.randperm(200, generator=torch.Generator().manual_seed(2))[:20]
    Y2 = Y.clone()
    Y2[test] += 50.0
    W2, _, m2 = fit_effect_map(X, Y2, ridge=grid, held_out=0.1, seed=2)
    assert m2["ridge_chosen"] == m["ridge_chosen"] and torch.allclose(W2, W)
    assert m2["r2_pooled"] != m["r2_pooled"]
    for bad, msg in (([], "non-empty"), ([0.1, 0.1], "distinct"), ([-1.0], "ridge")):
        with pytest.raises(ValueError, match=msg):
            fit_effect_map(X, Y, ridge=bad)


# ---------------------------------------------------------- measured effects
def _sample(logits, u, top_k, top_p):
    probs = torch.softmax(logits.double(), -1)
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    kept, mass = [], 0.0
    total = float(sum(probs[i] for i in order[:top_k]))
    for i in order[:top_k]:
        if mass >= top_p:
            break
        kept.append(i)
        mass += float(probs[i]) / total
    w = torch.tensor([float(probs[i]) for i in kept], dtype=torch.float64)
    c = torch.cumsum(w, 0) / w.sum()
    for i, ci in zip(kept, c):
        if float(u) < float(ci):
            return i
    return kept[-1]


def _layer_module(model, layer):
    return model.model.layers[layer] if hasattr(model, "model") else model.transformer.h[layer]


def _direct_row(model, tok, sae64, text, vec, u, layer, top_k, top_p):
    """One row alone: full recompute each step, a hook adding vec to the layer's output."""
    ids = tok(text)["input_ids"]
    n_prompt = len(ids)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h.add_(vec.to(h.dtype))

    handle = _layer_module(model, layer).register_forward_hook(hook) if vec is not None else None
    try:
        for t in range(len(u)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(_sample(logits, u[t], top_k, top_p))
    finally:
        if handle is not None:
            handle.remove()
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    z = sae64.encode(hs[layer + 1][0].double())
    return z[n_prompt:].mean(0), ids


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_measured_effects_equal_rows_run_alone(which, request):
    model, tok = request.getfixturevalue(which)
    sae = random_sae(D, F, "relu", seed=61, layer=1, site="resid_post", gain=0.5)
    texts = prompts(3, 11)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(3, D, generator=g)
    V = V / V.norm(dim=1, keepdim=True) * 6.0
    kw = dict(max_new_tokens=4, samples_per_vector=2, baseline_samples=2, seed=7, top_k=12,
              top_p=0.8, progress=False)
    m = measure_effects(model, tok, sae, texts, V, batch_size=4, **kw)
    sae64 = sae.to(dtype=torch.float64)
    base = []
    base_ids = []
    for p, text in enumerate(texts):
        rows = [_direct_row(model, tok, sae64, text, None, row_uniforms(7, 1, p * 2 + j, 4), 1, 12, 0.8)
                for j in range(2)]
        base.append(torch.stack([z for z, _ in rows]).mean(0))
        base_ids += [ids for _, ids in rows]
    base = torch.stack(base)
    assert torch.allclose(m.baseline, base, atol=1e-5)
    effects, changed = [], 0
    for i in range(3):
        diffs = []
        for j in range(2):
            r = i * 2 + j
            p = r % 3
            z, ids = _direct_row(model, tok, sae64, texts[p], V[i], row_uniforms(7, 0, r, 4), 1, 12, 0.8)
            diffs.append(z - base[p])
            changed += ids not in base_ids
        effects.append(torch.stack(diffs).mean(0))
    effects = torch.stack(effects)
    assert torch.allclose(m.effects, effects, atol=1e-5)
    assert changed > 0                                   # steering changed what was generated
    assert float(m.effects.abs().max()) > 1e-2
    # batching does not change anything: every row has its own uniforms
    m1 = measure_effects(model, tok, sae, texts, V, batch_size=1, **kw)
    assert torch.allclose(m1.effects, m.effects, atol=1e-5)


def test_fit_effect_approximator_end_to_end(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=62, layer=1, site="resid_post", gain=0.5)
    texts = prompts(4, 12)
    approx = fit_effect_approximator(model, tok, sae, texts, n_vectors=10, scale=0.5,
                                     max_new_tokens=3, samples_per_vector=1, baseline_samples=2,
                                     batch_size=8, held_out=0.2, seed=3, progress=False)
    assert approx.W.shape == (D, F) and approx.b.shape == (F,) and approx.W.dtype == torch.float32
    assert (approx.layer, approx.site) == (1, "resid_post")
    meta = approx.metadata
    # the residual norm is the median over the prompts' non-first tokens
    norms = []
    for text in texts:
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states
        norms += hs[2][0, 1:].norm(dim=-1).tolist()
    assert meta["residual_norm"] == pytest.approx(float(torch.tensor(norms, dtype=torch.float64).median()), rel=1e-5)
    assert meta["vector_norm"] == pytest.approx(0.5 * meta["residual_norm"])
    assert meta["n_vectors"] == 10 and meta["n_decoder_vectors"] == 5
    assert meta["n_train"] == 8 and meta["n_held_out"] == 2
    for k in ("r2_pooled", "mean_cosine", "seed", "created", "model_type", "sae"):
        assert k in meta
    pred = approx.predict(torch.zeros(2, D))
    assert torch.allclose(pred, approx.b.expand(2, F))


# ------------------------------------------------------------------------ files
def _approx(seed=0, D_=6, F_=9):
    g = torch.Generator().manual_seed(seed)
    return EffectApproximator(torch.randn(D_, F_, generator=g), torch.randn(F_, generator=g),
                              layer=2, site="resid_mid", metadata={"scale": 1.5, "n_vectors": 7})


def test_save_load_round_trip(tmp_path):
    a = _approx()
    path = a.save(tmp_path / "fx.safetensors")
    b = EffectApproximator.load(path)
    assert torch.equal(a.W, b.W) and torch.equal(a.b, b.b)
    assert (b.layer, b.site, b.d_model, b.d_sae) == (2, "resid_mid", 6, 9)
    assert b.metadata == a.metadata
    with pytest.raises(ValueError, match="ending in .safetensors"):
        a.save(tmp_path / "fx.pt")
    # float16 storage: half the bytes, loads as float32 equal to the rounded weights
    half = EffectApproximator.load(a.save(tmp_path / "fx16.safetensors", dtype=torch.float16))
    assert half.W.dtype == torch.float32
    assert torch.equal(half.W, a.W.half().float()) and torch.equal(half.b, a.b.half().float())
    assert not torch.equal(half.W, a.W)          # it really was rounded
    with pytest.raises(ValueError, match="dtype"):
        a.save(tmp_path / "fx64.safetensors", dtype=torch.float64)
    big = EffectApproximator(a.W * 1e6, a.b, layer=2, site="resid_mid", metadata=a.metadata)
    with pytest.raises(ValueError, match="does not fit float16"):
        big.save(tmp_path / "big.safetensors", dtype=torch.float16)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def test_malformed_files(tmp_path):
    a = _approx()
    good = {"fasteer_effects": "1", "header": json.dumps(a.metadata)}
    W, b = a.W, a.b
    cases = [
        ({"W": W[:, :-1].contiguous(), "b": b}, good, r"tensor 'W'.*shape \(6, 8\), expected \(6, 9\)"),
        ({"W": W, "b": b[:-1].contiguous()}, good, r"tensor 'b'.*shape"),
        ({"W": W.clone().index_fill_(0, torch.tensor([1]), float("nan")), "b": b}, good, "NaN or inf"),
        ({"W": W}, good, r"tensors: expected \['W', 'b'\]"),
        ({"W": W, "b": b}, {"header": good["header"]}, "fasteer_effects: missing"),
        ({"W": W, "b": b}, {"fasteer_effects": "1"}, "header: missing"),
        ({"W": W, "b": b}, {"fasteer_effects": "9", "header": good["header"]}, "format version"),
        ({"W": W, "b": b}, {"fasteer_effects": "1", "header": "{not json"}, "not valid JSON"),
        ({"W": W, "b": b}, {"fasteer_effects": "1", "header": json.dumps(
            {k: v for k, v in a.metadata.items() if k != "d_sae"})}, r"header.d_sae: missing"),
        ({"W": W, "b": b}, {"fasteer_effects": "1", "header": json.dumps(
            {**a.metadata, "site": "attn_out"})}, r"header.site"),
        ({"W": W.double(), "b": b}, good, "F64 is not supported"),
    ]
    for i, (tensors, meta, msg) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.safetensors", tensors, meta)
        with pytest.raises(fs.FileFormatError, match=msg):
            EffectApproximator.load(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(fs.FileFormatError, match="not a valid safetensors file"):
        EffectApproximator.load(junk)
    with pytest.raises(FileNotFoundError):
        EffectApproximator.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="W/b: contain NaN"):
        EffectApproximator(W.clone().fill_(float("inf")), b, layer=0, site="resid_post")


# ------------------------------------------------------------------ bad arguments
def test_argument_errors_before_any_forward(llama):
    model, tok = llama
    sae = random_sae(D, F, "relu", seed=63, layer=1, site="resid_post")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    texts = prompts(3, 13)
    try:
        bad = [
            (dict(n_vectors=1), ValueError, "n_vectors: expected an int >= 2"),
            (dict(scale=0.0), ValueError, "scale: expected a number in"),
            (dict(scale=float("nan")), ValueError, "scale: expected a finite number"),
            (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
            (dict(batch_size=0), ValueError, "batch_size"),
            (dict(held_out=1.0), ValueError, "held_out"),
            (dict(n_vectors=2, held_out=0.9), ValueError, "leaves none to fit on"),
            (dict(ridge=-1.0), ValueError, "ridge"),
            (dict(decoder_fraction=1.5), ValueError, "decoder_fraction"),
            (dict(top_p=0.0), ValueError, "top_p"),
            (dict(top_k=0), ValueError, "top_k"),
            (dict(temperature=0), ValueError, "temperature"),
            (dict(seed=1.5), TypeError, "seed"),
            (dict(progress="yes"), TypeError, "progress"),
            (dict(layer=7), ValueError, "out of range"),
        ]
        for kw, exc, msg in bad:
            with pytest.raises(exc, match=msg), pytest.warns() if "layer" in kw else _nullcontext():
                fit_effect_approximator(model, tok, sae, texts, **kw)
        with pytest.raises(TypeError, match="sae: expected a fasteer.SAE"):
            fit_effect_approximator(model, tok, "sae", texts)
        with pytest.raises(ValueError, match="sae: d_in = 33"):
            fit_effect_approximator(model, tok, random_sae(33, F, seed=1, layer=1), texts)
        with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
            fit_effect_approximator(model, tok, sae, [])
        with pytest.raises(ValueError, match=r"vectors: expected a float tensor \[N, d_model\]"):
            measure_effects(model, tok, sae, texts, torch.zeros(2, D + 1))
        with pytest.raises(ValueError, match="vectors: contain NaN"):
            measure_effects(model, tok, sae, texts, torch.full((2, D), float("nan")))
        st = fs.steer(model, fs.Add({1: torch.ones(D)}, 1.0))
        try:
            with pytest.raises(ValueError, match="fasteer steering is set on this model"):
                fit_effect_approximator(model, tok, sae, texts)
        finally:
            st.unpatch()
        assert calls == []
    finally:
        handle.remove()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ targeted vectors
def test_targeted_vector_formula():
    a = _approx(seed=4)
    W, b = a.W.double(), a.b.double()
    t = torch.zeros(9, dtype=torch.float64)
    t[[1, 5]] = torch.tensor([2.0, 0.5], dtype=torch.float64)

    def unit(x):
        return x / x.norm()

    want = unit(unit(W @ t) - unit(W @ b))
    sv = targeted_vector(a, [1, 5], [2.0, 0.5])
    assert sv.layers == [2] and sv.site == "resid_mid"
    got = sv.directions[2].double()
    assert torch.allclose(got, want, atol=1e-6)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)
    assert sv.metadata["features"] == [1, 5] and sv.metadata["method"] == "sae-ts"
    # bias_scale and a dense target
    want2 = unit(unit(W @ t) - 0.3 * unit(W @ b))
    got2 = targeted_vector(a, t.float(), bias_scale=0.3).directions[2].double()
    assert torch.allclose(got2, want2, atol=1e-6) and not torch.allclose(got2, got, atol=1e-3)
    # a single feature with default weight 1
    want3 = unit(unit(W[:, 3]) - unit(W @ b))
    assert torch.allclose(targeted_vector(a, 3).directions[2].double(), want3, atol=1e-6)
    with pytest.raises(ValueError, match="feature 9 out of range"):
        targeted_vector(a, [9])
    with pytest.raises(ValueError, match="weights: expected 2 numbers"):
        targeted_vector(a, [1, 2], [1.0])
    with pytest.raises(TypeError, match="approx: expected an EffectApproximator"):
        targeted_vector("a", [1])
    zero = EffectApproximator(torch.zeros(6, 9), torch.ones(9), layer=0, site="resid_post")
    with pytest.raises(ValueError, match="W t .* is zero"):
        targeted_vector(zero, [1])
