"""Per-row steering: one batch, different steering per row (serving, alpha sweeps).

Mixed rows against the hook reference (logits and greedy tokens, dynamic and static
cache), an alpha sweep in one `generate` whose vector is stored once, `set` replacing
the steering of some rows only, and the numerics of unsteered rows inside a steered
batch: where the fused kernel normalises a row it does not edit, the result equals the
model's own norm within float rounding (1e-6 relative).
"""
import pytest
import torch

import fasteer as fs
from hook_reference import (assert_same, cached_model, fasteer_outputs, one_thread, pair,
                            plain_outputs, prompt_batch, random_vectors,
                            reference_outputs)  # noqa: F401 (one_thread: autouse fixture)

D = 32


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "gpt_neox_parallel", "olmo2",
                                  "falcon_new"])
def test_mixed_rows_match_reference(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=12)
    v = random_vectors(range(3), D, seed=61, scale=3.0)
    u = random_vectors(range(3), D, seed=62, scale=1.0)
    a = pair("add", [0, 1], vectors=v, value=2.0)
    c = pair("clamp", [1, 2], site="resid_pre", vectors=u, value=-2.0, positions="prompt")
    s = pair("scale", [2], value=0.5)
    sets = [([a[0]], [0]), ([c[0], s[0]], [2])]          # row 1: no steering
    out = fasteer_outputs(model, sets, ids, mask)
    ref = reference_outputs(model, arch, [[a[1]], [], [c[1], s[1]]], ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())
    # row 1 is unsteered, but its norms ran in the fused kernel: rounding-level only
    assert float((out[0][1] - plain[0][1]).abs().max()) <= 1e-5
    assert float((out[0][0] - plain[0][0]).abs().max()) > 1e-2


def test_alpha_sweep_in_one_generate_stores_the_vector_once():
    model = cached_model("llama")
    alphas = [-4.0, -1.0, 0.0, 2.0, 6.0]
    ids, mask = prompt_batch(len(alphas), 6, "none", seed=13)
    v = random_vectors([1], D, seed=71, scale=1.0)
    pairs = [pair("add", [1], vectors=v, value=a) for a in alphas]
    sets = [([p[0]], [i]) for i, p in enumerate(pairs)]
    out = fasteer_outputs(model, sets, ids, mask)
    ref = reference_outputs(model, "llama", [[p[1]] for p in pairs], ids, mask)
    assert_same(out, ref)
    # alpha 0 is the model itself (up to the fused norm's rounding); the others are not
    plain = plain_outputs(model, ids, mask, caches=())[0]
    effect = (out[0] - plain).abs().amax(dim=(1, 2))
    assert float(effect[alphas.index(0.0)]) <= 1e-5
    assert all(float(e) > 1e-2 for a, e in zip(alphas, effect) if a != 0.0)
    st = fs.patch(model)
    try:
        for ivs, rows in sets:
            st.set(*ivs, rows=rows)
        tables = st.carriers[("pre", 2)].tables
        assert int((tables.bank.abs().sum(-1) > 0).sum()) == 1
        assert int((tables.meta[..., 0] != 0).sum()) == len(alphas)
    finally:
        st.unpatch()


def test_set_replaces_only_the_named_rows():
    model = cached_model("llama")
    ids, mask = prompt_batch(3, 7, "left", seed=14)
    v = random_vectors([0, 2], D, seed=81, scale=3.0)
    w = random_vectors([0, 2], D, seed=82, scale=3.0)
    a, b = pair("add", [0, 2], vectors=v, value=2.0), pair("add", [2], vectors=w, value=-3.0)
    # default for every row, then row 1 overridden, then row 2 explicitly unsteered
    sets = [([a[0]], None), ([b[0]], [1]), ([], [2])]
    out = fasteer_outputs(model, sets, ids, mask)
    ref = reference_outputs(model, "llama", [[a[1]], [b[1]], []], ids, mask)
    assert_same(out, ref)
    # set(..., rows=None) replaces everything, including explicit rows
    sets.append(([b[0]], None))
    out = fasteer_outputs(model, sets, ids, mask, caches=("dynamic",))
    ref = reference_outputs(model, "llama", [[b[1]]] * 3, ids, mask, caches=("dynamic",))
    assert_same(out, ref)


def _norm_outputs(model, carriers_of, run):
    """Run ``run`` and return [(carrier output, the module's own norm of its input)]."""
    pairs = []

    def hook(module, args, output):
        own = type(module).forward(module, args[0])     # the class's forward: the model's norm
        pairs.append((output.detach().clone(), own.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in carriers_of]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return pairs


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "olmo2"])
def test_unsteered_rows_keep_the_models_norm(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left", seed=15)
    v = random_vectors(range(3), D, seed=91, scale=3.0)
    st = fs.patch(model)
    try:
        st.set(fs.Add(v, 2.0, layers=[0, 1, 2], site="resid_pre"),
               fs.Add(v, 1.0, layers=[2], site="resid_post"), rows=[0])
        norms = [c.module for c in st.carriers.values() if c.point.kind == "norm"]
        with torch.no_grad():
            pairs = _norm_outputs(model, norms, lambda: model(input_ids=ids, attention_mask=mask))
    finally:
        st.unpatch()
    assert pairs               # the final norm (and the layer norms, where they carry) ran fused
    for out, own in pairs:
        # rows 1, 2 unsteered (row 0 steered: its own norm is of the edited input, also equal)
        scale = own.abs().max()
        assert float((out - own).abs().max() / scale) <= 1e-6


def test_set_many_equals_the_same_set_calls():
    model = cached_model("gpt2")
    ids, mask = prompt_batch(3, 7, "right", seed=16)
    v = random_vectors(range(3), D, seed=92, scale=2.0)
    steps = [([fs.Add(v, 1.0)], None), (fs.Scale(0.5, layers=[1]), [2]),
             ([fs.Clamp(v, 1.0, layers=[0]), fs.Add(v, -2.0)], [0])]
    with fs.patch(model) as st:
        for ivs, rows in steps:
            st.set(*(ivs if isinstance(ivs, list) else [ivs]), rows=rows)
        one_by_one = plain_outputs(model, ids, mask, caches=())[0]
        tables = {k: c.tables.meta.clone() for k, c in st.carriers.items()}
        st.clear()
        st.set_many(steps)
        assert all(torch.equal(c.tables.meta, tables[k]) for k, c in st.carriers.items())
        assert torch.equal(plain_outputs(model, ids, mask, caches=())[0], one_by_one)
        with pytest.raises(TypeError, match="assignments: expected"):
            st.set_many([fs.Add(v, 1.0)])
        with pytest.raises(ValueError, match="rows:"):
            st.set_many([(fs.Add(v, 1.0), [0]), (fs.Add(v, 1.0), [-2])])
        assert torch.equal(plain_outputs(model, ids, mask, caches=())[0], one_by_one)
