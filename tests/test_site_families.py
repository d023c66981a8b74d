"""Family-specific checks of the issue-21 table entries (fasteer/site_families.py).

The generic checks (patched == forward-hook reference at every site, dynamic and static
cache) run for every family in test_patch_arch.py and test_patch_components.py; here:
* which carrier kind each family uses at each point (fused norms where the op computes
  the norm, input hooks where it cannot -- OLMo-1's weightless LayerNorm, OLMo-3's
  norm-free sublayer inputs);
* the parallel blocks (Phi-1/2, StableLM parallel, Cohere 1/2) reject resid_mid with a
  message naming the family;
* Granite: attn_out is the attention output *before* residual_multiplier, so Add(v, a)
  at attn_out[l] equals Add(v, a * residual_multiplier) at resid_mid[l];
* the multimodal wrappers (Gemma-3, Mistral-3) resolve to their text model's entry, and
  one whose text model is unknown falls back to layer hooks with a warning.
"""
import warnings

import pytest
import torch

import fasteer as fs
import fasteer.sites as sites_mod
from fasteer.site_families import FAMILIES
from fasteer.sites import ARCHITECTURES, model_sites
from hook_reference import (ARCHS, cached_model, one_thread, prompt_batch,  # noqa: F401
                            random_vectors, tiny_model)

D = 32

# arch -> (resid_pre, resid_mid (None: no such point), final) carrier kinds
KINDS = {
    "qwen2_moe": ("norm", "norm", "norm"),
    "phi": ("norm", None, "norm"),
    "stablelm_parallel": ("norm", None, "norm"),
    "stablelm_sequential": ("norm", "norm", "norm"),
    "cohere": ("norm", None, "norm"),
    "cohere2": ("norm", None, "norm"),
    "granite": ("norm", "norm", "norm"),
    "olmo": ("input", "input", "input"),
    "olmo3": ("input", "input", "norm"),
    "smollm3": ("norm", "norm", "norm"),
    "llama4_text": ("norm", "norm", "norm"),
    "glm4": ("norm", "norm", "norm"),
    "deepseek_v3": ("norm", "norm", "norm"),
    "gpt_oss": ("norm", "norm", "norm"),
    "mistral3": ("norm", "norm", "norm"),
    "gemma3": ("norm", "norm", "norm"),
}


def test_every_family_is_registered_and_tested():
    assert set(FAMILIES) <= set(ARCHITECTURES)
    tested = {ARCHS[a][0]().model_type for a in KINDS}
    # ministral / ministral3 share the Llama-like entry Mistral-3's text model uses
    assert set(FAMILIES) - tested == {"ministral", "ministral3"}


@pytest.mark.parametrize("arch", list(KINDS))
def test_carrier_kinds(arch):
    sites = model_sites(cached_model(arch))
    pre, mid, final = KINDS[arch]
    n = sites.n_layers
    for l in range(n):
        assert sites.points[("pre", l)].kind == pre
        if mid is None:
            assert ("mid", l) not in sites.points
        else:
            assert sites.points[("mid", l)].kind == mid
        assert sites.points[("attn", l)].kind == sites.points[("mlp", l)].kind == "output"
    assert sites.points[("pre", n)].kind == final


@pytest.mark.parametrize("arch,family", [("phi", "phi"), ("stablelm_parallel", "stablelm"),
                                         ("cohere", "cohere"), ("cohere2", "cohere2")])
def test_parallel_blocks_reject_resid_mid(arch, family):
    model = cached_model(arch)
    with pytest.raises(ValueError, match=f"resid_mid.*not supported for {family}.*"
                                         "no point after attention"):
        fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[1], site="resid_mid"))
    fs.patch(model).unpatch()          # the failed steer() left nothing installed


def _logits(model, iv, ids, mask):
    st = fs.steer(model, iv)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        st.unpatch()


def test_granite_attn_out_is_before_residual_multiplier():
    model = cached_model("granite")
    m = model.config.residual_multiplier
    assert m != 1.0
    ids, mask = prompt_batch(3, 7, "left")
    v = random_vectors([1], D, seed=3, scale=2.0)
    at_attn = _logits(model, fs.Add(v, 1.5, layers=[1], site="attn_out"), ids, mask)
    at_mid = _logits(model, fs.Add(v, 1.5 * m, layers=[1], site="resid_mid"), ids, mask)
    wrong = _logits(model, fs.Add(v, 1.5, layers=[1], site="resid_mid"), ids, mask)
    assert float((at_attn - at_mid).abs().max()) <= 1e-5
    assert float((at_attn - wrong).abs().max()) > 1e-2


@pytest.mark.parametrize("arch,text", [("gemma3", "gemma3_text"), ("mistral3", "mistral")])
def test_wrappers_use_the_text_models_entry(arch, text):
    model = cached_model(arch)
    sites = model_sites(model)
    assert not sites.is_fallback
    assert sites.spec.name == f"{arch} ({text})"
    assert sites.layers is model.model.language_model.layers
    assert sites.points[("pre", sites.n_layers)].module is model.model.language_model.norm


def test_wrapper_with_unknown_text_model_falls_back(monkeypatch):
    model = tiny_model("mistral3")                 # its own copy: the type is changed
    model.config.text_config.model_type = "unknown_text_xyz"
    monkeypatch.setattr(sites_mod, "_warned_types", set())
    with pytest.warns(UserWarning, match="unknown_text_xyz"):
        sites = model_sites(model)
    assert sites.is_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = prompt_batch(3, 7, "left")
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits
        steered = _logits(model, fs.Add(torch.ones(D) * 3, 2.0, layers=[1]), ids, mask)
    assert float((steered - plain).abs().max()) > 1e-2


@pytest.mark.parametrize("arch", list(KINDS))
def test_fused_norms_match_the_models_norm_in_bf16(arch):
    """The flavour (cast order, weight offset, mean subtraction) is each family's own: in
    bfloat16, rows the fused norms normalise without edits (steering only row 0) give
    bit-identical logits to the unpatched model. (fp32 cannot tell the cast orders apart;
    a wrong one, e.g. Llama's order for GPT-OSS's norm, differs here by ~3e-2.)"""
    model = tiny_model(arch, dtype=torch.bfloat16)
    ids, mask = prompt_batch(3, 7, "none")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    v = random_vectors([0, 1, 2], D, seed=7, scale=3.0)
    sites = ["resid_pre", "resid_post"] + (["resid_mid"] if KINDS[arch][1] else [])
    for site in sites:
        layer = 2 if site == "resid_post" else 1
        st = fs.steer(model, fs.Add(v, 2.0, layers=[layer], site=site), rows=[0])
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask).logits
        finally:
            st.unpatch()
        assert torch.equal(out[1:], plain[1:]), f"{site}: unedited rows changed"
        assert float((out[0] - plain[0]).abs().max()) > 1e-1, f"{site}: no steering effect"
