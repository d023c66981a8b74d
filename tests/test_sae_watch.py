"""`Steerer.watch`: recorded feature activations against hooks that run ``sae.encode`` on
the stream at the SAE's site (after the reference's own edits there), token by token,
through ``generate``; the buffer's bookkeeping and bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

import fasteer as fs
from hook_reference import cached_model, one_thread, pair, prompt_batch, random_vectors, tiny_model  # noqa: F401
from sae_reference import GENERATE, feature_pair, random_sae, run_reference

D, F = 32, 45


def _expected(ref, point, sae, features):
    """sae.encode (float64) of every recorded token at ``point``: [B, tokens, K]."""
    h = torch.cat(ref.recorded[point], dim=1).double()
    return sae.to(dtype=torch.float64).encode(h)[..., features]


@pytest.mark.parametrize("arch,activation", [("llama", "relu"), ("llama", "topk"),
                                             ("gpt2", "jumprelu")])
def test_watch_records_the_sae_activations_of_every_token(arch, activation):
    model = cached_model(arch)
    sae = random_sae(D, F, activation, seed=31, layer=1, site="resid_post")
    feats = [3, 17, 40, 41]
    ids, mask = prompt_batch(3, 7, "left", seed=41)
    with fs.patch(model) as st:
        w = st.watch(sae, feats, max_tokens=32)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        got = w.values().clone()
    _, tokens, ref = run_reference(model, arch, [[], [], []], ids, mask, record_points=[("pre", 2)])
    assert torch.equal(out, tokens)
    # the prompt's columns, then one per fed generated token (the last one is never fed)
    assert got.shape == (3, out.shape[1] - 1, len(feats)) == (3, 10, 4)
    want = _expected(ref, ("pre", 2), sae, feats)[:, -got.shape[1]:]
    assert float((got.double() - want).abs().max()) <= 1e-5
    assert float(got.abs().max()) > 0.1 and bool((got == 0).any())   # some fire, some do not


@pytest.mark.parametrize("site,point", [("resid_post", ("pre", 2)), ("resid_mid", ("mid", 1))])
def test_watch_sees_the_steering_at_its_site(site, point):
    model = cached_model("llama")
    sae = random_sae(D, F, "jumprelu", seed=32, layer=1, site=site)
    feats = [3, 5, 8]
    ids, mask = prompt_batch(3, 7, "left", seed=42)
    v = random_vectors([0], D, seed=9, scale=2.0)
    up = pair("add", [0], vectors=v, value=1.0)                          # upstream, row 0
    here = feature_pair(sae, 3, "set", 4.0)                              # at the watched site
    joint = feature_pair(sae, [5, 8], "scale", [0.0, 3.0], positions="generated")
    with fs.patch(model) as st:
        st.set(up[0], here[0], rows=[0])
        st.set(joint[0], rows=[2])
        w_all = st.watch(sae, feats, max_tokens=16)
        w_gen = st.watch(sae, feats, max_tokens=16, tokens="generated")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        got_all, got_gen = w_all.values().clone(), w_gen.values().clone()
    _, tokens, ref = run_reference(model, "llama", [[up[1], here[1]], [], [joint[1]]], ids, mask,
                                   record_points=[point])
    assert torch.equal(out, tokens)
    want = _expected(ref, point, sae, feats)[:, -10:]       # the generate call's tokens
    assert got_all.shape == want.shape == (3, 10, 3)
    assert float((got_all.double() - want).abs().max()) <= 1e-4
    assert torch.equal(got_gen, got_all[:, 7:])
    # the steering shows in the steered rows (row 2 only on its generated tokens)
    plain = _expected(run_reference(model, "llama", [[], [], []], ids, mask,
                                    record_points=[point])[2], point, sae, feats)[:, -10:]
    change = (got_all.double() - plain).abs().amax(-1)
    assert float(change[0].min()) > 1e-3 and float(change[2, 7:].min()) > 1e-3
    assert float(change[1].max()) <= 1e-4 and float(change[2, :7].max()) <= 1e-4


def test_watch_after_an_output_hook_carrier():
    """Unknown architectures carry the last point with a hook on the last layer, which the
    watch must read after that hook's edit."""
    model = tiny_model("llama")
    model.config.model_type = "not_in_the_table"
    sae = random_sae(D, F, "relu", seed=33, layer=2, site="resid_post")
    ids, mask = prompt_batch(2, 5, "none", seed=43)
    v = random_vectors([2], D, seed=10, scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = fs.patch(model)
    try:
        assert st.carriers[("pre", 3)].point.kind == "output"
        w = st.watch(sae, [1, 2, 3], max_tokens=8)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        unsteered = w.values().clone()
        st.set(fs.Add(v, 1.0))
        w.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        steered = w.values().clone()
    finally:
        st.unpatch()
    layers = model.model.layers
    hs = {}
    handle = layers[2].register_forward_hook(lambda m, a, o: hs.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    s64 = sae.to(dtype=torch.float64)
    want_plain = s64.encode(hs["h"].double())[..., [1, 2, 3]]
    want_steered = s64.encode(hs["h"].double() + v[2].double())[..., [1, 2, 3]]
    assert float((unsteered.double() - want_plain).abs().max()) <= 1e-5
    assert float((steered.double() - want_steered).abs().max()) <= 1e-5


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_watch_buffer_bookkeeping():
    model = cached_model("llama")
    sae = random_sae(D, F, "relu", seed=34, layer=0, site="resid_pre")
    ids, mask = prompt_batch(2, 6, "none", seed=44)
    hooks_before = _n_hooks(model)
    with fs.patch(model) as st:
        w = st.watch(sae, [4, 9], max_tokens=8, batch_size=2)
        assert w.values().shape == (2, 0, 2) and w.n_tokens == 0
        buffer = w._buffer.data_ptr()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            first = w.values().clone()
            with pytest.warns(RuntimeWarning, match="buffer full"):
                model(input_ids=ids, attention_mask=mask)
        assert w.n_tokens == 8 and torch.equal(w.values()[:, :6], first)
        assert torch.equal(w.values()[:, 6:], first[:, :2])
        assert w._buffer.data_ptr() == buffer                        # preallocated, in place
        with torch.no_grad(), pytest.raises(RuntimeError, match="watch.clear"):
            model(input_ids=ids[:1], attention_mask=mask[:1])
        w.clear()
        with torch.no_grad():
            model(input_ids=ids[:1], attention_mask=mask[:1])      # new batch size after clear
        assert w.values().shape == (1, 6, 2)
        assert torch.allclose(w.values(), first[:1])
        n = _n_hooks(model)
        w.remove()
        w.remove()                                                   # idempotent
        assert _n_hooks(model) == n - 1
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert w.values().shape == (1, 6, 2)                          # no longer recording
        # tokens="generated" outside generate: a forward continuing a cache
        g = st.watch(sae, [4], max_tokens=8, tokens="generated")
        with torch.no_grad():
            past = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            assert g.n_tokens == 0
            model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long),
                  cache=past, use_cache=True)
        assert g.n_tokens == 1
    assert _n_hooks(model) == hooks_before        # unpatch removed the other watch's hooks


def test_watch_bad_input():
    model = cached_model("llama")
    sae = random_sae(D, F, "relu", seed=35, layer=1)
    with fs.patch(model) as st:
        with pytest.raises(ValueError, match=rf"feature: ids \[{F}\] out of range"):
            st.watch(sae, [1, F])
        with pytest.raises(ValueError, match="tokens: expected one of"):
            st.watch(sae, [1], tokens="prompt")
        with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
            st.watch(sae, [1], max_tokens=0)
        with pytest.raises(ValueError, match="d_in = 40 but the model's hidden size is 32"):
            st.watch(random_sae(40, F, "relu", seed=36, layer=1), [1])
        with pytest.warns(UserWarning, match=r"trained at resid_post\[1\].*resid_post\[5\]"), \
                pytest.raises(ValueError, match=r"layers: layer 5 out of range 0..2"):
            st.watch(sae, [1], layer=5)
        with pytest.raises(TypeError, match="sae: expected a fasteer.SAE"):
            st.watch("sae", [1])
    with pytest.raises(RuntimeError, match="unpatched"):
        st.watch(sae, [1])
