"""The carrier probe for model types not in the table (issue 21, `fasteer.carrier_probe`).

* An unknown-type Llama clone (``config.model_type = "my_llama"``) gets Llama's fused norm
  carriers through the probe, with logits and greedy generate equal to the hook reference.
* A deliberately wrong carrier shape (resid_pre at ``post_attention_layernorm``, a norm
  reading another point) is rejected by the probe: the next shape is tried, else hooks.
* The verdict is cached per (model class, model type, layer path), reported once as a warning and on
  ``sites.verdict``; the probe leaves the model as it was; ``FASTEER_PROBE=0`` turns it off.
"""
import warnings

import pytest
import torch

import fasteer as fs
import fasteer.sites as sites_mod
from fasteer import carrier_probe
from fasteer.sites import RMS_LLAMA, ArchSpec, _norm, model_sites
from hook_reference import (assert_same, fasteer_outputs, one_thread, pair,  # noqa: F401
                            plain_outputs, prompt_batch, random_vectors, reference_outputs,
                            tiny_model)

D, N = 32, 3


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(sites_mod, "_warned_types", set())
    monkeypatch.setattr(carrier_probe, "ENABLED", True)
    carrier_probe.clear_cache()
    yield
    carrier_probe.clear_cache()


def _clone(model_type: str, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    model.config.model_type = model_type
    return model


_WRONG = ArchSpec("wrong", _norm("post_attention_layernorm", RMS_LLAMA), None,
                  _norm("norm", RMS_LLAMA))


def _table_with(monkeypatch, *entries):
    """The table as the probe sees it: only ``entries`` (name, builder), in order."""
    monkeypatch.setattr(sites_mod, "ARCHITECTURES", dict(entries))


def _ivs():
    v = random_vectors(range(N), D, seed=5, scale=2.0)
    return [pair("add", [0, 2], vectors=v, value=3.0),                   # resid_post, last too
            pair("clamp", [1], site="resid_pre", vectors=v, value=2.0),
            pair("scale", [2], site="resid_pre", value=0.7),
            pair("add", [0], site="resid_pre", vectors=v, value=-1.5, positions="prompt")]


def _equal_to_reference(model):
    ids, mask = prompt_batch(3, 7, "left", seed=1)
    ivs = _ivs()
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask)
    ref = reference_outputs(model, "llama", [[b for _, b in ivs]] * 3, ids, mask)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())
    assert float((out[0] - plain[0]).abs().max()) > 1e-2


