"""fasteer.sae.SAE: construction checks, encode/decode math against a float64 transcription of
the formula, the folded per-feature encoder/decoder, conversions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fasteer.sae import SAE
from fasteer.sae.formats.hooks import parse_hook_name

D, F = 37, 101  # odd sizes on purpose


def weights(seed: int, d: int = D, f: int = F) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, f, generator=g) / d**0.5,
        "b_enc": torch.randn(f, generator=g) * 0.3,
        "W_dec": torch.randn(f, d, generator=g) / f**0.5,
        "b_dec": torch.randn(d, generator=g),
    }


def make(seed: int = 0, activation: str = "relu", **kw) -> SAE:
    w = weights(seed)
    if activation == "jumprelu" and "threshold" not in kw:
        # thresholds on both sides of 0: a negative threshold must behave like plain ReLU
        kw["threshold"] = torch.randn(F, generator=torch.Generator().manual_seed(seed + 1)) * 0.5
    if activation == "topk" and "k" not in kw:
        kw["k"] = 7
    return SAE(**w, activation=activation, **kw)


def reference_encode(sae: SAE, h: np.ndarray) -> np.ndarray:
    """The formula, written independently in float64 numpy."""
    W_enc = sae.W_enc.double().numpy()
    b_enc = sae.b_enc.double().numpy()
    b_dec = sae.b_dec.double().numpy()
    x = h.astype(np.float64)
    if sae.normalize_activations == "expected_average_only_in":
        x = x * sae.norm_scaling_factor
    if sae.apply_b_dec_to_input:
        x = x - b_dec
    pre = x @ W_enc + b_enc
    if sae.activation == "relu":
        return np.maximum(pre, 0)
    if sae.activation == "jumprelu":
        thr = sae.threshold.double().numpy()
        return np.where(pre > thr, np.maximum(pre, 0), 0.0)
    if sae.activation == "topk":
        out = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1)[..., : sae.k]
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return out
    return pre


def reference_decode(sae: SAE, z: np.ndarray) -> np.ndarray:
    out = z @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
    if sae.normalize_activations == "expected_average_only_in":
        out = out / sae.norm_scaling_factor
    return out


def inputs(seed: int, shape=(3, 5)) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


ALL = ["relu", "jumprelu", "topk", "linear"]


@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_encode_decode_match_the_formula_in_float64(activation, apply_b_dec, scale):
    norm = {} if scale is None else {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": scale}
    sae = make(3, activation, apply_b_dec_to_input=apply_b_dec, **norm).to(dtype=torch.float64)
    h = inputs(4).double()
    z = sae.encode(h)
    assert z.shape == (3, 5, F) and z.dtype == torch.float64
    np.testing.assert_allclose(z.numpy(), reference_encode(sae, h.numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sae.decode(z).numpy(), reference_decode(sae, z.numpy()), rtol=1e-12, atol=1e-12)
    if activation == "topk":
        assert int((z != 0).sum(-1).max()) <= sae.k
    if activation != "linear":
        assert (z >= 0).all()
    # the error term makes reconstruction exact
    torch.testing.assert_close(sae.forward(h) + sae.error(h), h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "linear"])
def test_float32_encode_close_to_float64(activation):
    sae = make(5, activation)
    h = inputs(6)
    z32 = sae.encode(h)
    z64 = reference_encode(sae, h.numpy())
    pre64 = reference_encode(SAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation="linear"), h.numpy())
    # entries whose pre-activation sits within rounding of the JumpReLU threshold may flip; skip them
    near = np.abs(pre64 - (sae.threshold.numpy() if activation == "jumprelu" else 0)) < 1e-4
    np.testing.assert_allclose(z32.numpy()[~near], z64[~near], rtol=1e-5, atol=1e-5)


def test_jumprelu_flags_and_threshold_matter():
    sae = make(7, "jumprelu")
    h = inputs(8)
    relu = SAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation="relu")
    assert not torch.allclose(sae.encode(h), relu.encode(h))  # positive thresholds cut features
    flipped = SAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation="jumprelu",
                  threshold=sae.threshold, apply_b_dec_to_input=False)
    assert not torch.allclose(sae.encode(h), flipped.encode(h), atol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "linear", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("scale", [None, 2.75])
def test_feature_encoder_folds_bdec_and_scale(activation, apply_b_dec, scale):
    norm = {} if scale is None else {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": scale}
    sae = make(11, activation, apply_b_dec_to_input=apply_b_dec, **norm).to(dtype=torch.float64)
    h = inputs(12, shape=(9,)).double()
    pre = sae.pre_activation(h)
    z = sae.encode(h)
    for k in (0, 17, F - 1):
        enc = sae.feature_encoder(k)
        assert enc.column.shape == (D,) and enc.bias.shape == () and enc.activation == activation
        pre_k = h @ enc.column + enc.bias  # one dot product on the raw residual
        torch.testing.assert_close(pre_k, pre[:, k], rtol=1e-12, atol=1e-12)
        if activation == "relu":
            torch.testing.assert_close(torch.relu(pre_k), z[:, k], rtol=1e-12, atol=1e-12)
        elif activation == "jumprelu":
            assert enc.threshold is not None and float(enc.threshold) == float(sae.threshold[k])
            zk = torch.relu(pre_k) * (pre_k > enc.threshold)
            torch.testing.assert_close(zk, z[:, k], rtol=1e-12, atol=1e-12)
        elif activation == "linear":
            torch.testing.assert_close(pre_k, z[:, k], rtol=1e-12, atol=1e-12)
        if activation != "jumprelu":
            assert enc.threshold is None
    # several features at once: [K, D] columns, [K] biases
    ids = [3, 50, 3, 99]
    many = sae.feature_encoder(ids)
    assert many.column.shape == (4, D) and many.bias.shape == (4,)
    torch.testing.assert_close(h @ many.column.T + many.bias, pre[:, ids], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.feature_encoder(torch.tensor(ids)).column, many.column)


def test_feature_encoder_float32_and_half_precision_outputs():
    sae = make(13, "jumprelu", normalize_activations="expected_average_only_in", norm_scaling_factor=0.5)
    h = inputs(14, shape=(6,))
    enc = sae.feature_encoder([1, 2, 3])
    assert enc.column.dtype == torch.float32
    torch.testing.assert_close(h @ enc.column.T + enc.bias, sae.pre_activation(h)[:, [1, 2, 3]], rtol=1e-5, atol=1e-5)
    half = sae.to(dtype=torch.bfloat16)
    assert half.feature_encoder(4).column.dtype == torch.float32  # fp32 for low-precision SAEs
    assert half.feature_decoder(4).dtype == torch.float32
    assert sae.feature_encoder(4, dtype=torch.float64).bias.dtype == torch.float64


@pytest.mark.parametrize("scale", [None, 0.61])
def test_feature_decoder_is_the_change_per_unit_of_z(scale):
    norm = {} if scale is None else {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": scale}
    sae = make(15, "relu", **norm).to(dtype=torch.float64)
    z = sae.encode(inputs(16, shape=(4,)).double())
    for k, dz in ((5, 2.5), (77, -1.25)):
        z2 = z.clone()
        z2[:, k] += dz
        delta = sae.decode(z2) - sae.decode(z)
        expected = dz * sae.feature_decoder(k)
        torch.testing.assert_close(delta, expected.expand_as(delta), rtol=1e-10, atol=1e-12)
    rows = sae.feature_decoder([5, 77])
    assert rows.shape == (2, D)
    torch.testing.assert_close(rows * sae.input_scale, sae.W_dec[[5, 77]])


def test_feature_ids_are_checked():
    sae = make(17)
    for bad in (-1, F, [0, F], torch.tensor([F + 3])):
        with pytest.raises(ValueError, match="feature.*d_sae = 101"):
            sae.feature_encoder(bad)
    with pytest.raises(ValueError, match="feature"):
        sae.feature_decoder(F)
    for bad in (1.5, "3", True, [1, 2.0], torch.tensor([1.0])):
        with pytest.raises(TypeError, match="feature"):
            sae.feature_encoder(bad)


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(name, bad):
    w = weights(19)
    w["threshold"] = torch.zeros(F)
    w[name] = w[name].clone()
    w[name].view(-1)[7] = bad
    with pytest.raises(ValueError, match=f"^{name}: contains 1 NaN/inf"):
        SAE(**w, activation="jumprelu")


def test_overflow_when_casting_to_half_is_caught():
    w = weights(20)
    w["W_dec"] = w["W_dec"].clone()
    w["W_dec"][0, 0] = 1e6
    with pytest.raises(ValueError, match="W_dec: contains"):
        SAE(**w, dtype=torch.float16)


def test_shapes_are_checked():
    w = weights(21)
    with pytest.raises(ValueError, match="W_dec.*looks transposed"):
        SAE(w["W_enc"], w["b_enc"], w["W_dec"].T, w["b_dec"])
    with pytest.raises(ValueError, match="b_enc.*W_enc stored transposed"):
        SAE(w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"])
    with pytest.raises(ValueError, match=r"b_dec: expected shape \[d_in\] = \[37\]"):
        SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"][:-1])
    with pytest.raises(ValueError, match="W_enc: expected a 2-D"):
        SAE(w["W_enc"][0], w["b_enc"], w["W_dec"], w["b_dec"])
    with pytest.raises(ValueError, match="threshold: expected shape"):
        SAE(**w, activation="jumprelu", threshold=torch.zeros(F - 1))
    with pytest.raises(TypeError, match="W_enc: expected a floating"):
        SAE(w["W_enc"].long(), w["b_enc"], w["W_dec"], w["b_dec"])
    with pytest.raises(TypeError, match="b_dec: expected a torch.Tensor"):
        SAE(w["W_enc"], w["b_enc"], w["W_dec"], [0.0] * D)


def test_activation_parameters_are_checked():
    w = weights(22)
    with pytest.raises(ValueError, match="activation: unknown 'gelu'"):
        SAE(**w, activation="gelu")
    with pytest.raises(ValueError, match="threshold: a JumpReLU SAE needs"):
        SAE(**w, activation="jumprelu")
    with pytest.raises(ValueError, match="threshold: only a JumpReLU"):
        SAE(**w, activation="relu", threshold=torch.zeros(F))
    for k in (0, F + 1, -3):
        with pytest.raises(ValueError, match=r"k: expected 1 <= k <= d_sae = 101"):
            SAE(**w, activation="topk", k=k)
    for k in (None, 2.5, True):
        with pytest.raises(TypeError, match="k: a TopK SAE needs an integer"):
            SAE(**w, activation="topk", k=k)
    with pytest.raises(ValueError, match="k: only a TopK"):
        SAE(**w, activation="relu", k=3)
    assert SAE(**w, activation="topk", k=F).k == F


def test_normalizations_are_checked():
    w = weights(23)
    for unsupported in ("layer_norm", "constant_norm_rescale"):
        with pytest.raises(ValueError, match=f"normalize_activations: '{unsupported}' is not supported"):
            SAE(**w, normalize_activations=unsupported)
    with pytest.raises(ValueError, match="normalize_activations: unknown"):
        SAE(**w, normalize_activations="whiten")
    with pytest.raises(ValueError, match="norm_scaling_factor: .*needs the scale"):
        SAE(**w, normalize_activations="expected_average_only_in")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="norm_scaling_factor"):
            SAE(**w, normalize_activations="expected_average_only_in", norm_scaling_factor=bad)
    with pytest.raises(ValueError, match="norm_scaling_factor: only used"):
        SAE(**w, norm_scaling_factor=2.0)
    assert SAE(**w, normalize_activations=None).normalize_activations == "none"


def test_provenance_is_checked_and_parsed():
    w = weights(24)
    sae = SAE(**w, hook_name="blocks.4.hook_resid_mid", model_name="gpt2")
    assert (sae.layer, sae.site, sae.hook_name) == (4, "resid_mid", "blocks.4.hook_resid_mid")
    explicit = SAE(**w, hook_name="blocks.4.hook_resid_mid", layer=4, site=None)
    assert explicit.site is None  # explicit values are not overridden by parsing
    with pytest.raises(ValueError, match="site: expected one of"):
        SAE(**w, layer=2, site="mlp_out")
    with pytest.raises(ValueError, match="site: 'resid_post' needs a layer"):
        SAE(**w, site="resid_post")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="layer"):
            SAE(**w, layer=bad)
    with pytest.raises(TypeError, match="metadata: expected JSON"):
        SAE(**w, metadata={"x": object()})
    with pytest.raises(TypeError, match="hook_name"):
        SAE(**w, hook_name=5)


@pytest.mark.parametrize(
    "hook,expected",
    [
        ("blocks.8.hook_resid_pre", (8, "resid_pre")),
        ("blocks.0.hook_resid_mid", (0, "resid_mid")),
        ("blocks.11.hook_resid_post", (11, "resid_post")),
        ("blocks.3.hook_mlp_out", (3, None)),
        ("blocks.3.attn.hook_z", (3, None)),
        ("blocks.5.ln2.hook_normalized", (5, None)),
        ("hook_embed", (None, None)),
        ("layers.6", (6, "resid_post")),
        ("h.6", (6, "resid_post")),
        ("model.layers.12", (12, "resid_post")),
        ("gpt_neox.layers.2", (2, "resid_post")),
        ("layers.6.mlp", (6, None)),
        ("layers.6.self_attn", (6, None)),
        ("embed_tokens", (None, None)),
        ("layer_20/width_16k/average_l0_71", (20, None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_hook_names(hook, expected):
    assert parse_hook_name(hook) == expected


def test_inputs_are_checked():
    sae = make(25)
    with pytest.raises(ValueError, match=r"h: expected last dimension d_in = 37"):
        sae.encode(torch.randn(4, D + 1))
    with pytest.raises(TypeError, match="h: expected a floating"):
        sae.encode(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(TypeError, match="h: expected a torch.Tensor"):
        sae.encode(np.zeros((4, D)))
    with pytest.raises(ValueError, match=r"z: expected last dimension d_sae = 101"):
        sae.decode(torch.randn(4, D))
    with pytest.raises(ValueError, match="h: is on meta but the SAE is on cpu"):
        sae.encode(torch.empty(2, D, device="meta"))


def test_input_is_cast_to_the_sae_dtype_like_saelens():
    sae = make(26, "relu")
    h = inputs(27).double()
    z = sae.encode(h)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, sae.encode(h.float()), rtol=0, atol=0)


def test_to_and_fold_normalization():
    sae = make(28, "jumprelu", normalize_activations="expected_average_only_in", norm_scaling_factor=1.7,
               hook_name="blocks.2.hook_resid_post", model_name="m", metadata={"a": 1})
    assert sae.to() is sae and sae.to(dtype=torch.float32) is sae
    wide = sae.to(dtype=torch.float64)
    assert wide.dtype == torch.float64 and (wide.layer, wide.site, wide.metadata) == (2, "resid_post", {"a": 1})
    assert torch.equal(wide.W_enc.float(), sae.W_enc)
    assert sae.to(torch.float64).dtype == torch.float64  # sae.to(dtype) like Module.to
    folded = wide.fold_normalization()
    assert folded.normalize_activations == "none" and folded.norm_scaling_factor is None
    h = inputs(29).double()
    torch.testing.assert_close(folded.encode(h), wide.encode(h), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(folded.forward(h), wide.forward(h), rtol=1e-10, atol=1e-10)
    assert make(30).fold_normalization().normalize_activations == "none"


def test_state_dict_and_repr():
    sae = make(31, "topk", hook_name="layers.3")
    assert set(sae.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert set(make(31, "jumprelu").state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    text = repr(sae)
    assert "d_in=37" in text and "d_sae=101" in text and "k=7" in text and "resid_post[3]" in text
    json.dumps(sae.metadata)
