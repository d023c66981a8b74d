"""Real pretrained models: the patched model == a plain forward-hook reference.

SmolLM2-135M-Instruct (Llama, 30 layers, D=576) and Gemma-3-270M (gemma3_text, 18 layers,
D=640: its attention output goes through ``post_attention_layernorm`` before the residual
add, and ``pre_feedforward_layernorm`` reads resid_mid), float32, on a left-padded batch of
four English prompts of different lengths. Compared with `hook_reference.HookReference`
(and `sae_reference.SAEHookReference` for SAE edits), which knows nothing of fasteer's
carriers, tables or kernels: logits of one forward within float32 rounding and identical
greedy tokens with a dynamic and a static KV cache.

* every intervention kind (Add, Clamp, Ablate, Scale; SAE FeatureEdit, single and joint,
  and SAEReplace with and without the error term) at every site (resid_pre, resid_mid,
  resid_post), at early, middle and last layers;
* per-row steering: different interventions on different rows of one batch, and a row
  left unsteered (which must stay the plain model's row);
* several sites stacked on one stream point (resid_post[l] then resid_pre[l+1]) and Add
  at every layer;
* ``st.clear()`` and ``st.unpatch()``: logits and tokens bit-identical to the unpatched
  model.

Edits are sized from the model's own residual norms at each point (measured once per
model on the same prompts), so each steered row visibly changes its logits and some greedy
tokens change: the equality with the reference is never vacuous.
"""
from __future__ import annotations

import functools

import pytest
import torch

import fasteer as fs
from fasteer.sites import decoder_layers
from hook_reference import HookReference, RefEdit, branch_path, component_paths, pair
from real_models._load import NAMES, load
from sae_reference import SAEHookReference, feature_pair, replace_pair

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old",
    "Water boils at",
    "My favourite colour is blue because it",
)
NEW_TOKENS = 5
CACHES = ("dynamic", "static")

# Logit tolerance, relative to the largest |logit| of the reference forward (~30 unsteered
# on both models, up to ~300 where steering drives Gemma-3 hard). The two sides differ
# only by float32 rounding: the fused kernel normalises (and edits) with another summation
# order than HF's RMSNorm / the hooks' torch ops, about 1 ulp (6e-8 relative) per stream
# point, and 2L+1 such points then feed the later layers and the LM head, which amplify
# it. Measured here (CPU backend): at most 4e-6 relative (SmolLM2, 30 layers) and 2e-6
# (Gemma-3). 1e-4 relative (3e-3 to 3e-2 in logits) is 25x above that and 30x to 300x
# below the smallest change the steering makes to a steered row (asserted > 1.0 below),
# so a wrong edit anywhere cannot hide in it.
RTOL_LOGITS = 1e-4
MIN_EFFECT = 1.0


# --------------------------------------------------------------------------- setup

@functools.lru_cache(maxsize=None)
def _batch(name: str):
    _, tok = load(name)
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert tok.padding_side == "left" and bool((mask[:, -1] == 1).all())
    assert len(set(mask.sum(1).tolist())) == len(PROMPTS)        # four different lengths
    return ids, mask


def _point(site: str, layer: int) -> tuple[str, int]:
    return RefEdit("add", [layer], site).point(layer)


@functools.lru_cache(maxsize=None)
def _profile(name: str):
    """{stream point: (median token norm, mean token vector)} of the unsteered model on
    the test batch, real tokens only; read with plain hooks (resid_mid = the stream
    entering the layer + the attention branch, as the reference forms it)."""
    model, _ = load(name)
    ids, mask = _batch(name)
    layers = decoder_layers(model)
    branch = branch_path(model.config.model_type)
    seen, h_in, handles = {}, {}, []

    def pre(l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h_in[l] = h
            seen[("pre", l)] = h
        return hook

    def mid(l):
        def hook(module, args, output):
            b = output[0] if isinstance(output, tuple) else output
            seen[("mid", l)] = h_in[l] + b
        return hook

    def last(module, args, output):
        seen[("pre", len(layers))] = output[0] if isinstance(output, tuple) else output

    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(l), with_kwargs=True))
        handles.append(layer.get_submodule(branch).register_forward_hook(mid(l)))
    handles.append(layers[-1].register_forward_hook(last))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    real = mask.bool()
    return {p: (float(h[real].norm(dim=-1).median()), h[real].mean(0).clone())
            for p, h in seen.items()}


