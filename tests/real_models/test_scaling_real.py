"""Component-output sites and activation scaling on the real models.

* attn_out / mlp_out steering (Scale, Add, Clamp, Ablate, per row) equals the plain-hook
  reference of `hook_reference` on SmolLM2 (Llama: ``self_attn`` / ``mlp``) and Gemma-3
  (post-sublayer norms), through generate with dynamic and static caches;
* per-position factors on a left-padded real batch equal the reference;
* a briefly trained ActivScalar (SmolLM2, country-capital conflict) flips held-out
  prompts, and the fused path equals the training-time forward; DynScalar and SteerVec
  values (random) likewise on Gemma-3.
"""
from __future__ import annotations

import pytest
import torch

import fasteer as fs
from fasteer.extract.scaling import ActivationScaling, ScalingParams
from fasteer.extract.scaling.evaluate import evaluate_scaling
from fasteer.extract.scaling.hooks import TrainingHooks
from fasteer.extract.scaling.tasks import build_task, encode
from fasteer.sites import decoder_layers
from hook_reference import COMPONENTS, pair
from real_models._load import NAMES, load
from real_models.test_equivalence import (PROMPTS, _batch, _layers, check, run_fasteer,
                                          run_reference)


def _component_norm(name, site, layer) -> float:
    """Median norm of the component output over the test batch's real tokens."""
    model, _ = load(name)
    ids, mask = _batch(name)
    path = COMPONENTS[model.config.model_type][0 if site == "attn_out" else 1]
    module = decoder_layers(model)[layer].get_submodule(path)
    seen = []
    h = module.register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        h.remove()
    return float(seen[0][mask.bool()].norm(dim=-1).median())


@pytest.mark.parametrize("name", NAMES)
def test_component_sites_match_the_reference(name):
    """Row 0: Scale at attn_out (reversing it) + Add at mlp_out; row 1: Clamp at mlp_out;
    row 2: Ablate at attn_out; row 3 unsteered."""
    model, _ = load(name)
    early, mid, last = _layers(model)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(21)

    def sized(site, layer, times):
        v = torch.randn(d, generator=g)
        return {layer: v / v.norm() * times * _component_norm(name, site, layer)}

    scale = pair("scale", [early, mid], site="attn_out", value=-1.0)
    add = pair("add", [mid], site="mlp_out", vectors=sized("mlp_out", mid, 3.0), value=1.0)
    clamp = pair("clamp", [early, last], site="mlp_out", value=4.0 * _component_norm(
        name, "mlp_out", early), vectors={**sized("mlp_out", early, 1.0),
                                          **sized("mlp_out", last, 1.0)})
    ablate = pair("ablate", [mid], site="attn_out", vectors=sized("attn_out", mid, 1.0))
    out = run_fasteer(name, [([scale[0], add[0]], [0]), ([clamp[0]], [1]), ([ablate[0]], [2])])
    ref = run_reference(name, [[scale[1], add[1]], [clamp[1]], [ablate[1]], []])
    check(name, out, ref, steered_rows=[0, 1], unsteered_rows=[3])


@pytest.mark.parametrize("name", NAMES)
def test_per_position_factors_on_a_padded_batch(name):
    """Per-position factors index each row's real tokens: a row of the left-padded batch
    equals the same prompt run alone."""
    model, tok = load(name)
    ids, mask = _batch(name)
    _, mid, _ = _layers(model)
    factors = [0.5, -1.0, 2.0, 1.5, 0.0, 3.0, 0.25]
    iv = fs.Scale({mid: factors}, site="mlp_out")
    with torch.no_grad(), fs.steer(model, iv):
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = [model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    for r, a in enumerate(alone):
        row = batch[r][real[r]]                  # the row's real tokens, in order
        assert float((row - a).abs().max()) <= 1e-3 * float(a.abs().max()), r
        assert float((row - plain[r][real[r]]).abs().max()) > 0.5


def test_activscalar_flips_country_capital_conflicts():
    """SmolLM2 copies the wrong capital from the context on most CCC prompts; a few
    training steps of ActivScalar flip held-out prompts back to the capital it knows,
    and the fused path computes what the training forward computed."""
    model, tok = load("smollm2")
    torch.manual_seed(0)
    task = build_task("ccc", tok, model, n_train=16, n_test=16, seed=0)
    result = fs.extract.activation_scaling(model, tok, task, method="activ", steps=25,
                                           batch_size=8, progress=False)
    report = evaluate_scaling(model, tok, result, task.test, n_boot=200)
    assert report["accuracy_before"][0] <= 0.4, report
    assert report["accuracy_after"][0] >= report["accuracy_before"][0] + 0.4, report
    assert report["kl_answer"][0] < 1.0, report
    ids = encode(task.test[:4], tok)["input_ids"]
    with torch.no_grad():
        with TrainingHooks(model, result.params, result.sites, result.layers):
            ref = model(input_ids=ids).logits
        with fs.steer(model, *result.interventions()):
            got = model(input_ids=ids).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("method", ["dyn", "steervec"])
def test_fused_equals_training_forward_gemma3(method):
    """Gemma-3's components are post-sublayer norm outputs: random learned values, fused
    path vs training hooks."""
    model, tok = load("gemma3")
    ids = tok(["The capital of France is Paris. The capital of"], return_tensors="pt")["input_ids"]
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(31)
    params = ScalingParams(method, 2, n_layers, d, prompt_len=ids.shape[1] if method != "dyn"
                           else None, beta=1.0,
                           norms=torch.full((2, n_layers), 50.0) if method == "dyn" else None)
    with torch.no_grad():
        for t in params.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * (0.02 if method == "dyn" else 0.5))
    result = ActivationScaling(params, ("attn_out", "mlp_out"), range(n_layers))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with TrainingHooks(model, params, result.sites, result.layers):
            ref = model(input_ids=ids).logits
        with fs.steer(model, *result.interventions()):
            got = model(input_ids=ids).logits
    # DynScalar: the kernel sums w.h in another order than torch's matmul, and the factor
    # multiplies the whole activation at 36 points, so float32 rounding adds up to more
    # than the other methods' (measured 1.3e-4 relative here)
    rtol = 5e-4 if method == "dyn" else 1e-4
    assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max())
    assert float((ref - plain).abs().max()) > 1.0
