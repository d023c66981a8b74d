"""Component-output sites ``attn_out[l]`` / ``mlp_out[l]`` on every architecture in the table.

* The modules named in `hook_reference.COMPONENTS` (read off the transformers source, not
  off fasteer's table) really produce what each layer adds to the residual stream: with
  plain forward hooks on a padded batch, resid_post - resid_pre == attn_out + mlp_out,
  and where resid_mid exists resid_mid - resid_pre == attn_out (resid_mid read as the
  input of the module that reads the stream after the attention add). fasteer's table
  must resolve to those same modules.
* Patched model == forward-hook reference (logits within 1e-5, identical greedy tokens
  with dynamic and static caches) for Scale / Add / Clamp / Ablate at both sites, per-row
  steering, position rules, and mixed with the residual-stream sites.
* ``unpatch`` restores the model bit for bit and leaves the component modules' hooks as
  they were; autograd through component edits equals the reference; clear errors on
  unknown architectures and for sites left out of ``patch(model, sites=...)``.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasteer as fs
import fasteer.sites as sites_mod
from fasteer.sites import decoder_layers, model_sites
from hook_reference import (ARCHS, COMPONENTS, HookReference, assert_same, branch_path,
                            branch_scale,
                            cached_model, component_module, fasteer_outputs, one_thread, pair,
                            plain_outputs, prompt_batch, random_vectors, reference_outputs,
                            tiny_model)

_AUTOUSE = (one_thread,)     # the autouse fixture must be in this module's namespace

D, N_LAYERS = 32, 3
PARALLEL = {"gpt_neox_parallel", "falcon_parallel", "falcon_new", "phi", "stablelm_parallel",
            "cohere", "cohere2"}
SITES = ("attn_out", "mlp_out")

# Sequential blocks: the module (relative to the layer) whose first input is resid_mid,
# the stream after the attention add -- what the MLP branch reads and adds to.
_LLAMA_MID = "post_attention_layernorm"
MID_READER = {
    "llama": _LLAMA_MID, "mistral": _LLAMA_MID, "mixtral": _LLAMA_MID, "qwen2": _LLAMA_MID,
    "qwen3": _LLAMA_MID, "qwen3_moe": _LLAMA_MID, "phi3": _LLAMA_MID, "gemma": _LLAMA_MID,
    "gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm",
    "olmo2": "mlp",                                   # no pre-norm: the MLP reads it raw
    "gpt2": "ln_2",
    "gpt_neox_sequential": "post_attention_layernorm",
    "falcon_sequential": "post_attention_layernorm",
    # issue 21 (fasteer/site_families.py)
    "qwen2_moe": _LLAMA_MID, "stablelm_sequential": _LLAMA_MID, "granite": _LLAMA_MID,
    "olmo": _LLAMA_MID, "smollm3": _LLAMA_MID, "llama4_text": _LLAMA_MID, "glm4": _LLAMA_MID,
    "deepseek_v3": _LLAMA_MID, "gpt_oss": _LLAMA_MID, "mistral3": _LLAMA_MID,
    "olmo3": "mlp", "gemma3": "pre_feedforward_layernorm",
}
# Architectures whose sublayer output passes a norm before the add: there the raw
# sublayer modules are the wrong choice, and the identity must fail for them.
POST_NORM = {"gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "gemma3"}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _capture(model, arch, ids, mask):
    """{(name, layer): tensor} read with plain hooks (cloned when read: Falcon's parallel
    blocks add the attention output into the MLP output in place)."""
    got, handles = {}, []

    def save_in(name, l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            got[(name, l)] = h.detach().clone()
        return hook

    def save_out(name, l):
        def hook(module, args, output):
            got[(name, l)] = _first(output).detach().clone()
        return hook

    attn_path, mlp_path = COMPONENTS[arch]
    try:
        for l, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_pre_hook(save_in("pre", l), with_kwargs=True))
            handles.append(layer.register_forward_hook(save_out("post", l)))
            for name, path in (("attn", attn_path), ("mlp", mlp_path)):
                mod = component_module(layer, path)
                handles.append(mod.register_forward_hook(save_out(name, l)))
            if arch in MID_READER:
                reader = layer.get_submodule(MID_READER[arch])
                handles.append(reader.register_forward_pre_hook(save_in("mid", l),
                                                                with_kwargs=True))
                branch = layer.get_submodule(branch_path(arch))
                handles.append(branch.register_forward_hook(save_out("branch", l)))
            if arch in POST_NORM:
                handles.append(layer.self_attn.register_forward_hook(save_out("raw_attn", l)))
                handles.append(layer.mlp.register_forward_hook(save_out("raw_mlp", l)))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return got


def _close(a, b, what, atol=1e-5):
    diff = float((a - b).abs().max())
    assert diff <= atol, f"{what}: differ by {diff:.3g}"


# --------------------------------------------------------------------------- the modules

@pytest.mark.parametrize("arch", list(ARCHS))
def test_component_modules_are_what_the_layer_adds(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    got = _capture(model, arch, ids, mask)
    scale = branch_scale(model)
    assert (arch in MID_READER) == (branch_path(arch) is not None) == (arch not in PARALLEL)
    for l in range(N_LAYERS):
        pre, post, attn, mlp = (got[(k, l)] for k in ("pre", "post", "attn", "mlp"))
        if mlp.dim() == 2:
            # Llama-4's MoE feed_forward returns the tokens flattened, [B*T, D]
            mlp = mlp.view(pre.shape)
        assert attn.shape == mlp.shape == pre.shape == (3, 7, D)
        # not vacuous: both sublayers contribute
        assert float(attn.abs().max()) > 1e-2 and float(mlp.abs().max()) > 1e-2
        # Granite adds residual_multiplier * the sublayer outputs (`branch_scale`)
        attn_s, mlp_s = scale * attn, scale * mlp
        _close(post - pre, attn_s + mlp_s,
               f"layer {l}: resid_post - resid_pre vs attn_out + mlp_out")
        if arch in MID_READER:
            mid = got[("mid", l)]
            _close(mid - pre, attn_s, f"layer {l}: resid_mid - resid_pre vs attn_out")
            _close(post - mid, mlp_s, f"layer {l}: resid_post - resid_mid vs mlp_out")
            # the module the reference adds to form resid_mid gives the same branch
            _close(scale * got[("branch", l)], mid - pre, f"layer {l}: branch_path output")
        if arch in POST_NORM:
            wrong = got[("raw_attn", l)] + got[("raw_mlp", l)]
            assert float((post - pre - wrong).abs().max()) > 1e-2, \
                "the raw sublayer outputs should not be what this architecture adds"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_table_resolves_to_the_same_modules(arch):
    model = cached_model(arch)
    sites = model_sites(model)
    assert not sites.is_fallback
    attn_path, mlp_path = COMPONENTS[arch]
    for l, layer in enumerate(decoder_layers(model)):
        for key, path in (("attn", attn_path), ("mlp", mlp_path)):
            point = sites.points[(key, l)]
            assert point.kind == "output"
            assert point.module is component_module(layer, path), (key, l, path)
        assert sites.stream_point(l, "attn_out") == ("attn", l)
        assert sites.stream_point(l, "mlp_out") == ("mlp", l)


# --------------------------------------------------------------------------- vs the reference

def _row_pairs(site, vecs):
    """Per batch row, its (fasteer, reference) pairs: every kind, several layers, position
    rules (row 1 has two pads, so its last prompt token is not the first real one)."""
    return [
        [pair("scale", [0, 1], site=site, value=0.4),
         pair("add", [2], site=site, vectors=vecs, value=2.5, positions="prompt")],
        [pair("clamp", [1], site=site, vectors=vecs, value=1.5),
         pair("ablate", [0, 2], site=site, vectors=vecs),
         pair("add", [1], site=site, vectors=vecs, value=-3.0, positions="last_prompt")],
        [pair("add", [0, 2], site=site, vectors=vecs, value=-2.0),
         pair("scale", [1], site=site, value=1.8, positions="prompt"),
         pair("clamp", [2], site=site, vectors=vecs, value=-1.0, positions="last_prompt")],
    ]


def _effect_per_row(out, plain):
    return [float((out[0][r] - plain[0][r]).abs().max()) for r in range(out[0].shape[0])]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_per_row_kinds_and_positions(arch, site):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    vecs = random_vectors(range(N_LAYERS), D, seed=7, scale=2.0)
    rows = _row_pairs(site, vecs)
    sets = [([a for a, _ in r], [i]) for i, r in enumerate(rows)]
    out = fasteer_outputs(model, sets, ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in r] for r in rows], ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())
    effects = _effect_per_row(out, plain)
    assert min(effects) > 1e-2, f"steering had no visible effect on some row: {effects}"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox_parallel"])
def test_position_rules_alone(arch):
    """``prompt`` and ``last_prompt`` alone, every row: decode steps are untouched."""
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    vecs = random_vectors(range(N_LAYERS), D, seed=8, scale=3.0)
    for positions in ("prompt", "last_prompt"):
        ivs = [pair("add", [1], site="attn_out", vectors=vecs, value=3.0, positions=positions),
               pair("scale", [2], site="mlp_out", value=2.0, positions=positions)]
        out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
        ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
        assert_same(out, ref)
        plain = plain_outputs(model, ids, mask, caches=())
        assert min(_effect_per_row(out, plain)) > 1e-2
        if positions == "last_prompt":
            # only the last prompt token of each row is edited: the logits of the earlier
            # real tokens are unchanged (pads, whose attention HF unmasks, may move)
            real = mask[:, :-1].bool()
            _close(out[0][:, :-1][real], plain[0][:, :-1][real],
                   "logits of real tokens before the last prompt token", atol=1e-5)


# --------------------------------------------------------------------------- mixed sites

def _mixed_pairs(arch, vecs):
    """Every site of layer 1 (and resid_post of the last layer), two edits at mlp_out."""
    ivs = [pair("add", [1], site="mlp_out", vectors=vecs, value=2.0),
           pair("scale", [0, 2], site="resid_post", value=0.8),
           pair("clamp", [1], site="attn_out", vectors=vecs, value=1.0),
           pair("ablate", [1], site="resid_pre", vectors=vecs),
           pair("scale", [1], site="mlp_out", value=0.5),
           pair("add", [0], site="attn_out", vectors=vecs, value=-2.0),
           pair("add", [1], site="resid_post", vectors=vecs, value=1.0)]
    if branch_path(arch) is not None:
        ivs.append(pair("clamp", [1], site="resid_mid", vectors=vecs, value=-1.0))
    return ivs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_with_stream_sites(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    vecs = random_vectors(range(N_LAYERS), D, seed=9, scale=2.0)
    ivs = _mixed_pairs(arch, vecs)
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())
    assert min(_effect_per_row(out, plain)) > 1e-2

    # order across sites does not matter: group by site, sites in reverse order of first
    # appearance, keeping each site's own order
    order = list(dict.fromkeys(b.site for _, b in ivs))[::-1]
    regrouped = [p for s in order for p in ivs if p[1].site == s]
    assert regrouped != ivs
    logits, _ = fasteer_outputs(model, [([a for a, _ in regrouped], None)], ids, mask, caches=())
    # (the vectors land in other bank rows, which can change the CPU kernel's summation
    # order: float32 rounding, measured up to 1.1e-6 with transformers 4.57)
    _close(logits, out[0], "regrouped by site", atol=1e-5)

    # order within a site does: Scale then Add at mlp_out[1] differs from Add then Scale
    i_add, i_scale = 0, 4
    swapped = list(ivs)
    swapped[i_add], swapped[i_scale] = ivs[i_scale], ivs[i_add]
    out2 = fasteer_outputs(model, [([a for a, _ in swapped], None)], ids, mask,
                           caches=("dynamic",))
    ref2 = reference_outputs(model, arch, [[b for _, b in swapped]] * 3, ids, mask,
                             caches=("dynamic",))
    assert_same(out2, ref2)
    assert float((out2[0] - out[0]).abs().max()) > 1e-3, "order within mlp_out had no effect"


# --------------------------------------------------------------------------- unpatch

def _hook_state(mods):
    return [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in mods]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unpatch_restores_model_and_hooks(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    layers = decoder_layers(model)
    mods = [component_module(layer, p) for layer in layers for p in COMPONENTS[arch]]
    # a hook of the user's own on a component module survives patching and unpatching
    user = mods[0].register_forward_hook(lambda module, args, output: None)
    try:
        before = _hook_state(mods)
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits

        def logits():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits

        vecs = random_vectors(range(N_LAYERS), D, seed=3, scale=2.0)
        st = fs.patch(model)
        try:
            st.set(fs.Add(vecs, 2.0, layers=[0, 1, 2], site="attn_out"),
                   fs.Scale(0.5, layers=[0, 1, 2], site="mlp_out"), rows=[0, 2])
            st.set(fs.Ablate(vecs, layers=[1], site="mlp_out", positions="last_prompt"),
                   rows=[1])
            # one carrier hook on every component module
            for m, (hooks, pre) in zip(mods, before):
                assert len(m._forward_hooks) == len(hooks) + 1
            assert float((logits() - plain).abs().max()) > 1e-2
            st.clear()                 # no work: the carriers leave the modules
            assert _hook_state(mods) == before
            assert torch.equal(logits(), plain)
            st.set(fs.Scale(0.3, layers=[1], site="attn_out"))
            assert float((logits() - plain).abs().max()) > 1e-2
        finally:
            st.unpatch()
        assert _hook_state(mods) == before
        assert torch.equal(logits(), plain)

        # armed ahead: carriers installed at once on every component module, then removed
        st = fs.patch(model, sites=list(SITES), always_armed=True)
        try:
            for m, (hooks, pre) in zip(mods, before):
                assert len(m._forward_hooks) == len(hooks) + 1
            assert set(st.carriers) == {(k, l) for k in ("attn", "mlp") for l in range(N_LAYERS)}
        finally:
            st.unpatch()
        assert _hook_state(mods) == before
        assert torch.equal(logits(), plain)
    finally:
        user.remove()


# --------------------------------------------------------------------------- autograd

def _loss(logits, ids, mask):
    """Next-token cross entropy over real tokens."""
    lp = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    w = mask[:, 1:].reshape(-1).float()
    return (F.cross_entropy(lp, target, reduction="none") * w).sum() / w.sum()


def _loss_and_grads(model, ids, mask, ref=None):
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        if ref is not None:
            ref.begin(mask)
        loss = _loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("with_attn", [False, True], ids=["scale_mlp", "scale_mlp+add_attn"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2", "gpt2", "falcon_parallel"])
def test_autograd_matches_reference(arch, with_attn):
    model = tiny_model(arch)                       # its own copy: parameters require grad
    assert all(p.requires_grad for p in model.parameters())
    ids, mask = prompt_batch(3, 7, "left")
    ivs = [pair("scale", [0, 2], site="mlp_out", value=0.6)]
    if with_attn:
        vecs = random_vectors([1], D, seed=4, scale=2.0)
        ivs.append(pair("add", [1], site="attn_out", vectors=vecs, value=1.5))

    loss_p, grads_p = _loss_and_grads(model, ids, mask)
    with fs.patch(model) as st:
        st.set(*[a for a, _ in ivs])
        loss_f, grads_f = _loss_and_grads(model, ids, mask)
    ref = HookReference(model, decoder_layers(model), branch_path(arch), [[b for _, b in ivs]] * 3,
                        components=COMPONENTS[arch])
    with ref:
        loss_r, grads_r = _loss_and_grads(model, ids, mask, ref)

    assert abs(loss_f - loss_r) <= 1e-5, (loss_f, loss_r)
    assert abs(loss_f - loss_p) > 1e-3, "steering did not change the loss"
    assert set(grads_f) == set(grads_r) == set(grads_p)
    for name in grads_r:
        _close(grads_f[name], grads_r[name], f"grad of {name}")
    changed = max(float((grads_f[n] - grads_p[n]).abs().max()) for n in grads_p)
    assert changed > 1e-3, "steering did not change the gradients"
    # and the model is unpatched again
    loss_again, _ = _loss_and_grads(model, ids, mask)
    assert loss_again == loss_p


# --------------------------------------------------------------------------- errors

def test_unknown_architecture_rejects_component_sites(monkeypatch):
    model = tiny_model("llama")                    # its own copy: the type is changed
    model.config.model_type = "unknown_xyz_components"
    monkeypatch.setattr(sites_mod, "_warned_types", set())
    monkeypatch.setattr("fasteer.carrier_probe.ENABLED", False)     # the hook fallback
    with pytest.warns(UserWarning, match="unknown_xyz_components"):
        assert model_sites(model).is_fallback
    mods = [m for layer in decoder_layers(model) for m in (layer.self_attn, layer.mlp)]
    before = _hook_state(mods)
    ids, mask = prompt_batch(3, 7, "left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # warned once per type: not again
        for site in SITES:
            with pytest.raises(ValueError, match=f"'{site}' is not supported"):
                fs.steer(model, fs.Scale(0.5, layers=[1], site=site))
            with pytest.raises(ValueError, match=f"'{site}' is not supported"):
                fs.patch(model, sites=[site])
            with pytest.raises(ValueError, match=f"'{site}' is not supported"):
                fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_post"),
                         fs.Clamp(torch.ones(D), 1.0, layers=[2], site=site))
        # nothing was left installed: patching again works, and the stream sites steer
        with fs.patch(model) as st:
            st.set(fs.Add(torch.ones(D), 2.0, layers=[1]))
            with torch.no_grad():
                steered = model(input_ids=ids, attention_mask=mask).logits
    assert float((steered - plain).abs().max()) > 1e-2
    assert _hook_state(mods) == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "falcon_new"])
def test_patch_attn_out_only(arch):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, "left")
    layers = decoder_layers(model)
    vecs = random_vectors(range(N_LAYERS), D, seed=12, scale=2.0)
    iv, ref_edit = pair("add", [1], site="attn_out", vectors=vecs, value=2.0)
    st = fs.patch(model, sites=["attn_out"])
    try:
        assert set(st.carriers) == {("attn", l) for l in range(N_LAYERS)}
        for l, layer in enumerate(layers):
            assert st.carriers[("attn", l)].module is component_module(layer, COMPONENTS[arch][0])
        st.set(iv)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for bad in ([fs.Scale(0.5, layers=[1], site="mlp_out")],
                    [fs.Scale(0.5, layers=[1], site="attn_out"),
                     fs.Ablate(vecs, layers=[2], site="mlp_out")],
                    [fs.Add(vecs, 1.0, layers=[1], site="resid_post")]):
            with pytest.raises(ValueError, match=r"no carrier installed.*sites="):
                st.set(*bad)
        # the failed sets changed nothing
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    finally:
        st.unpatch()
    ref_logits, _ = reference_outputs(model, arch, [[ref_edit]] * 3, ids, mask, caches=())
    _close(logits, ref_logits, "attn_out-only patch vs reference")
    plain, _ = plain_outputs(model, ids, mask, caches=())
    assert float((logits - plain).abs().max()) > 1e-2
