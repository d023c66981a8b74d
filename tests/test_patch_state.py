"""The patch layer's state and bounds: dtype of the stream, row indices, edit magnitudes,
Cosine conditions, SAE provenance. Each is refused with an error naming the argument
before any op runs or any buffer is allocated."""
import warnings

import pytest
import torch

import fasteer as fs
import importlib
from hook_reference import cached_model, one_thread, prompt_batch, tiny_model  # noqa: F401
from sae_reference import random_sae

D = 32
MAX_ROW = 2 ** 20 - 1          # documented bound of rows= (fasteer.patch.MAX_ROW)


def _vec(seed=0, scale=1.0):
    return scale * torch.randn(D, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("armed", [False, True])
def test_a_model_converted_to_float64_after_patch_raises_naming_the_dtype(armed):
    model = tiny_model("llama")
    st = fs.patch(model, always_armed=armed)
    st.set(fs.Add(_vec(), 2.0, layers=[1]))
    ids, mask = prompt_batch(2, 5, "left")
    model.to(torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match=r"torch\.float64.*float32.*bfloat16.*"
                                                          r"float16.*after fasteer.patch"):
        model(input_ids=ids, attention_mask=mask)
    # converted back, it runs again (and nothing was left half-held)
    model.to(torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
    st.unpatch()


# --------------------------------------------------------------------------- rows

@pytest.mark.parametrize("row", [MAX_ROW + 1, 50_000_000, 10 ** 12])
def test_row_indices_beyond_the_bound_are_refused_before_allocating(row):
    model = cached_model("llama")
    with fs.patch(model) as st:
        st.set(fs.Add(_vec(), 2.0, layers=[1]), rows=[0])
        routing = st.metadata.routing
        before = (routing.rows.data_ptr(), routing.rows.numel())
        with pytest.raises(ValueError, match=r"rows: expected batch row indices <= 1048575"):
            st.set(fs.Add(_vec(), 2.0, layers=[1]), rows=[row])
        with pytest.raises(ValueError, match=r"rows: expected batch row indices <= 1048575"):
            st.set_many([(fs.Scale(2.0), [1, row])])
        assert (routing.rows.data_ptr(), routing.rows.numel()) == before
        assert [r.rows for r in st.requests] == [(0,)]


def test_the_largest_row_index_is_accepted():
    assert getattr(importlib.import_module("fasteer.patch"), "MAX_ROW", None) == MAX_ROW
    with fs.patch(cached_model("llama")) as st:
        st.set(fs.Add(_vec(), 2.0, layers=[1]), rows=[MAX_ROW])
        assert st.metadata.routing.max_named_row >= MAX_ROW


# --------------------------------------------------------------------------- magnitudes

@pytest.mark.parametrize("make, match", [
    (lambda: fs.Add(torch.ones(D), 3e38, layers=[0]), r"alpha: \|alpha\| \* max\|vector\| is 3e\+38"),
    (lambda: fs.Add(torch.ones(D), -2e15, layers=[0]), r"alpha: .* is 2e\+15"),
    (lambda: fs.Add(_vec(scale=1e10), 1e6, layers=[0]), r"alpha: .*beyond the 1e\+15"),
    (lambda: fs.Add({0: torch.ones(D), 1: torch.full((D,), 1e12)}, 1e4), "alpha"),
    (lambda: fs.Clamp(torch.ones(D), 1e20, layers=[0]), r"value: \|value\| is 1e\+20"),
    (lambda: fs.Clamp(torch.ones(D), {0: 1.0, 1: -3e38}), r"value\[1\]: \|value\|"),
    (lambda: fs.Scale(1e20), r"factor: \|factor\| is 1e\+20"),
    (lambda: fs.Scale(-3e38, layers=[0]), r"factor"),
])
def test_edits_that_would_overflow_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_large_but_bounded_edits_are_accepted_and_stay_finite():
    model = cached_model("llama")
    ids, mask = prompt_batch(2, 5, "left")
    with fs.patch(model) as st:
        st.set(fs.Add(torch.ones(D), 1e14, layers=[1]), fs.Scale(1e3, layers=[2]))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all()


def test_sae_feature_values_are_bounded():
    sae = random_sae(D, 20, "relu", seed=3, layer=1)
    for kw in (dict(op="add", value=3e38), dict(op="set", value=[1.0, 2e16]),
               dict(op="clamp", value=(1e20, None))):
        with pytest.raises(ValueError, match=r"(value|hi): .*beyond the 1e\+15"):
            fs.FeatureEdit(sae, [1, 2] if isinstance(kw["value"], list) else 1, **kw)
    fs.FeatureEdit(sae, 1, "clamp", (None, 5.0))          # "no bound" is still fine


# --------------------------------------------------------------------------- Cosine

@pytest.mark.parametrize("vector", [torch.zeros(D), {0: torch.ones(D), 1: torch.zeros(D)},
                                    torch.full((D,), 1e-30)])
def test_cosine_with_a_zero_vector_is_refused(vector):
    with pytest.raises(ValueError, match="when.vector: a Cosine condition's vector is zero"):
        fs.Cosine(vector, 0.1)
    fs.Projection(vector, 0.1)        # h . 0 + bias is well defined


# --------------------------------------------------------------------------- SAE placement

def test_sae_at_another_layer_or_site_is_an_error_unless_allowed():
    sae = random_sae(D, 20, "relu", seed=4, layer=1, site="resid_post")
    for make in (lambda **kw: fs.FeatureEdit(sae, 1, "set", 1.0, layers=[2], **kw),
                 lambda **kw: fs.FeatureEdit(sae, 1, "set", 1.0, site="resid_mid", **kw),
                 lambda **kw: fs.SAEReplace(sae, {1: 1.0}, layers=[0, 1], **kw)):
        with pytest.raises(ValueError, match=r"trained at resid_post\[1\] but is applied at "
                                             r".*allow_other_site=True"):
            make()
        with pytest.warns(UserWarning, match=r"trained at resid_post\[1\]"):
            make(allow_other_site=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs.FeatureEdit(sae, 1, "set", 1.0, layers=[2], site="resid_pre")   # the same point
    layer_only = random_sae(D, 20, "relu", seed=5, layer=1, site=None)
    with pytest.raises(ValueError, match=r"trained at layer 1 but is applied at layers \[2\]"):
        fs.FeatureEdit(layer_only, 1, "set", 1.0, layers=[2])
