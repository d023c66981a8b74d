"""`Steerer.watch`: recorded feature activations against hooks that run ``sae.encode`` on
the stream at the SAE's site (after the reference's own edits there: the *encoded* value),
token by token, through ``generate``; the *edited* value (what a FeatureEdit / SAEReplace
set, ``z_k`` of the stream before the point's edits elsewhere) against hook-recorded
streams and the edit math written out in float64; the buffer's bookkeeping and bad
input."""
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
        w_all = st.watch(sae, feats, max_tokens=16, value="encoded")
        w_gen = st.watch(sae, feats, max_tokens=16, tokens="generated", value="both")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        got_all, got_gen = w_all.values().clone(), w_gen.encoded_values().clone()
        assert torch.equal(w_all.encoded_values(), got_all)
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


def test_watch_after_an_output_hook_carrier(monkeypatch):
    """Unknown architectures carry the last point with a hook on the last layer, which the
    watch must read after that hook's edit."""
    monkeypatch.setattr("fasteer.carrier_probe.ENABLED", False)     # the hook fallback
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
        w = st.watch(sae, [1, 2, 3], max_tokens=8, value="both")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        unsteered = w.values().clone()
        st.set(fs.Add(v, 1.0))
        w.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        steered = w.encoded_values().clone()
        # no feature edit: the edited value is z_k of the stream before the Add (read by a
        # hook prepended to the carrier's, which edits the layer output in place)
        steered_edited = w.edited_values().clone()
        assert torch.equal(w.values(), steered_edited)
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
    assert float((steered_edited.double() - want_plain).abs().max()) <= 1e-5
    assert float((steered.double() - want_plain).abs().max()) > 1e-2


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
        assert _n_hooks(model) == n - 2          # the stream after and before the edits
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


# --------------------------------------------------------------------------- edited latents

