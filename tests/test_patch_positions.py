"""Position rules and padding: which tokens get edited, in prefill and in every decode step.

Each rule ("all", "prompt", "generated", "last_prompt", an explicit mask) with left and
right padding, through a forward and greedy `generate` with a dynamic and a static cache
(where `generate` hands the model a 4-D mask), against the hook reference, on one
architecture per carrier kind: Llama (RMS pre-norm), GPT-2 (LayerNorm), Gemma-2 (Gemma
norm, sliding window) and OLMo-2 (hook carriers).
"""
import contextlib
import inspect

import pytest
import torch

import fasteer as fs
from fasteer.sites import decoder_layers
from hook_reference import (HookReference, assert_same, cached_model, fasteer_outputs,
                            one_thread, pair, plain_outputs, prompt_batch, random_vectors,
                            reference_outputs)  # noqa: F401 (one_thread: autouse fixture)

D = 32
ARCHS = ["llama", "gpt2", "gemma2", "olmo2"]
RULES = ["all", "prompt", "generated", "last_prompt", "mask", "mask_1d"]


def _positions(rule, ids):
    if not rule.startswith("mask"):
        return rule
    g = torch.Generator().manual_seed(7)
    shape = ids.shape if rule == "mask" else ids.shape[1:]     # [B, T] or [T] for every row
    return torch.rand(shape, generator=g) < 0.5


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_rule_with_padding(arch, rule, pad):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, pad, seed=3)
    pos = _positions(rule, ids)
    vecs = random_vectors(range(3), D, seed=21, scale=4.0)
    ivs = [pair("add", [0, 2], vectors=vecs, value=2.5, positions=pos),
           pair("clamp", [1], site="resid_pre", vectors=vecs, value=-3.0, positions=pos)]
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask)
    if rule == "generated":
        # nothing in the prompt forward: its logits are the model's own, bit for bit
        assert torch.equal(out[0], plain[0])
        assert not torch.equal(out[1]["dynamic"], plain[1]["dynamic"])
    else:
        assert float((out[0] - plain[0]).abs().max()) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_rules_mixed_in_one_request(arch):
    """Interventions with different rules in one set(): tokens get different slots."""
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=4)
    v = random_vectors(range(3), D, seed=31, scale=3.0)
    w = random_vectors(range(3), D, seed=32, scale=3.0)
    ivs = [pair("add", [1], vectors=v, value=2.0, positions="prompt"),
           pair("add", [1], vectors=w, value=-2.0, positions="generated"),
           pair("ablate", [1], vectors=w, positions="last_prompt"),
           pair("scale", [0], site="resid_pre", value=1.5, positions=_positions("mask", ids)),
           pair("add", [2], vectors=v, value=1.0)]
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_padding_tokens_are_never_edited(pad):
    """The stream right after the resid_pre[0] carrier: pads untouched, real tokens +v."""
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, pad, seed=5)
    seen = []
    norm = decoder_layers(model)[0].input_layernorm
    # a forward hook sees the carrier's input after the in-place edit
    handle = norm.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    v = torch.randn(D, generator=torch.Generator().manual_seed(9))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            with fs.steer(model, fs.Add(v, 2.0, layers=[0], site="resid_pre")):
                model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    plain, steered = seen
    pad_tok = mask == 0
    assert bool(pad_tok.any())
    assert torch.equal(steered[pad_tok], plain[pad_tok])
    torch.testing.assert_close(steered[~pad_tok], plain[~pad_tok] + 2.0 * v, rtol=0, atol=1e-6)


def test_manual_decode_loop_outside_generate():
    """Outside generate: an empty cache is a prompt, a non-empty cache a generated step."""
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 6, "left", seed=6)
    vecs = random_vectors([1], D, seed=41, scale=3.0)
    a, b = pair("add", [1], vectors=vecs, value=3.0, positions="generated")
    c, d = pair("clamp", [1], site="resid_pre", vectors=vecs, value=1.0, positions="last_prompt")

    def loop():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            logits = [out.logits]
            nxt = out.logits[:, -1:].argmax(-1)
            m = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            # transformers 5.x renames past_key_values -> cache
            name = "cache" if "cache" in inspect.signature(model.forward).parameters \
                else "past_key_values"
            out = model(input_ids=nxt, attention_mask=m, use_cache=True, **{name: cache})
            logits.append(out.logits)
        return logits

    with fs.steer(model, a, c):
        got = loop()
    ref = HookReference(model, decoder_layers(model), "self_attn", [[b, d]] * 3)
    with ref:
        ref.begin(mask)
        want = loop()
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= 1e-5