def _norm(name, site, layer) -> float:
    return _profile(name)[_point(site, layer)][0]


def _sized(name, site, layers, seed, times=1.0) -> dict:
    """Random directions, each ``times`` the median residual norm at its point."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in layers:
        v = torch.randn(_profile(name)[_point(site, l)][1].numel(), generator=g)
        out[l] = v / v.norm() * times * _norm(name, site, l)
    return out


def _mean_dirs(name, site, layers) -> dict:
    """The mean residual vector at each point: ablating it is a large edit."""
    return {l: _profile(name)[_point(site, l)][1].clone() for l in layers}


def _layers(model):
    n = model.config.num_hidden_layers
    return n // 6, n // 2, n - 1                        # early, middle, last


def _sae(name, layer, site, activation, f, seed):
    """A random SAE of the model's width whose pre-activations are O(1) on this model's
    stream at (layer, site) and whose decoder rows are about as long as the stream there,
    so a latent edit of a few units moves the stream by a few times its norm."""
    model, _ = load(name)
    d, n = model.config.hidden_size, _norm(name, site, layer)
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(f, generator=g) * 0.8 - 0.1
    return fs.SAE(torch.randn(d, f, generator=g) / n, torch.randn(f, generator=g) * 0.1,
                  torch.randn(f, d, generator=g) * (n / d ** 0.5),
                  torch.randn(d, generator=g) * (0.1 * n / d ** 0.5),
                  activation=activation, layer=layer, site=site, **kw)


# --------------------------------------------------------------------------- running

def _generate(model, tok, ids, mask, cache):
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _run(model, tok, ids, mask, caches):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits, {c: _generate(model, tok, ids, mask, c) for c in caches}


def run_fasteer(name, sets, caches=CACHES):
    """Patch, ``set`` each (interventions, rows), run; always unpatches."""
    model, tok = load(name)
    ids, mask = _batch(name)
    st = fs.patch(model)
    try:
        for ivs, rows in sets:
            st.set(*ivs, rows=rows)
        return _run(model, tok, ids, mask, caches)
    finally:
        st.unpatch()


def run_reference(name, row_edits, caches=CACHES, sae=False):
    """The same steering with plain forward hooks (``row_edits``: per row, its edits)."""
    model, tok = load(name)
    ids, mask = _batch(name)
    cls = SAEHookReference if sae else HookReference
    model_type = model.config.model_type
    ref = cls(model, decoder_layers(model), branch_path(model_type), row_edits,
              components=component_paths(model_type))
    logits, gens = None, {}
    with ref, torch.no_grad():
        ref.begin(mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for c in caches:
            ref.begin(mask)
            gens[c] = _generate(model, tok, ids, mask, c)
    return logits, gens


@functools.lru_cache(maxsize=None)
def run_plain(name):
    model, tok = load(name)
    ids, mask = _batch(name)
    return _run(model, tok, ids, mask, CACHES)


def check(name, out, ref, steered_rows, unsteered_rows=()):
    """``out`` equals ``ref`` (logits to float32 rounding, greedy tokens exactly); the
    steered rows visibly differ from the plain model, the unsteered ones do not."""
    (lf, gf), (lr, gr) = out, ref
    atol = RTOL_LOGITS * float(lr.abs().max())
    diff = float((lf - lr).abs().max())
    assert diff <= atol, f"{name}: logits differ from the reference by {diff:.3g} > {atol:.3g}"
    for c in gr:
        assert torch.equal(gf[c], gr[c]), \
            f"{name}: greedy tokens ({c} cache) differ:\n{gf[c]}\n{gr[c]}"
    lp, gp = run_plain(name)
    real = _batch(name)[1].bool()
    for r in steered_rows:
        effect = float((lf[r] - lp[r])[real[r]].abs().max())
        assert effect > MIN_EFFECT, f"{name}: row {r}: steering moved the logits by {effect:.3g}"
    for r in unsteered_rows:
        assert float((lf[r] - lp[r]).abs().max()) <= atol, f"{name}: unsteered row {r} changed"
        for c in gf:
            assert torch.equal(gf[c][r], gp[c][r]), f"{name}: unsteered row {r}: tokens changed"
    if steered_rows:
        changed = [r for r in steered_rows for c in gf if not torch.equal(gf[c][r], gp[c][r])]
        assert changed, f"{name}: steering changed no greedy token"


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("name", NAMES)
def test_each_kind_on_its_own_row(name, site):
    """Row 0 Add, row 1 Clamp, row 2 Ablate + Scale, row 3 unsteered; early, middle and
    last layers of one site."""
    model, _ = load(name)
    early, mid, last = _layers(model)
    add = pair("add", [early, last], site=site, value=2.0,
               vectors=_sized(name, site, [early, last], seed=11))
    clamp = pair("clamp", [mid, last], site=site, value=3.0 * _norm(name, site, mid),
                 vectors=_sized(name, site, [mid, last], seed=12))
    ablate = pair("ablate", [mid], site=site, vectors=_mean_dirs(name, site, [mid]))
    scale = pair("scale", [early], site=site, value=0.4)
    out = run_fasteer(name, [([add[0]], [0]), ([clamp[0]], [1]), ([ablate[0], scale[0]], [2])])
    ref = run_reference(name, [[add[1]], [clamp[1]], [ablate[1], scale[1]], []])
    check(name, out, ref, steered_rows=[0, 1, 2], unsteered_rows=[3])


@pytest.mark.parametrize("name", NAMES)
def test_scale_alone_changes_and_matches(name):
    """Scale on its own (it shares row 2 with Ablate above): resid_pre and resid_mid of
    one middle layer, every row; and resid_post of the last layer, which only feeds the
    final norm and so changes the logits by rounding only."""
    model, _ = load(name)
    _, mid, last = _layers(model)
    a = pair("scale", [mid], site="resid_pre", value=0.3)
    b = pair("scale", [mid], site="resid_mid", value=2.5)
    c = pair("scale", [last], site="resid_post", value=4.0)
    out = run_fasteer(name, [([a[0], b[0], c[0]], None)], caches=("dynamic",))
    ref = run_reference(name, [[a[1], b[1], c[1]]] * len(PROMPTS), caches=("dynamic",))
    check(name, out, ref, steered_rows=range(len(PROMPTS)))


@pytest.mark.parametrize("name", NAMES)
def test_stacked_sites_and_every_layer(name):
    """Every row: Add at every layer's resid_pre; at one stream point resid_post[l] then
    resid_pre[l+1] (one carrier: Clamp then Ablate, an order that matters); Scale at
    resid_mid[l]; Add at the last layer's resid_post on generated tokens only."""
    model, _ = load(name)
    n = model.config.num_hidden_layers
    _, mid, last = _layers(model)
    every = pair("add", range(n), site="resid_pre", value=0.3,
                 vectors=_sized(name, "resid_pre", range(n), seed=21))
    clamp = pair("clamp", [mid], site="resid_post", value=2.0 * _norm(name, "resid_post", mid),
                 vectors=_sized(name, "resid_post", [mid], seed=22))
    ablate = pair("ablate", [mid + 1], site="resid_pre",
                  vectors=_sized(name, "resid_pre", [mid + 1], seed=22))   # the same u
    scale = pair("scale", [mid], site="resid_mid", value=1.5)
    gen = pair("add", [last], site="resid_post", value=3.0, positions="generated",
               vectors=_sized(name, "resid_post", [last], seed=23))
    ivs = [every, clamp, ablate, scale, gen]
    out = run_fasteer(name, [([a for a, _ in ivs], None)])
    ref = run_reference(name, [[b for _, b in ivs]] * len(PROMPTS))
    check(name, out, ref, steered_rows=range(len(PROMPTS)))