def _stream_before(model, seq, point_layer, upstream=None):
    """The plain model's stream entering decoder layer ``point_layer`` (= resid_pre there)
    for the full sequence ``seq`` (no padding), with ``upstream(h)`` applied to the input
    of layer 0 if given: h_in of a watch at that point, recorded by hooks."""
    layers = model.model.layers
    got = {}

    def pre0(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = upstream(h)
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def grab(module, args, kwargs):
        got["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handles = [layers[point_layer].register_forward_pre_hook(grab, with_kwargs=True)]
    if upstream is not None:
        handles.append(layers[0].register_forward_pre_hook(pre0, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=seq)
    finally:
        for h in handles:
            h.remove()
    return got["h"].double()


def test_watch_reports_the_edited_latent_and_the_re_encoded_one_during_generate():
    """FeatureEdit(set, 40) reads 40 on exactly the edited tokens (rows=, positions=), a
    scale reads s * z_k of the row the op read (after an Add at the same point), a joint
    edit each feature's op; the re-encoded value is sae.encode of the edited stream, which
    the overlap of encoder columns and decoder rows moves away from 40."""
    model = cached_model("llama")
    sae = random_sae(D, F, "relu", seed=37, layer=1, site="resid_post")     # point ("pre", 2)
    s64 = sae.to(dtype=torch.float64)
    feats = [3, 34, 43, 11]
    ids, mask = prompt_batch(3, 7, "none", seed=45)
    vs = random_vectors([0, 1], D, seed=11, scale=1.5)
    with fs.patch(model) as st:
        st.set(fs.FeatureEdit(sae, 3, "set", 40.0), rows=[0])
        st.set(fs.Add(vs[0], 1.0, layers=[0], site="resid_pre"),              # upstream
               fs.Add(vs[1], 1.0, layers=[1], site="resid_post"),             # same point
               fs.FeatureEdit(sae, 34, "scale", 2.0), rows=[1])
        st.set(fs.FeatureEdit(sae, [34, 43], "scale", [0.0, 3.0], positions="generated"),
               fs.FeatureEdit(sae, 3, "set", 40.0, positions="prompt"), rows=[2])
        w = st.watch(sae, feats, max_tokens=16, value="both")
        w_gen = st.watch(sae, feats, max_tokens=16, tokens="generated")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
        edited, encoded = w.edited_values().clone(), w.encoded_values().clone()
        assert torch.equal(w.values(), edited)
        gen = w_gen.values().clone()
    assert edited.shape == (3, 10, 4)
    seq = out[:, :-1]
    h_in = _stream_before(model, seq, 2,
                          upstream=lambda h: torch.cat([h[:1], h[1:2] + vs[0].to(h.dtype), h[2:]]))
    z_in = s64.encode(h_in)                                                  # [3, 10, F]
    w_dec = {k: sae.feature_decoder(k, dtype=torch.float64) for k in (3, 34, 43)}
    P = 7
    # what the edits set, and the stream they leave (float64, the math of FeatureEdit)
    want = z_in[..., feats].clone()
    h_out = h_in.clone()
    want[0, :, 0] = 40.0
    h_out[0] += (40.0 - z_in[0, :, 3:4]) * w_dec[3]
    h1 = h_in[1] + vs[1].double()
    z1 = s64.encode(h1)
    want[1, :, 1] = 2.0 * z1[:, 34]
    h_out[1] = h1 + (2.0 * z1[:, 34:35] - z1[:, 34:35]) * w_dec[34]
    want[2, :P, 0] = 40.0
    h_out[2, :P] += (40.0 - z_in[2, :P, 3:4]) * w_dec[3]
    want[2, P:, 1] = 0.0
    want[2, P:, 2] = 3.0 * z_in[2, P:, 43]
    h_out[2, P:] += (0.0 - z_in[2, P:, 34:35]) * w_dec[34] + 2.0 * z_in[2, P:, 43:44] * w_dec[43]
    want_encoded = s64.encode(h_out)[..., feats]
    # the set is exact on the edited tokens, and only there
    assert bool((edited[0, :, 0] == 40.0).all()) and bool((edited[2, :P, 0] == 40.0).all())
    assert not bool((edited[2, P:, 0] == 40.0).any()) and not bool((edited[1, :, 0] == 40.0).any())
    assert float((edited.double() - want).abs().max()) <= 1e-4
    assert float((encoded.double() - want_encoded).abs().max()) <= 1e-4
    # the re-encoded latent is not what was set: u_3 . w_3 != 1 and the stream moved
    assert float((encoded[0, :, 0] - 40.0).abs().min()) > 0.1
    assert float((encoded[2, :P, 0] - 40.0).abs().min()) > 0.1
    # the scaled features fire somewhere (so the comparison above is not 0 == 0)
    assert float(want[1, :, 1].abs().max()) > 0.1 and float(want[2, P:, 2].abs().max()) > 0.1
    # the unedited column moves in the re-encoded value only (decoder overlap of feature 3)
    assert float((encoded[0, :, 3] - edited[0, :, 3]).abs().max()) > 1e-3
    # tokens="generated": the same values, the generated tokens only
    assert torch.equal(gen, edited[:, P:])


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_watch_edited_latent_on_the_full_sae_path_and_with_a_condition(activation):
    """TopK FeatureEdit and SAEReplace run the full SAE op before the steer edits; a
    ``when=`` condition selects tokens per row: the edited value follows the carrier."""
    model = cached_model("llama")
    sae = random_sae(D, F, activation, seed=38, layer=0, site="resid_post")   # ("pre", 1)
    s64 = sae.to(dtype=torch.float64)
    feats = [2, 6, 9]
    ids, mask = prompt_batch(2, 6, "none", seed=46)
    h_in = _stream_before(model, ids, 1)
    c = random_vectors([0], D, seed=12)[0]
    z = s64.encode(h_in)
    # row 0 after the full-SAE set (the stream the steer edits and their condition read)
    h1 = h_in[0] + (40.0 - z[0, :, 2:3]) * sae.feature_decoder(2, dtype=torch.float64)
    proj = (h1.float() @ c).sort().values
    thr = float(proj[2] + proj[3]) / 2          # between two tokens: no float32 tie
    with fs.patch(model) as st:
        if activation == "topk":
            first = fs.FeatureEdit(sae, 2, "set", 40.0)
        else:
            first = fs.SAEReplace(sae, [(2, "set", 40.0)])
        cond = (fs.FeatureEdit(sae, 6, "add", 5.0, when=fs.Projection(c, thr))
                if activation != "topk" else fs.Add(c, 0.5, layers=[0], site="resid_post"))
        st.set(first, cond, rows=[0])
        w = st.watch(sae, feats, max_tokens=8, value="both")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        edited, encoded = w.edited_values().clone(), w.encoded_values().clone()
    want = z[..., feats].clone()
    want[0, :, 0] = 40.0
    if activation == "topk":
        h_out0 = h1 + 0.5 * c.double()
    else:
        z1 = s64.encode(h1)
        passes = h1.float() @ c >= thr
        assert 0 < int(passes.sum()) < 6 and float(z1[:, 6][passes].abs().max()) > 0.1
        want[0, :, 1] = torch.where(passes, z1[:, 6] + 5.0, z[0, :, 6])
        h_out0 = h1 + torch.where(passes.unsqueeze(-1), 5.0 * sae.feature_decoder(6, dtype=torch.float64),
                                  torch.zeros(D, dtype=torch.float64))
    assert bool((edited[0, :, 0] == 40.0).all())
    assert float((edited.double() - want).abs().max()) <= 1e-4
    want_encoded = torch.stack([s64.encode(h_out0), z[1]])[..., feats]
    assert float((encoded.double() - want_encoded).abs().max()) <= 1e-4
    assert float((encoded[0, :, 0] - 40.0).abs().min()) > 0.1
    # row 1 has no steering: both values are its plain latents
    assert torch.equal(edited[1], encoded[1])


def test_watch_value_option():
    model = cached_model("llama")
    sae = random_sae(D, F, "relu", seed=39, layer=1)
    ids, mask = prompt_batch(1, 4, "none", seed=47)
    with fs.patch(model) as st:
        st.set(fs.FeatureEdit(sae, 1, "set", 40.0))
        e = st.watch(sae, [1], max_tokens=8)
        n = st.watch(sae, [1], max_tokens=8, value="encoded")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert bool((e.values() == 40.0).all())
        assert not bool((n.values() == 40.0).any())
        with pytest.raises(RuntimeError, match="value='edited'"):
            e.encoded_values()
        with pytest.raises(RuntimeError, match="value='encoded'"):
            n.edited_values()
        with pytest.raises(ValueError, match="value: expected one of"):
            st.watch(sae, [1], value="both_")
