"""Per-position interventions: ``Scale([f_0, .., f_{P-1}])``, ``Add([P, D])`` and
``DynScale`` against a hook reference written here from the definitions.

The prompt index of a token is its place among its row's real tokens (the position id),
so left padding must not shift it; generated tokens and prompt tokens at index >= P are
untouched. The reference applies the edits with plain forward hooks on the prompt
forward only (later forwards of ``generate`` are generated tokens).
"""
import pytest
import torch

import fasteer as fs
from fasteer.plan import MAX_POSITIONS
from hook_reference import one_thread, prompt_batch, tiny_model  # noqa: F401 (autouse fixture)

D = 32


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def gemma2():
    return tiny_model("gemma2", seed=4)


def _module(model, site, layer):
    layer_mod = model.model.layers[layer]
    post_norm = hasattr(layer_mod, "post_feedforward_layernorm")
    if site == "attn_out":
        return layer_mod.post_attention_layernorm if post_norm else layer_mod.self_attn
    if site == "mlp_out":
        return layer_mod.post_feedforward_layernorm if post_norm else layer_mod.mlp
    assert site == "resid_post"
    return layer_mod


class Reference:
    """Forward hooks editing ``site`` outputs of the listed layers on the first forward.

    ``edit(layer, h_row [D] float32, index) -> new row`` for prompt tokens."""

    def __init__(self, model, site, layers, edit, mask, rows=None):
        self.model, self.site, self.layers, self.edit = model, site, layers, edit
        self.mask, self.rows = mask, rows
        self.forward = -1

    def __enter__(self):
        self.handles = [self.model.model.register_forward_pre_hook(self._count)]
        for l in self.layers:
            self.handles.append(_module(self.model, self.site, l).register_forward_hook(
                self._hook(l)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _count(self, module, args):
        self.forward += 1

    def _hook(self, layer):
        def hook(module, args, output):
            if self.forward != 0:
                return None
            h = output[0] if isinstance(output, tuple) else output
            new = h.clone()
            index = self.mask.cumsum(1) - 1
            for b in range(h.shape[0]):
                if self.rows is not None and b not in self.rows:
                    continue
                for t in range(h.shape[1]):
                    if self.mask[b, t]:
                        row = self.edit(layer, h[b, t].float(), int(index[b, t]))
                        new[b, t] = row.to(h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook


def _run_fs(model, ivs, ids, mask, rows=None, armed=False, gen=True, cache="dynamic"):
    # armed ahead, the tables are fixed: a slot per prompt index must fit
    st = (fs.patch(model, always_armed=True, slots=8, sites=["attn_out", "mlp_out", "resid_post"])
          if armed else fs.patch(model))
    try:
        st.set(*ivs, rows=rows)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = _generate(model, ids, mask, cache) if gen else None
    finally:
        st.unpatch()
    return logits, out


def _generate(model, ids, mask, cache):
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _run_ref(model, site, layers, edit, ids, mask, rows=None, gen=True, cache="dynamic"):
    with torch.no_grad():
        with Reference(model, site, layers, edit, mask, rows):
            logits = model(input_ids=ids, attention_mask=mask).logits
        if not gen:
            return logits, None
        with Reference(model, site, layers, edit, mask, rows):
            out = _generate(model, ids, mask, cache)
    return logits, out


def _assert_same(a, b, plain):
    diff = float((a[0] - b[0]).abs().max())
    assert diff <= 1e-5, f"logits differ from the reference by {diff:.3g}"
    if a[1] is not None:
        assert torch.equal(a[1], b[1]), f"greedy tokens differ:\n{a[1]}\n{b[1]}"
    effect = float((a[0] - plain).abs().max())
    assert effect > 1e-2, f"no visible effect ({effect:.2g})"


def _plain(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _factors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 3 - 1).tolist()       # some negative, none 1.0


@pytest.mark.parametrize("site", ["attn_out", "mlp_out", "resid_post"])
@pytest.mark.parametrize("n_pos", [4, 9])                       # shorter / longer than T=7
def test_per_position_scale(llama, site, n_pos):
    ids, mask = prompt_batch(3, 7, "left", seed=2)
    f = {0: _factors(n_pos, 1), 2: _factors(n_pos, 2)}

    def edit(layer, h, i):
        return h * f[layer][i] if i < n_pos else h

    for cache in ("dynamic", "static"):
        got = _run_fs(llama, [fs.Scale(f, site=site)], ids, mask, cache=cache)
        ref = _run_ref(llama, site, [0, 2], edit, ids, mask, cache=cache)
        _assert_same(got, ref, _plain(llama, ids, mask))


def test_per_position_scale_gemma_post_norm(gemma2):
    ids, mask = prompt_batch(3, 7, "left", seed=5)
    f = _factors(6, 3)

    def edit(layer, h, i):
        return h * f[i] if i < len(f) else h

    got = _run_fs(gemma2, [fs.Scale(f, layers=[1], site="mlp_out", positions="prompt")], ids, mask)
    ref = _run_ref(gemma2, "mlp_out", [1], edit, ids, mask)
    _assert_same(got, ref, _plain(gemma2, ids, mask))


def test_per_position_add(llama):
    ids, mask = prompt_batch(3, 7, "left", seed=6)
    g = torch.Generator().manual_seed(7)
    vecs = torch.randn(5, D, generator=g) * 2
    vecs[2] = 0                                   # an all-zero row: no edit at index 2

    def edit(layer, h, i):
        return h + 1.5 * vecs[i] if i < 5 else h

    got = _run_fs(llama, [fs.Add({1: vecs}, 1.5, site="attn_out")], ids, mask)
    ref = _run_ref(llama, "attn_out", [1], edit, ids, mask)
    _assert_same(got, ref, _plain(llama, ids, mask))


def test_dyn_scale_matches_formula(llama):
    ids, mask = prompt_batch(3, 7, "left", seed=8)
    g = torch.Generator().manual_seed(9)
    w = {0: torch.randn(D, generator=g) * 0.05, 2: torch.randn(D, generator=g) * 0.05}
    b = {0: 0.8, 2: -0.6}

    def edit(layer, h, i):          # float64 formula
        hd = h.double()
        return ((b[layer] + hd @ w[layer].double()) * hd).float()

    # DynScale is not position-indexed: generated tokens are edited too, so compare the
    # prompt forward only (the reference edits the first forward)
    got = _run_fs(llama, [fs.DynScale(w, b, site="mlp_out")], ids, mask, gen=False)
    ref = _run_ref(llama, "mlp_out", [0, 2], edit, ids, mask, gen=False)
    _assert_same(got, ref, _plain(llama, ids, mask))


def test_rows_mix_indexed_and_plain(llama):
    """Row 0: per-position factors; row 2: a plain Scale with a mask; row 1: untouched."""
    ids, mask = prompt_batch(3, 7, "left", seed=10)
    f = _factors(5, 11)
    m = torch.zeros(7, dtype=torch.bool)
    m[3] = True
    st = fs.patch(llama)
    try:
        st.set(fs.Scale({1: f}, site="attn_out"), rows=[0])
        st.set(fs.Scale(0.25, layers=[1], site="attn_out", positions=m), rows=[2])
        with torch.no_grad():
            logits = llama(input_ids=ids, attention_mask=mask).logits
    finally:
        st.unpatch()
    ref0 = _run_ref(llama, "attn_out", [1], lambda l, h, i: h * f[i] if i < 5 else h, ids, mask,
                    rows=[0], gen=False)[0]
    # the mask indexes the padded prompt (absolute column 3), per-position factors the
    # real tokens: row 2 has one pad, so column 3 is its index 2
    ref2 = _run_ref(llama, "attn_out", [1], lambda l, h, i: h * 0.25 if i == 2 else h, ids, mask,
                    rows=[2], gen=False)[0]
    plain = _plain(llama, ids, mask)
    assert float((logits[0] - ref0[0]).abs().max()) <= 1e-5
    assert float((logits[2] - ref2[2]).abs().max()) <= 1e-5
    assert torch.equal(logits[1], plain[1])
    assert float((logits[0] - plain[0]).abs().max()) > 1e-2


def test_armed_ahead_equals_host_path(llama):
    """The device path (always_armed: what CUDA graphs and torch.compile run) computes
    the same prompt indices as the host path, in a forward and through generate."""
    ids, mask = prompt_batch(3, 7, "left", seed=12)
    ivs = [fs.Scale({0: _factors(6, 13)}, site="mlp_out"),
           fs.Add({2: torch.randn(3, D)}, 1.0, site="attn_out")]
    host = _run_fs(llama, ivs, ids, mask)
    dev = _run_fs(llama, ivs, ids, mask, armed=True)
    assert float((host[0] - dev[0]).abs().max()) <= 1e-5
    assert torch.equal(host[1], dev[1])


def test_expanded_rows_follow_their_prompt(llama):
    """num_return_sequences repeats each prompt row: the copies get the prompt's indices."""
    ids, mask = prompt_batch(2, 7, "left", seed=14)
    f = _factors(7, 15)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2,
              num_return_sequences=2)
    with torch.no_grad():
        with fs.steer(llama, fs.Scale({1: f}, site="attn_out")):
            got = llama.generate(input_ids=ids, attention_mask=mask, **kw)
        rep = (ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
        with Reference(llama, "attn_out", [1], lambda l, h, i: h * f[i], rep[1]):
            # the reference sees the expanded batch in the first forward
            ref = llama.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("positions", ["generated", "last_prompt", "mask"])
def test_indexed_needs_prompt_rule(positions):
    rule = torch.ones(4, dtype=torch.bool) if positions == "mask" else positions
    with pytest.raises(ValueError, match="per-position"):
        fs.Scale([0.5, 2.0], layers=[0], positions=rule)
    with pytest.raises(ValueError, match="per-position"):
        fs.Add(torch.ones(2, D), layers=[0], positions=rule)


def test_bad_factors():
    with pytest.raises(ValueError, match="NaN"):
        fs.Scale([1.0, float("nan")], layers=[0])
    with pytest.raises(ValueError, match="1-D"):
        fs.Scale(torch.ones(2, 2), layers=[0])
    with pytest.raises(ValueError, match=str(MAX_POSITIONS)):
        fs.Scale([0.5] * (MAX_POSITIONS + 1), layers=[0])
    with pytest.raises(ValueError, match="no factor for layers"):
        fs.Scale({0: [0.5]}, layers=[0, 1])
    with pytest.raises(TypeError, match="layer keys"):
        fs.Scale({"x": [0.5]})
    with pytest.raises(ValueError, match="beyond"):
        fs.Scale([1e16, 1.0], layers=[0])


def test_armed_routing_capacity_refused_untouched(llama):
    """Armed ahead, the routing table has room for 64 prompt positions: a plan needing
    more is refused before any table changes."""
    ids, mask = prompt_batch(3, 7, "left", seed=16)
    st = fs.patch(llama, always_armed=True, slots=128, sites=["attn_out"])
    try:
        st.set(fs.Scale(0.5, layers=[1], site="attn_out"))
        with torch.no_grad():
            before = llama(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(ValueError, match="room for 64"):
            st.set(fs.Scale({1: [0.5] * 65}, site="attn_out"))
        with torch.no_grad():
            after = llama(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(before, after)
    finally:
        st.unpatch()


def test_slots_per_index(llama):
    """One slot per prompt index; factors equal to 1 add no edit."""
    from fasteer.plan import CODES, Request, compile_plan
    from fasteer.sites import model_sites
    from fasteer.plan import LoweringContext
    sites = model_sites(llama)
    ctx = LoweringContext(sites.n_layers, sites.hidden, sites.model_type)
    iv = fs.Scale({0: [0.5, 1.0, 2.0]}, site="attn_out")
    plan = compile_plan([Request((iv,), None)], sites, ctx)
    assert plan.n_positions == 3
    assert plan.lut.shape[1] == CODES * 4
    t = plan.points[("attn", 0)]
    # slots for index 0, 1, 2; index 1 (factor 1.0) has no edit
    assert t.meta.shape[0] == 3 and t.slot_has_edits == [True, False, True]
    assert sorted(float(p) for p in t.params[:, 0, 0] if p != 0) == [0.5, 2.0]


def test_fullgraph_compile_with_per_position_values(llama):
    """Per-position factors and DynScale under torch.compile(fullgraph=True): the device
    path computes the prompt indices, new factors of the same length reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    ids, mask = prompt_batch(3, 7, "left", seed=17)
    w = {1: torch.randn(D) * 0.05}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with fs.patch(llama) as st:
        compiled = torch.compile(llama, fullgraph=True, backend=counter)
        outs = []
        for seed in (18, 19):
            st.set(fs.Scale({0: _factors(5, seed), 2: _factors(5, seed + 7)}, site="mlp_out"),
                   fs.DynScale(w, 0.9, site="attn_out"))
            with torch.no_grad():
                eager = llama(input_ids=ids, attention_mask=mask).logits
                got = compiled(input_ids=ids, attention_mask=mask).logits
            assert float((got - eager).abs().max()) <= 1e-5
            outs.append(eager)
            if seed == 18:
                frames = counter.frame_count
        assert counter.frame_count == frames, "new factors of the same length recompiled"
        assert float((outs[0] - outs[1]).abs().max()) > 1e-2
