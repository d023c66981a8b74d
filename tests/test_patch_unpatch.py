"""Installing and removing fasteer: bit identity, lifecycles, fallbacks, autograd.

* unpatch: outputs bit-identical to the never-patched model, every forward, hook and
  the ``generate`` attribute restored; a patched model with nothing to do is also
  bit-identical (carriers call the original forward);
* ``always_armed``: the fused kernel normalises every row, equal to the model's norm
  within rounding;
* unknown architectures fall back to layer hooks with one warning and the same results;
* autograd: the out-of-place path gives the reference's outputs and gradients;
* tables are updated in place and grow only when needed; a user's ``inputs_embeds``
  is never modified; a `SteeringVector` brings its own layers and site.
"""
import warnings

import pytest
import torch

import fasteer as fs
import fasteer.sites as sites_mod
from fasteer.sites import decoder_layers
from hook_reference import (HookReference, assert_same, cached_model, fasteer_outputs,
                            one_thread, pair, plain_outputs, prompt_batch, random_vectors,
                            reference_outputs, tiny_model)  # noqa: F401 (one_thread: autouse)

D = 32


def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def _instance_forwards(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "olmo2", "falcon_new"])
def test_unpatch_is_bit_identical(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=19)
    before = plain_outputs(model, ids, mask, caches=("dynamic", "static"))
    hooks, forwards = _hook_counts(model), _instance_forwards(model)
    v = random_vectors(range(3), D, seed=131, scale=3.0)
    st = fs.patch(model)
    st.set(fs.Add(v, 2.0), fs.Scale(0.5, layers=[1], site="resid_pre"))
    st.set(fs.Ablate(v, layers=[2]), rows=[1])
    steered = plain_outputs(model, ids, mask, caches=("dynamic",))
    assert float((steered[0] - before[0]).abs().max()) > 1e-2
    st.clear()
    cleared = plain_outputs(model, ids, mask, caches=("dynamic", "static"))
    assert torch.equal(cleared[0], before[0])              # nothing to do: the original forwards
    st.unpatch()
    after = plain_outputs(model, ids, mask, caches=("dynamic", "static"))
    assert torch.equal(after[0], before[0])
    for c in before[1]:
        assert torch.equal(after[1][c], before[1][c])
    assert _hook_counts(model) == hooks and _instance_forwards(model) == forwards
    assert "generate" not in model.__dict__
    fs.patch(model).unpatch()     # can be patched again


def test_steer_context_manager():
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, "left", seed=20)
    before = plain_outputs(model, ids, mask, caches=())[0]
    v = random_vectors([1], D, seed=141, scale=3.0)
    with fs.steer(model, fs.Add(v, 2.0)) as st:
        assert isinstance(st, fs.Steerer)
        inside = plain_outputs(model, ids, mask, caches=())[0]
    assert float((inside - before).abs().max()) > 1e-2
    assert torch.equal(plain_outputs(model, ids, mask, caches=())[0], before)
    with pytest.raises(KeyError):
        with fs.steer(model, fs.Add(v, 2.0)):
            raise KeyError("boom")
    assert torch.equal(plain_outputs(model, ids, mask, caches=())[0], before)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox_parallel"])
def test_always_armed_keeps_the_models_numerics(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=22)
    before = plain_outputs(model, ids, mask, caches=("dynamic",))
    outs = []

    def hook(module, args, output):
        outs.append((output, type(module).forward(module, args[0])))

    with fs.patch(model, always_armed=True) as st:
        handles = [c.module.register_forward_hook(hook) for c in st.carriers.values()]
        try:
            armed = plain_outputs(model, ids, mask, caches=("dynamic",))
        finally:
            for h in handles:
                h.remove()
        assert all(c.armed[0] and c.armed[1] for c in st.carriers.values())
    assert len(outs) >= 4 * 5          # every norm of the prompt and the decode steps
    for out, own in outs:
        assert float((out - own).abs().max() / own.abs().max()) <= 1e-6
    assert float((armed[0] - before[0]).abs().max()) <= 1e-5
    assert torch.equal(armed[1]["dynamic"], before[1]["dynamic"])