@pytest.mark.parametrize("name", NAMES)
def test_sae_edits_per_row(name):
    """SAE steering per row: row 0 a fused single-feature FeatureEdit (JumpReLU SAE at the
    last layer's resid_post, i.e. the final norm); row 1 a joint three-feature FeatureEdit
    (ReLU SAE at a middle layer's resid_mid) and the single edit; row 2 SAEReplace with the
    error term kept (middle layer) and without it (last layer); row 3 unsteered."""
    model, _ = load(name)
    _, mid, last = _layers(model)
    jump = _sae(name, last, "resid_post", "jumprelu", 80, seed=31)
    relu = _sae(name, mid, "resid_mid", "relu", 64, seed=32)
    # features that fire on some of the prompt tokens of both models; every JumpReLU
    # pre-activation the edits read (feature 8; all 80 for the full replace) stays >= 1e-3
    # from its threshold on the prompt tokens (checked when written: the pre-activations
    # are O(1), float32 rounding moves them by ~1e-6), so no latent flips across the jump
    single = feature_pair(jump, 8, "set", 4.0)
    joint = feature_pair(relu, [1, 3, 4], "add", [3.0, -2.0, 4.0])
    keep = replace_pair(relu, [(9, "set", 5.0), (0, "scale", 3.0)], keep_error=True)
    swap = replace_pair(jump, {2: 3.0}, keep_error=False)
    assert single[0].fused and joint[0].fused
    sets = [([single[0]], [0]), ([joint[0], single[0]], [1]), ([keep[0], swap[0]], [2])]
    out = run_fasteer(name, sets)
    ref = run_reference(name, [[single[1]], [joint[1], single[1]], [keep[1], swap[1]], []],
                        sae=True)
    check(name, out, ref, steered_rows=[0, 1, 2], unsteered_rows=[3])