@pytest.mark.parametrize("rule", ["prompt", "generated", "last_prompt"])
@pytest.mark.parametrize("mode", ["no_cache", "chunked_prefill"])
def test_other_generate_modes_match_cached_generate(rule, mode):
    """use_cache=False re-feeds the whole sequence each step, chunked prefill feeds the
    prompt in pieces: prompt positions must stay prompt positions in both."""
    model = cached_model("llama")
    # transformers 4's chunked prefill mishandles left padding even unsteered (its output
    # differs from cached generate), so there the prompts are unpadded.
    import transformers
    padding = "left" if int(transformers.__version__.split(".")[0]) >= 5 or mode == "no_cache" \
        else "none"
    ids, mask = prompt_batch(3, 7, padding, seed=8)
    vecs = random_vectors([0, 1], D, seed=51, scale=3.0)
    iv = fs.Add(vecs, 2.0, positions=rule)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    other = dict(use_cache=False) if mode == "no_cache" else dict(prefill_chunk_size=3)
    with fs.steer(model, iv), torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
        variant = model.generate(input_ids=ids, attention_mask=mask, **other, **kw)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(cached, variant)
    assert not torch.equal(cached, plain)


def test_mask_of_the_wrong_shape_is_refused_at_forward():
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, "left")
    with fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[0], positions=torch.ones(3, 5,
                                                                                      dtype=torch.bool))):
        with pytest.raises(ValueError, match="positions: mask of shape"):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)


def test_decoding_context_for_hand_written_loops():
    """st.decoding(prompt_len): decode steps without reading the cache (a static cache)."""
    import transformers as tf
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 6, "none", seed=10)
    vecs = random_vectors([1], D, seed=43, scale=3.0)
    a, b = pair("add", [1], vectors=vecs, value=3.0, positions="generated")
    c, d = pair("scale", [0], site="resid_pre", value=0.5, positions="prompt")

    def loop(decoding):
        cache = tf.StaticCache(config=model.config, max_cache_len=12)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **{name: cache})
            logits = [out.logits]
            with decoding():
                for _ in range(3):
                    nxt = logits[-1][:, -1:].argmax(-1)
                    logits.append(model(input_ids=nxt, use_cache=True, **{name: cache}).logits)
        return logits

    with fs.steer(model, a, c) as st:
        got = loop(lambda: st.decoding(ids.shape[1]))
    ref = HookReference(model, decoder_layers(model), "self_attn", [[b, d]] * 3)
    with ref:
        ref.begin(mask)
        want = loop(contextlib.nullcontext)
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= 1e-5


@pytest.mark.parametrize("past", [0, 2])
@pytest.mark.parametrize("style", ["bool", "additive", "additive_unmasked_rows"])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_padding_read_from_4d_masks(style, pad, past):
    """A 4-D mask (static caches, user masks) gives the same padding as the 2-D one."""
    from fasteer.metadata import GenerationTracker, MetadataHook, TokenState
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, pad, seed=11)
    T, K = 7, 12                               # tokens at key positions past.. of a 12-long cache
    keys = torch.cat([torch.ones(3, past, dtype=torch.bool), mask.bool(),
                      torch.zeros(3, K - past - T, dtype=torch.bool)], 1)
    q = torch.arange(T).view(T, 1) + past
    allowed = (torch.arange(K).view(1, K) <= q)[None] & keys[:, None, :]     # [B, T, K]
    if style == "bool":
        m4 = allowed
    else:
        m4 = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        if style == "additive_unmasked_rows":
            # the SDPA fix-up: rows that attend to nothing are made to attend to everything
            m4 = torch.where(allowed.any(-1, keepdim=True), m4, torch.zeros_like(m4))
            assert past > 0 or pad == "right" or bool((m4 == 0).all(-1).any())
    hook = MetadataHook(model.model, TokenState(), GenerationTracker())
    got = hook._nonpad_4d(m4[:, None], {"cache_position": torch.arange(past, past + T)},
                          3, T, None, torch.device("cpu"))
    assert torch.equal(got, mask.bool())
