"""Conditional steering (`when=`) and norm preservation, against the hook reference.

A condition is tested per token on the stream as it enters the site (before any edit
there). Thresholds are chosen so that some tokens pass and some do not: each case checks
that the conditional result differs both from the unsteered and from the
unconditionally steered model, so the condition really splits the tokens.
"""
import pytest

from hook_reference import (assert_same, cached_model, fasteer_outputs, one_thread, pair,
                            plain_outputs, prompt_batch, random_vectors,
                            reference_outputs)  # noqa: F401 (one_thread: autouse fixture)

D = 32

CONDITIONS = {
    "cosine": ("cosine", 0.05, 0.0, False),
    "cosine_below": ("cosine", -0.05, 0.0, True),
    "projection": ("projection", 0.5, 0.25, False),
    "projection_below": ("projection", 0.0, -0.1, True),
}


@pytest.mark.parametrize("cond", list(CONDITIONS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "olmo2"])
def test_condition_matches_reference(arch, cond):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=16)
    kind, thr, bias, below = CONDITIONS[cond]
    c = random_vectors(range(3), D, seed=101, scale=1.0)
    v = random_vectors(range(3), D, seed=102, scale=3.0)
    spec = (kind, c, thr, bias, below)
    ivs = [pair("add", [0, 1], vectors=v, value=2.0, cond=spec),
           pair("ablate", [1], site="resid_pre", vectors=c, cond=spec)]
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())[0]
    unconditional = [pair("add", [0, 1], vectors=v, value=2.0),
                     pair("ablate", [1], site="resid_pre", vectors=c)]
    always = fasteer_outputs(model, [([a for a, _ in unconditional], None)], ids, mask,
                             caches=())[0]
    assert float((out[0] - plain).abs().max()) > 1e-2
    assert float((out[0] - always).abs().max()) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt_neox_sequential"])
def test_conditions_see_the_stream_before_edits_at_the_site(arch):
    """Two edits at one point: the second's condition reads h_in, not the first's result."""
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "right", seed=17)
    c = random_vectors([1], D, seed=111, scale=1.0)
    big = {1: c[1] * 50.0}        # pushes every token far along c
    spec = ("cosine", c, 0.1, 0.0, False)
    ivs = [pair("add", [1], site="resid_mid", vectors=big, value=1.0),
           pair("scale", [1], site="resid_mid", value=0.5, cond=spec)]
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)


@pytest.mark.parametrize("arch", ["llama", "falcon_sequential"])
def test_preserve_norm(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=18)
    v = random_vectors(range(3), D, seed=121, scale=3.0)
    ivs = [pair("add", [0, 2], vectors=v, value=4.0, preserve_norm=True),
           pair("clamp", [1], site="resid_mid", vectors=v, value=3.0, preserve_norm=True)]
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)
    plain_ivs = [pair("add", [0, 2], vectors=v, value=4.0),
                 pair("clamp", [1], site="resid_mid", vectors=v, value=3.0)]
    plain = fasteer_outputs(model, [([a for a, _ in plain_ivs], None)], ids, mask, caches=())
    assert float((out[0] - plain[0]).abs().max()) > 1e-2
