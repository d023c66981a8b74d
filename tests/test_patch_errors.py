"""Bad input: clear errors naming the argument, raised before anything changes.

A failed `set` leaves the previous steering in effect, bit for bit; a failed `steer`
leaves the model unpatched.
"""
import pytest
import torch

import fasteer as fs
from hook_reference import cached_model, one_thread, prompt_batch  # noqa: F401 (autouse)

D = 32


@pytest.fixture
def steerer():
    st = fs.patch(cached_model("llama"))
    yield st
    st.unpatch()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


BAD_INTERVENTIONS = [
    (lambda: fs.Add(torch.ones(D + 1), 1.0, layers=[0]), ValueError, "width 32"),
    (lambda: fs.Add({0: torch.ones(D), 1: torch.ones(D - 1)}), ValueError, "width"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[3]), ValueError, r"layers: \[3\] out of range 0..2"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[-1]), ValueError, "layers: expected layer indices >= 0"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[1, 1]), ValueError, "distinct"),
    (lambda: fs.Add(torch.ones(D), 1.0), ValueError, "layers: required"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_middle"), ValueError, "site: expected one of"),
    (lambda: fs.Add(torch.full((D,), float("nan")), 1.0, layers=[0]), ValueError, "NaN"),
    (lambda: fs.Add(torch.ones(D), float("inf"), layers=[0]), ValueError, "alpha: expected a finite"),
    (lambda: fs.Add(torch.ones(D), "big", layers=[0]), TypeError, "alpha: expected a real number"),
    # a [D, 2] matrix reads as 32 per-position vectors of width 2: refused for its width
    (lambda: fs.Add(torch.ones(D, 2), 1.0, layers=[0]), ValueError, "expected width 32"),
    (lambda: fs.Add(torch.ones(2, 2, D), 1.0, layers=[0]), ValueError, "1-D vector"),
    (lambda: fs.Add([1.0] * D, 1.0, layers=[0]), TypeError, "vector: expected a tensor"),
    (lambda: fs.Clamp(torch.zeros(D), 1.0, layers=[0]), ValueError, "zero norm"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[0], positions="decode"), ValueError, "positions: expected one of"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[0], positions=torch.rand(2, 3)), TypeError, "positions: expected a bool"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[0], when="cos>0"), TypeError, "when: expected a fasteer condition"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[1], when=fs.Cosine({0: torch.ones(D)}, 0.1)), ValueError, "when.vector: has no vector for layer 1"),
    (lambda: fs.Cosine(torch.ones(D), 1.5), ValueError, r"when.threshold: .*\[-1, 1\]"),
    (lambda: fs.Scale(float("nan")), ValueError, "factor"),
    (lambda: fs.Add(torch.ones(D), 3e38, layers=[0]), ValueError, r"alpha: \|alpha\| \* max\|vector\|"),
    (lambda: fs.Clamp(torch.ones(D), 1e20, layers=[0]), ValueError, r"value: \|value\| is 1e\+20"),
    (lambda: fs.Scale(1e20), ValueError, r"factor: \|factor\|"),
    (lambda: fs.Add(torch.ones(D), 1.0, layers=[0], when=fs.Cosine(torch.zeros(D), 0.1)), ValueError, "when.vector: a Cosine condition's vector is zero"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INTERVENTIONS)
def test_bad_intervention_is_refused_and_changes_nothing(steerer, make, exc, match):
    model = steerer.model
    ids, mask = prompt_batch(3, 7, "left")
    good = fs.Add(torch.randn(D, generator=torch.Generator().manual_seed(0)), 3.0, layers=[0, 2])
    steerer.set(good)
    before = _logits(model, ids, mask)
    tables = {k: (c.tables.meta.clone(), c.tables.bank.clone()) for k, c in steerer.carriers.items()}
    with pytest.raises(exc, match=match):
        steerer.set(make())
    assert torch.equal(_logits(model, ids, mask), before)
    for k, c in steerer.carriers.items():
        assert torch.equal(c.tables.meta, tables[k][0]) and torch.equal(c.tables.bank, tables[k][1])


def test_bad_rows(steerer):
    iv = fs.Add(torch.ones(D), 1.0, layers=[0])
    with pytest.raises(ValueError, match="rows: expected row indices >= 0"):
        steerer.set(iv, rows=[-1])
    with pytest.raises(ValueError, match="rows: row indices must be distinct"):
        steerer.set(iv, rows=[0, 0])
    with pytest.raises(ValueError, match="rows: expected at least one row"):
        steerer.set(iv, rows=[])
    with pytest.raises(TypeError, match="rows: expected ints"):
        steerer.set(iv, rows=[0.5])
    with pytest.raises(ValueError, match="rows: expected batch row indices <= 1048575"):
        steerer.set(iv, rows=[10 ** 12])


def test_rows_longer_than_the_batch_fail_before_any_layer_runs(steerer):
    model = steerer.model
    ids, mask = prompt_batch(3, 7, "left")
    steerer.set(fs.Add(torch.ones(D), 1.0, layers=[0]), rows=[5])
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="rows: steering was set for row 5 but this batch has 3"):
            _logits(model, ids, mask)
    finally:
        handle.remove()
    assert not calls
    steerer.clear().set(fs.Add(torch.ones(D), 1.0, layers=[0]), rows=[2])   # fits: runs
    _logits(model, ids, mask)


def test_not_an_intervention(steerer):
    with pytest.raises(TypeError, match="interventions: expected fasteer interventions"):
        steerer.set(torch.ones(D))


def test_unsupported_site_for_parallel_blocks():
    model = cached_model("falcon_new")
    with pytest.raises(ValueError, match="resid_mid.*not supported.*parallel"):
        fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_mid"))
    with pytest.raises(ValueError, match="sites: .*resid_mid"):
        fs.patch(model, sites=["resid_mid"])
    fs.patch(model).unpatch()      # nothing was left installed


def test_patch_twice_is_an_error_never_double_steering(steerer):
    model = steerer.model
    with pytest.raises(ValueError, match="already patched"):
        fs.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        fs.patch(model.model)       # the base model of the same layers
    with pytest.raises(ValueError, match="already patched"):
        fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[0]))


def test_use_after_unpatch():
    st = fs.patch(cached_model("llama"))
    st.unpatch()
    st.unpatch()     # idempotent
    with pytest.raises(RuntimeError, match="unpatched"):
        st.set(fs.Add(torch.ones(D), 1.0, layers=[0]))


def test_bad_patch_arguments():
    model = cached_model("llama")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fs.patch("llama")
    with pytest.raises(ValueError, match="slots: expected a positive int"):
        fs.patch(model, slots=0)
    with pytest.raises(ValueError, match="sites: expected names from"):
        fs.patch(model, sites=["resid"])
    with pytest.raises(ValueError, match="model: cannot find the decoder layers"):
        fs.patch(torch.nn.Linear(3, 3))
    fs.patch(model).unpatch()


def test_site_not_installed():
    model = cached_model("llama")
    with fs.patch(model, sites=["resid_post"]) as st:
        with pytest.raises(ValueError, match="sites: no carrier installed"):
            st.set(fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_mid"))
        st.set(fs.Add(torch.ones(D), 1.0, layers=[0], site="resid_post"))