def test_unknown_architecture_falls_back_to_hooks(monkeypatch):
    # the hook fallback itself: the carrier probe (which would verify llama's carriers on
    # this model, tests/test_carrier_probe.py) is off
    monkeypatch.setattr("fasteer.carrier_probe.ENABLED", False)
    model = cached_model("llama")
    # a copy without llama (deleting and restoring the entry would move it to the end of
    # the table, and the table's order is what docs/architectures.md and the probe follow)
    monkeypatch.setattr(sites_mod, "ARCHITECTURES",
                        {k: v for k, v in sites_mod.ARCHITECTURES.items() if k != "llama"})
    monkeypatch.setattr(sites_mod, "_warned_types", set())
    ids, mask = prompt_batch(3, 7, "right", seed=23)
    v = random_vectors(range(3), D, seed=151, scale=3.0)
    ivs = [pair("add", [0, 2], vectors=v, value=2.0),
           pair("clamp", [1], site="resid_pre", vectors=v, value=1.0, positions="prompt")]
    with pytest.warns(UserWarning, match="not in fasteer.sites.ARCHITECTURES"):
        out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # one warning per model type, not per patch
        with fs.patch(model) as st:
            assert st.sites.is_fallback
            assert {c.point.kind for c in st.carriers.values()} == {"input", "output"}
            with pytest.raises(ValueError, match="resid_mid"):
                st.set(fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_mid"))
    ref = reference_outputs(model, "llama", [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)


def test_table_mismatch_falls_back_to_hooks():
    model = tiny_model("llama", seed=3)
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(D)   # not an RMSNorm
    with pytest.warns(UserWarning, match="does not match fasteer's table"):
        st = fs.patch(model)
    assert st.sites.is_fallback
    st.unpatch()


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_autograd_matches_reference(arch):
    model = tiny_model(arch, seed=4)
    ids, mask = prompt_batch(3, 7, "left", seed=24)
    v = random_vectors(range(3), D, seed=161, scale=2.0)
    ivs = [pair("add", [0, 1], vectors=v, value=2.0),
           pair("clamp", [1], site="resid_mid", vectors=v, value=1.0),
           pair("scale", [0], site="resid_pre", value=1.3)]
    weight = model.get_input_embeddings().weight

    def loss_and_grad():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = (logits.float() ** 2).mean()
        loss.backward()
        return logits.detach(), weight.grad.clone()

    with fs.steer(model, *[a for a, _ in ivs]):
        got = loss_and_grad()
    ref = HookReference(model, decoder_layers(model), "self_attn" if arch == "llama"
                        else "post_attention_layernorm", [[b for _, b in ivs]] * 3)
    with ref:
        ref.begin(mask)
        want = loss_and_grad()
    plain = loss_and_grad()
    assert float((got[0] - want[0]).abs().max()) <= 1e-5
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)
    assert float((got[1] - plain[1]).abs().max()) > 1e-4


def test_inference_mode_no_grad_and_grad_agree():
    """In place under no_grad / inference_mode, out of place with autograd: same result."""
    model = cached_model("gpt2")
    ids, mask = prompt_batch(3, 7, "right", seed=27)
    v = random_vectors(range(3), D, seed=191, scale=3.0)
    with fs.steer(model, fs.Add(v, 2.0), fs.Clamp(v, 1.0, layers=[1], site="resid_mid")):
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask).logits
        with torch.inference_mode():
            b = model(input_ids=ids, attention_mask=mask).logits
        c = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert c.requires_grad and float((a - c.detach()).abs().max()) <= 1e-5


def test_inputs_embeds_are_not_modified():
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, "left", seed=25)
    embeds = model.get_input_embeddings()(ids).detach()
    copy = embeds.clone()
    v = random_vectors([0], D, seed=171, scale=3.0)
    a, b = pair("add", [0], site="resid_pre", vectors=v, value=2.0)
    with fs.steer(model, a), torch.no_grad():
        got = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(embeds, copy)
    ref = HookReference(model, decoder_layers(model), "self_attn", [[b]] * 3)
    with ref, torch.no_grad():
        ref.begin(mask)
        want = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert float((got - want).abs().max()) <= 1e-5


def test_tables_update_in_place_and_grow_when_needed():
    model = cached_model("llama")
    v = torch.randn(D, generator=torch.Generator().manual_seed(5))
    with fs.patch(model, slots=2) as st:
        tables = st.carriers[("pre", 2)].tables
        ptrs = (tables.meta.data_ptr(), tables.params.data_ptr(), tables.bank.data_ptr())
        for alpha in (1.0, 2.0, -3.0):
            st.set(fs.Add(v, alpha, layers=[1]))
            assert (tables.meta.data_ptr(), tables.params.data_ptr(), tables.bank.data_ptr()) == ptrs
            assert float(tables.params[0, 0, 0]) == alpha
        for row in range(5):            # 5 slots > capacity 2: the tables grow
            st.set(fs.Add(v, float(row), layers=[1]), rows=[row])
        assert tables.meta.shape[0] >= 5
        st.clear()
        assert int(tables.meta.abs().sum()) == 0 and not any(st.carriers[("pre", 2)].armed)


def test_steering_vector_brings_layers_and_site():
    from fasteer.vectors import SteeringVector
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, "left", seed=26)
    dirs = random_vectors([0, 2], D, seed=181, scale=2.0)
    sv = SteeringVector(dirs, site="resid_pre")
    iv = fs.Add(sv, 1.5)
    assert iv.layers == (0, 2) and iv.site == "resid_pre"
    _, b = pair("add", [0, 2], site="resid_pre", vectors=dirs, value=1.5)
    out = fasteer_outputs(model, [([iv], None)], ids, mask, caches=("dynamic",))
    ref = reference_outputs(model, "llama", [[b]] * 3, ids, mask, caches=("dynamic",))
    assert_same(out, ref)