def test_unknown_llama_clone_gets_fused_carriers_through_the_probe():
    model = _clone("my_llama")
    # the first table row of Llama's shape names it: 'llama' (or another Llama-like row,
    # when a test has reordered the table)
    with pytest.warns(UserWarning, match=r"model type 'my_llama' is not in fasteer\.sites\."
                                         r"ARCHITECTURES; a probe forward matched the '\w+' "
                                         r"carrier shape \(resid_pre: norm input_layernorm, "
                                         r"final: norm norm\)"):
        sites = model_sites(model)
    assert sites.source == "probe" and not sites.is_fallback
    assert "max diff" in sites.verdict and "resid_mid, attn_out and mlp_out unavailable" \
        in sites.verdict
    layers = model.model.layers
    for l in range(N):
        pt = sites.points[("pre", l)]
        assert pt.kind == "norm" and pt.module is layers[l].input_layernorm
    assert sites.points[("pre", N)].module is model.model.norm
    assert set(sites.points) == {("pre", l) for l in range(N + 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # one warning per model type
        with fs.patch(model) as st:
            assert st.sites.source == "probe"
            assert {c.point.kind for c in st.carriers.values()} == {"norm"}
            for site in ("resid_mid", "attn_out", "mlp_out"):
                with pytest.raises(ValueError, match=f"'{site}' is not supported"):
                    st.set(fs.Add(torch.ones(D), 1.0, layers=[0], site=site))
        _equal_to_reference(model)


def test_probe_rejects_a_wrong_carrier_shape_and_falls_back_to_hooks(monkeypatch):
    # resid_pre at post_attention_layernorm: a real RMSNorm of the right flavour, so the
    # shape resolves -- but it reads the point after attention, which the probe must see
    _table_with(monkeypatch, ("wrong_llama", lambda config: _WRONG))
    model = _clone("my_llama_wrong")
    with pytest.warns(UserWarning, match=r"no table carrier shape passed the probe "
                                         r"\(wrong_llama: probe failed, max diff"):
        sites = model_sites(model)
    assert sites.is_fallback and sites.source == "hooks"
    assert "steering through forward hooks" in sites.verdict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fs.patch(model) as st:
            assert {c.point.kind for c in st.carriers.values()} == {"input", "output"}
        _equal_to_reference(model)


def test_probe_tries_the_shapes_in_order(monkeypatch):
    right = sites_mod.ARCHITECTURES["llama"]
    _table_with(monkeypatch, ("wrong_llama", lambda config: _WRONG), ("llama", right))
    model = _clone("my_llama_second")
    sites = _quiet(model_sites, model)
    assert sites.source == "probe" and "matched the 'llama' carrier shape" in sites.verdict
    assert sites.points[("pre", 0)].module is model.model.layers[0].input_layernorm


def test_shapes_that_do_not_fit_are_not_run(monkeypatch):
    model = _clone("my_llama_nofit")
    for layer in model.model.layers:                 # no norm is an RMSNorm any more
        layer.input_layernorm = torch.nn.LayerNorm(D)
    calls = []
    real = carrier_probe._Probe.check
    monkeypatch.setattr(carrier_probe._Probe, "check",
                        lambda self, s: calls.append(s.spec.name) or real(self, s))
    sites = _quiet(model_sites, model)
    # llama's shape needs an RMSNorm, gpt2's ln_1, gpt_neox's final_layer_norm, falcon's
    # ln_f: none of them reaches a forward. A shape that carries resid_pre by input hooks
    # (olmo2's) fits, runs, and is right
    assert calls and not any(c.startswith(("llama", "gpt2", "gpt_neox", "falcon"))
                             for c in calls), calls
    assert sites.source == "probe" and sites.points[("pre", 0)].kind == "input"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_verdict_is_cached_per_class_and_type(monkeypatch):
    model = _clone("my_llama_cached")
    first = _quiet(model_sites, model)
    assert first.source == "probe"

    def boom(*a, **k):
        raise AssertionError("probed again")
    monkeypatch.setattr(carrier_probe, "_Probe", boom)
    other = _clone("my_llama_cached", seed=2)            # same class and type: cached
    again = _quiet(model_sites, other)
    assert again.source == "probe" and again.verdict == first.verdict
    assert again.points[("pre", 0)].module is other.model.layers[0].input_layernorm
    carrier_probe.clear_cache()
    with pytest.raises(AssertionError, match="probed again"):
        _quiet(model_sites, other)


def test_patched_model_reuses_its_verdict(monkeypatch):
    model = _clone("my_llama_patched")
    with _quiet(fs.patch, model) as st:
        carrier_probe.clear_cache()
        monkeypatch.setattr(carrier_probe, "_Probe", None)      # must not run
        again = _quiet(model_sites, model)
        assert again.spec is st.sites.spec and again.source == "probe"


def test_probe_leaves_the_model_as_it_was():
    model = _clone("my_llama_clean")
    model.train()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    _quiet(model_sites, model)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "generate" not in model.__dict__
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_probe_off_means_hooks(monkeypatch):
    monkeypatch.setattr(carrier_probe, "ENABLED", False)
    model = _clone("my_llama_off")
    with pytest.warns(UserWarning, match="the carrier probe is off"):
        sites = model_sites(model)
    assert sites.is_fallback


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_accepts_half_precision(dtype):
    model = tiny_model("llama", seed=0, dtype=dtype)
    model.config.model_type = f"my_llama_{dtype}".replace("torch.", "")
    sites = _quiet(model_sites, model)
    assert sites.source == "probe", sites.verdict