@pytest.mark.parametrize("name", NAMES)
def test_clear_and_unpatch_are_bit_identical(name):
    """Steer (vectors and SAE stages, per row), then ``clear()``: the carriers stay installed
    with nothing to do and call the model's own forwards; then ``unpatch()``. Both give
    logits and greedy tokens (dynamic and static cache) bit-identical to before."""
    model, tok = load(name)
    ids, mask = _batch(name)
    _, mid, last = _layers(model)
    before = _run(model, tok, ids, mask, CACHES)
    relu = _sae(name, mid, "resid_post", "relu", 64, seed=41)
    st = fs.patch(model)
    try:
        st.set(fs.Add(_sized(name, "resid_pre", [mid, last], seed=42), 2.0,
                      layers=[mid, last], site="resid_pre"),
               fs.SAEReplace(relu, {4: 3.0}, keep_error=True))
        u, value = _sized(name, "resid_mid", [mid], seed=43), 2.0 * _norm(name, "resid_mid", mid)
        st.set(fs.Clamp(u, value, layers=[mid], site="resid_mid"),
               fs.FeatureEdit(relu, [1, 2], "set", 3.0), rows=[1])
        steered = _run(model, tok, ids, mask, CACHES)
        assert float((steered[0] - before[0]).abs().max()) > MIN_EFFECT
        assert not torch.equal(steered[1]["dynamic"], before[1]["dynamic"])
        st.clear()
        cleared = _run(model, tok, ids, mask, CACHES)
    finally:
        st.unpatch()
    after = _run(model, tok, ids, mask, CACHES)
    for what, got in (("clear", cleared), ("unpatch", after)):
        assert torch.equal(got[0], before[0]), f"{name}: logits after {what} are not bit-identical"
        for c in CACHES:
            assert torch.equal(got[1][c], before[1][c]), f"{name}: tokens ({c}) after {what} differ"
