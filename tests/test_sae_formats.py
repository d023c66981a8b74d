"""SAE files in the real layouts of SAELens (v6 and pre-6 cfg), Gemma Scope and EleutherAI
sparsify, written here from random weights with odd sizes: shapes, orientation, flags,
site/layer, the math of each project against a float64 transcription, save -> load, bad files,
and the Hugging Face Hub path (with a stand-in for huggingface_hub: tests never go online)."""
from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fasteer.sae import SAE
from fasteer.sae.formats import hub as hub_module

D, F = 37, 101


def rand(seed: int, d: int = D, f: int = F) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.standard_normal((d, f)) / d**0.5).astype(np.float32),
        "b_enc": (rng.standard_normal(f) * 0.3).astype(np.float32),
        "W_dec": (rng.standard_normal((f, d)) / f**0.5).astype(np.float32),
        "b_dec": rng.standard_normal(d).astype(np.float32),
        "threshold": (rng.random(f) * 0.4 - 0.05).astype(np.float32),
    }


def inputs(seed: int, n: int = 23, d: int = D) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)) * 2 + 0.3).float()


def as_torch(w: dict[str, np.ndarray], names) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(w[name]) for name in names}


# ------------------------------------------------------------------ writers of the real layouts
def write_saelens_v6(folder: Path, w, *, architecture="standard", apply_b_dec=True, k=None,
                     hook_name="blocks.8.hook_resid_pre", normalize="none", extra_cfg=None,
                     tensor_names=("W_enc", "b_enc", "W_dec", "b_dec"), tensors=None) -> Path:
    """What SAELens 6.x `save_model` writes: SAEConfig.to_dict() + the module state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "d_in": len(w["b_dec"]), "d_sae": len(w["b_enc"]), "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalize,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1", "model_name": "gpt2",
            "hook_name": hook_name, "hook_head_index": None, "context_size": 128, "prepend_bos": True,
            "dataset_path": "apollo-research/roneneldan-TinyStories-tokenizer-gpt2", "model_from_pretrained_kwargs": {},
        },
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    cfg.update(extra_cfg or {})
    names = list(tensor_names) + (["threshold"] if architecture == "jumprelu" else [])
    save_file(tensors if tensors is not None else as_torch(w, names), str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_saelens_v5(folder: Path, w, *, activation_fn="relu", k=None, architecture="standard") -> Path:
    """A pre-6 SAELens cfg (flat keys, older key names hook_point / hook_point_layer)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": architecture, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
        "model_name": "pythia-70m-deduped", "hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2,
        "hook_point_head_index": None, "activation_fn_str": activation_fn,
        "activation_fn_kwargs": {"k": k} if k else {}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0", "prepend_bos": True,
        "dataset_path": "EleutherAI/the_pile_deduplicated", "context_size": 128,
        "normalize_activations": False, "neuronpedia_id": "pythia-70m-deduped/2-res-sm",
    }
    save_file(as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec")), str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_gemma_scope(root: Path, w, *, repo="gemma-scope-2b-pt-res", layer=5, transpose=False) -> Path:
    folder = root / repo / f"layer_{layer}" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    arrays = dict(w)
    if transpose:
        arrays["W_enc"] = arrays["W_enc"].T.copy()
    np.savez(folder / "params.npz", **arrays)
    return folder


def write_sparsify(run: Path, w, *, hookpoint="layers.6", k=7, cfg_extra=None, encoder_weight=None) -> Path:
    """What sparsify's `SparseCoder.save_to_disk` writes (safetensors.save_model + cfg.json)."""
    folder = run / hookpoint
    folder.mkdir(parents=True)
    d, f = len(w["b_dec"]), len(w["b_enc"])
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": f,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}
    cfg.update(cfg_extra or {})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "encoder.weight": torch.from_numpy(w["W_enc"].T.copy()) if encoder_weight is None else encoder_weight,
        "encoder.bias": torch.from_numpy(w["b_enc"]), "W_dec": torch.from_numpy(w["W_dec"]),
        "b_dec": torch.from_numpy(w["b_dec"]),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    if not (run / "config.json").exists():
        (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "ctx_len": 2048}))
    return folder


# ------------------------------------------------------------------ the projects' math, float64
def f64(w, name):
    return w[name].astype(np.float64)


def saelens_encode(w, x, *, arch, apply_b_dec=True, k=None, scale=None):
    x = x.astype(np.float64)
    if scale is not None:
        x = x * scale
    sae_in = x - f64(w, "b_dec") * apply_b_dec
    pre = sae_in @ f64(w, "W_enc") + f64(w, "b_enc")
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":  # SAELens 6: relu(pre) * (pre > relu(threshold))
        return np.maximum(pre, 0) * (pre > np.maximum(f64(w, "threshold"), 0))
    out = np.zeros_like(pre)  # topk: torch.topk then relu of the values
    idx = np.argsort(-pre, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


def gemma_encode(w, x):  # Gemma Scope tutorial
    pre = x.astype(np.float64) @ f64(w, "W_enc") + f64(w, "b_enc")
    return (pre > f64(w, "threshold")) * np.maximum(pre, 0)


def sparsify_encode(w, x, k):  # relu(linear(x - b_dec)) then topk, scattered densely
    pre = np.maximum((x.astype(np.float64) - f64(w, "b_dec")) @ f64(w, "W_enc") + f64(w, "b_enc"), 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return out


def decode_ref(w, z, scale=None):
    out = z @ f64(w, "W_dec") + f64(w, "b_dec")
    return out / scale if scale is not None else out


def close(a, b, tol=1e-10):
    return np.allclose(np.asarray(a, dtype=np.float64), b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("standard", False), ("jumprelu", False),
                                               ("jumprelu", True), ("topk", True)])
def test_saelens_v6_layout(tmp_path, arch, apply_b_dec):
    w = rand(1)
    folder = write_saelens_v6(tmp_path / "sae", w, architecture=arch, apply_b_dec=apply_b_dec,
                              k=9 if arch == "topk" else None)
    sae = SAE.load(folder)
    assert (sae.d_in, sae.d_sae, sae.dtype) == (D, F, torch.float32)
    assert sae.W_enc.shape == (D, F) and sae.W_dec.shape == (F, D)
    assert torch.equal(sae.W_enc, torch.from_numpy(w["W_enc"]))  # orientation kept, bits kept
    assert sae.apply_b_dec_to_input is apply_b_dec
    assert sae.activation == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert (sae.k == 9) if arch == "topk" else sae.k is None
    assert (sae.hook_name, sae.layer, sae.site, sae.model_name) == ("blocks.8.hook_resid_pre", 8, "resid_pre", "gpt2")
    assert sae.source_format == "saelens" and sae.source == str(folder)
    assert sae.metadata["context_size"] == 128 and sae.metadata["sae_lens_version"] == "6.5.1"

    wide = SAE.load(folder, dtype=torch.float64)
    x = inputs(2)
    z_ref = saelens_encode(w, x.numpy(), arch=arch, apply_b_dec=apply_b_dec, k=9)
    z = wide.encode(x.double())
    assert close(z, z_ref)
    assert close(wide.decode(z), decode_ref(w, z_ref))
    # float32 as loaded: same up to rounding
    assert np.allclose(sae.encode(x).numpy(), z_ref, atol=2e-5)


def test_saelens_misflagged_file_gives_different_latents(tmp_path):
    """A file whose apply_b_dec_to_input is flipped must not reproduce the true encoder."""
    w = rand(3)
    x = inputs(4).double()
    truth = saelens_encode(w, x.numpy(), arch="standard", apply_b_dec=True)
    good = SAE.load(write_saelens_v6(tmp_path / "good", w, apply_b_dec=True), dtype=torch.float64)
    bad = SAE.load(write_saelens_v6(tmp_path / "bad", w, apply_b_dec=False), dtype=torch.float64)
    assert close(good.encode(x), truth)
    assert not np.allclose(bad.encode(x).numpy(), truth, atol=1e-3)


def test_saelens_transposed_weights(tmp_path):
    w = rand(5)
    transposed = dict(w, W_enc=w["W_enc"].T.copy())
    with pytest.raises(ValueError, match=r"W_enc has shape \[101, 37\].*stored transposed"):
        SAE.load(write_saelens_v6(tmp_path / "t", transposed))
    w_dec_t = dict(w, W_dec=w["W_dec"].T.copy())
    with pytest.raises(ValueError, match=r"W_dec has shape \[37, 101\]"):
        SAE.load(write_saelens_v6(tmp_path / "t2", w_dec_t))
    # a square SAE cannot be caught by shape: a transposed encoder loads but encodes differently
    sq = rand(6, d=41, f=41)
    sq_t = dict(sq, W_enc=sq["W_enc"].T.copy())
    x = inputs(7, d=41).double()
    truth = saelens_encode(sq, x.numpy(), arch="standard")
    assert close(SAE.load(write_saelens_v6(tmp_path / "sq", sq), dtype=torch.float64).encode(x), truth)
    assert not np.allclose(SAE.load(write_saelens_v6(tmp_path / "sqt", sq_t), dtype=torch.float64).encode(x), truth, atol=1e-3)


def test_saelens_pre6_layout_topk_and_old_key_names(tmp_path):
    w = rand(8)
    sae = SAE.load(write_saelens_v5(tmp_path / "v5", w, activation_fn="topk", k=11), dtype=torch.float64)
    assert (sae.activation, sae.k, sae.layer, sae.site) == ("topk", 11, 2, "resid_post")
    assert sae.hook_name == "blocks.2.hook_resid_post" and sae.model_name == "pythia-70m-deduped"
    assert sae.normalize_activations == "none"  # bool False in the oldest files
    assert sae.metadata["neuronpedia_id"] == "pythia-70m-deduped/2-res-sm"
    x = inputs(9).double()
    assert close(sae.encode(x), saelens_encode(w, x.numpy(), arch="topk", k=11))
    relu = SAE.load(write_saelens_v5(tmp_path / "relu", w), dtype=torch.float64)
    assert relu.activation == "relu" and close(relu.encode(x), saelens_encode(w, x.numpy(), arch="standard"))


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path):
    w = rand(10)
    folder = write_saelens_v6(tmp_path / "s", w, architecture="topk", k=5,
                              extra_cfg={"rescale_acts_by_decoder_norm": True})
    sae = SAE.load(folder, dtype=torch.float64)
    x = inputs(11).double().numpy()
    norms = np.linalg.norm(f64(w, "W_dec"), axis=-1)
    pre = (x - f64(w, "b_dec")) @ f64(w, "W_enc") + f64(w, "b_enc")
    pre = pre * norms  # SAELens: hidden_pre * W_dec.norm(dim=-1) before topk
    z = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[:, :5]
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    out = (z / norms) @ f64(w, "W_dec") + f64(w, "b_dec")
    assert np.allclose(sae.encode(torch.from_numpy(x)).numpy(), z, rtol=1e-6, atol=1e-6)
    assert np.allclose(sae.forward(torch.from_numpy(x)).numpy(), out, rtol=1e-6, atol=1e-6)


def test_saelens_gated_is_loaded_as_the_equivalent_jumprelu(tmp_path):
    w = rand(12)
    rng = np.random.default_rng(13)
    gated = {"b_gate": (rng.standard_normal(F) * 0.3).astype(np.float32),
             "b_mag": (rng.standard_normal(F) * 0.3).astype(np.float32),
             "r_mag": (rng.standard_normal(F) * 0.5).astype(np.float32)}
    tensors = {**as_torch(w, ("W_enc", "W_dec", "b_dec")), **{k: torch.from_numpy(v) for k, v in gated.items()}}
    folder = write_saelens_v6(tmp_path / "g", w, architecture="gated", tensors=tensors)
    sae = SAE.load(folder, dtype=torch.float64)
    assert sae.activation == "jumprelu"
    x = inputs(14).double().numpy()
    sae_in = x - f64(w, "b_dec")
    gate = (sae_in @ f64(w, "W_enc") + gated["b_gate"]) > 0
    mag = np.maximum(sae_in @ (f64(w, "W_enc") * np.exp(gated["r_mag"].astype(np.float64))) + gated["b_mag"], 0)
    assert close(sae.encode(torch.from_numpy(x)), gate * mag, tol=1e-9)


def test_saelens_log_threshold_and_finetuning_scaling_factor(tmp_path):
    w = rand(15)
    w["threshold"] = np.abs(w["threshold"]) + 0.01
    tensors = as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec"))
    tensors["log_threshold"] = torch.from_numpy(np.log(w["threshold"]))
    fsf = (np.random.default_rng(16).random(F) + 0.5).astype(np.float32)
    tensors["finetuning_scaling_factor"] = torch.from_numpy(fsf)
    folder = write_saelens_v6(tmp_path / "l", w, architecture="jumprelu", tensors=tensors,
                              extra_cfg={"finetuning_scaling_factor": True})
    sae = SAE.load(folder, dtype=torch.float64)
    assert np.allclose(sae.threshold.numpy(), w["threshold"], rtol=1e-6)
    z = np.random.default_rng(17).random((4, F))
    assert close(sae.decode(torch.from_numpy(z)), (z * fsf) @ f64(w, "W_dec") + f64(w, "b_dec"), tol=1e-9)
    # SAELens refuses a non-trivial 'scaling_factor' when the cfg says there is none
    t2 = dict(tensors)
    t2["scaling_factor"] = t2.pop("finetuning_scaling_factor")
    with pytest.raises(ValueError, match="scaling_factor tensor but cfg.json says finetuning_scaling_factor is false"):
        SAE.load(write_saelens_v6(tmp_path / "l2", w, architecture="jumprelu", tensors=t2))


def test_saelens_expected_average_only_in_needs_its_scale(tmp_path):
    w = rand(18)
    folder = write_saelens_v6(tmp_path / "n", w, normalize="expected_average_only_in")
    with pytest.raises(ValueError, match="expected_average_only_in' but no scale"):
        SAE.load(folder)
    x = inputs(19).double()
    sae = SAE.load(folder, norm_scaling_factor=0.42, dtype=torch.float64)
    ref = saelens_encode(w, x.numpy(), arch="standard", scale=0.42)
    assert close(sae.encode(x), ref) and close(sae.decode(sae.encode(x)), decode_ref(w, ref, 0.42))
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.42}))
    assert SAE.load(folder).norm_scaling_factor == 0.42
    with pytest.raises(ValueError, match="norm_scaling_factor: .* says normalize_activations='none'"):
        SAE.load(write_saelens_v6(tmp_path / "plain", w), norm_scaling_factor=2.0)


@pytest.mark.parametrize("cfg_change,match", [
    ({"normalize_activations": "layer_norm"}, "'layer_norm' is not supported"),
    ({"normalize_activations": "constant_norm_rescale"}, "'constant_norm_rescale' is not supported"),
    ({"architecture": "matryoshka_whatever"}, "unknown architecture 'matryoshka_whatever'"),
    ({"architecture": "jumprelu_skip_transcoder"}, "not a sparse autoencoder"),
    ({"activation_fn_str": "tanh-relu"}, "activation function 'tanh-relu' is not supported"),
    ({"d_in": 38}, r"W_enc has shape \[37, 101\] but cfg.json says d_in=38"),
    ({"d_sae": 100}, "d_sae=100"),
    ({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input must be true or false"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"architecture": "topk", "k": None}, "needs k"),
])
def test_saelens_bad_cfg(tmp_path, cfg_change, match):
    folder = write_saelens_v6(tmp_path / "x", rand(20), extra_cfg=cfg_change)
    with pytest.raises(ValueError, match=match):
        SAE.load(folder)


def test_saelens_bad_files(tmp_path):
    w = rand(21)
    folder = write_saelens_v6(tmp_path / "ok", w)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "cfg.json").write_text((folder / "cfg.json").read_text())
    (tmp_path / "corrupt" / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        SAE.load(tmp_path / "corrupt")
    (folder / "cfg.json").write_text("{d_in: 3")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        SAE.load(folder)
    nan = dict(w)
    nan["W_dec"] = w["W_dec"].copy()
    nan["W_dec"][3, 4] = np.nan
    with pytest.raises(ValueError, match="W_dec: contains 1 NaN/inf"):
        SAE.load(write_saelens_v6(tmp_path / "nan", nan))
    extra = as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec"))
    extra["W_skip"] = torch.zeros(D, D)
    with pytest.raises(ValueError, match=r"unexpected tensors \['W_skip'\]"):
        SAE.load(write_saelens_v6(tmp_path / "skip", w, tensors=extra))
    missing = as_torch(w, ("W_enc", "W_dec", "b_dec"))
    with pytest.raises(ValueError, match="missing tensor 'b_enc'"):
        SAE.load(write_saelens_v6(tmp_path / "miss", w, tensors=missing))
    with pytest.raises(ValueError, match="needs a 'threshold'"):
        SAE.load(write_saelens_v6(tmp_path / "nothr", w, architecture="jumprelu",
                                  tensors=as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec"))))
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    (only_cfg / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has cfg.json but no weights file"):
        SAE.load(only_cfg)
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    save_file(as_torch(w, ("W_enc",)), str(no_cfg / "sae_weights.safetensors"))
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        SAE.load(no_cfg)


# ------------------------------------------------------------------ Gemma Scope
def test_gemma_scope_layout(tmp_path):
    w = rand(22)
    folder = write_gemma_scope(tmp_path, w, layer=5)
    for path in (folder, folder / "params.npz"):
        sae = SAE.load(path)
        assert (sae.d_in, sae.d_sae, sae.activation) == (D, F, "jumprelu")
        assert sae.apply_b_dec_to_input is False and sae.normalize_activations == "none"
        assert (sae.layer, sae.site, sae.hook_name) == (5, "resid_post", "blocks.5.hook_resid_post")
        assert sae.model_name == "google/gemma-2-2b" and sae.source_format == "gemma_scope"
        assert torch.equal(sae.threshold, torch.from_numpy(w["threshold"]))
    wide = SAE.load(folder, dtype=torch.float64)
    x = inputs(23).double()
    ref = gemma_encode(w, x.numpy())
    assert close(wide.encode(x), ref) and close(wide.decode(wide.encode(x)), decode_ref(w, ref))
    # the flag matters: the same weights with SAELens' default b_dec subtraction encode differently
    with_bdec = SAE(wide.W_enc, wide.b_enc, wide.W_dec, wide.b_dec, activation="jumprelu",
                    threshold=wide.threshold, apply_b_dec_to_input=True)
    assert not np.allclose(with_bdec.encode(x).numpy(), ref, atol=1e-3)


def test_gemma_scope_site_depends_on_the_repository(tmp_path):
    w = rand(24)
    mlp = SAE.load(write_gemma_scope(tmp_path, w, repo="gemma-scope-9b-it-mlp", layer=11))
    assert (mlp.layer, mlp.site, mlp.hook_name, mlp.model_name) == (11, None, "blocks.11.hook_mlp_out", "google/gemma-2-9b-it")
    att = SAE.load(write_gemma_scope(tmp_path, w, repo="gemma-scope-2b-pt-att", layer=3))
    assert (att.site, att.hook_name) == (None, "blocks.3.attn.hook_z")
    hf_cache = SAE.load(write_gemma_scope(tmp_path, w, repo="models--google--gemma-scope-27b-pt-res/snapshots/abc", layer=7))
    assert (hf_cache.site, hf_cache.layer, hf_cache.model_name) == ("resid_post", 7, "google/gemma-2-27b")
    with pytest.warns(UserWarning, match="assuming a residual-stream SAE at resid_post\\[2\\]"):
        unknown = SAE.load(write_gemma_scope(tmp_path, w, repo="my_copy", layer=2))
    assert unknown.site == "resid_post"


def test_gemma_scope_bad_files(tmp_path):
    w = rand(25)
    with pytest.raises(ValueError, match=r"b_enc: expected shape \[d_sae\] = \[37\].*transposed"):
        SAE.load(write_gemma_scope(tmp_path / "t", w, transpose=True))
    no_thr = {k: v for k, v in w.items() if k != "threshold"}
    with pytest.raises(ValueError, match=r"missing arrays \['threshold'\]"):
        SAE.load(write_gemma_scope(tmp_path / "n", no_thr))
    pickled = write_gemma_scope(tmp_path / "p", w)
    np.savez(pickled / "params.npz", **dict(w, W_enc=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(ValueError, match="without pickled objects"):
        SAE.load(pickled)
    corrupt = write_gemma_scope(tmp_path / "c", w)
    (corrupt / "params.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not a valid .npz"):
        SAE.load(corrupt)
    nan = dict(w, b_enc=w["b_enc"].copy())
    nan["b_enc"][0] = np.inf
    with pytest.raises(ValueError, match="b_enc: contains 1 NaN/inf"):
        SAE.load(write_gemma_scope(tmp_path / "nan", nan))


# ------------------------------------------------------------------ sparsify
def test_sparsify_layout(tmp_path):
    w = rand(26)
    run = tmp_path / "run"
    write_sparsify(run, w, hookpoint="layers.6", k=7)
    write_sparsify(run, rand(27), hookpoint="layers.6.mlp", k=7)
    for sae in (SAE.load(run, subfolder="layers.6"), SAE.load(run, hook="layers.6"), SAE.load(run / "layers.6"),
                SAE.load(run / "layers.6" / "sae.safetensors")):
        assert (sae.d_in, sae.d_sae, sae.activation, sae.k) == (D, F, "topk", 7)
        assert torch.equal(sae.W_enc, torch.from_numpy(w["W_enc"]))  # encoder.weight transposed back
        assert sae.apply_b_dec_to_input is True
        assert (sae.hook_name, sae.layer, sae.site) == ("layers.6", 6, "resid_post")
        assert sae.model_name == "EleutherAI/pythia-70m" and sae.source_format == "sparsify"
    mlp = SAE.load(run, subfolder="layers.6.mlp")
    assert (mlp.layer, mlp.site) == (6, None)
    wide = SAE.load(run, subfolder="layers.6", dtype=torch.float64)
    x = inputs(28).double()
    ref = sparsify_encode(w, x.numpy(), 7)
    assert close(wide.encode(x), ref)
    assert close(wide.forward(x), decode_ref(w, ref))
    with pytest.raises(ValueError, match="holds several SAEs; pick one with subfolder=.*layers.6, layers.6.mlp"):
        SAE.load(run)
    with pytest.raises(FileNotFoundError, match="no such folder; SAE folders under"):
        SAE.load(run, subfolder="layers.9")


def test_sparsify_orientation_and_cfg_checks(tmp_path):
    w = rand(29)
    with pytest.raises(ValueError, match=r"encoder.weight has shape \[37, 101\].*stored transposed"):
        SAE.load(write_sparsify(tmp_path / "a", w, encoder_weight=torch.from_numpy(w["W_enc"])))
    with pytest.raises(ValueError, match="d_in=36"):
        SAE.load(write_sparsify(tmp_path / "b", w, cfg_extra={"d_in": 36}))
    for extra, match in (({"transcode": True}, "transcoder"), ({"skip_connection": True}, "skip_connection"),
                         ({"activation": "groupmax"}, "'groupmax' is not supported"), ({"k": 0}, "k: expected 1 <= k"),
                         ({"signed": True}, "signed")):
        with pytest.raises(ValueError, match=match):
            SAE.load(write_sparsify(tmp_path / f"c{len(match)}{match[:3]}", w, cfg_extra=extra))
    # num_latents=0 -> d_in * expansion_factor, as sparsify does
    small = rand(30, d=5, f=10)
    sae = SAE.load(write_sparsify(tmp_path / "e", small, k=3, cfg_extra={"num_latents": 0, "expansion_factor": 2}))
    assert sae.d_sae == 10
    # square encoder stored the wrong way round: loads, but the latents are wrong
    sq = rand(31, d=41, f=41)
    x = inputs(32, d=41).double()
    bad = SAE.load(write_sparsify(tmp_path / "sq", sq, encoder_weight=torch.from_numpy(sq["W_enc"])), dtype=torch.float64)
    assert not np.allclose(bad.encode(x).numpy(), sparsify_encode(sq, x.numpy(), 7), atol=1e-3)


# ------------------------------------------------------------------ save -> load
def _same(a: SAE, b: SAE) -> None:
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert set(a.state_dict()) == set(b.state_dict())
    for attr in ("activation", "k", "apply_b_dec_to_input", "normalize_activations", "norm_scaling_factor",
                 "model_name", "hook_name", "layer", "site", "source_format", "metadata", "dtype"):
        assert getattr(a, attr) == getattr(b, attr), attr


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bitwise(tmp_path, activation, dtype):
    w = as_torch(rand(33), ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    kw = {"threshold": w.pop("threshold")} if activation == "jumprelu" else ({"k": 13} if activation == "topk" else {})
    if activation != "jumprelu":
        w.pop("threshold")
    sae = SAE(**w, activation=activation, apply_b_dec_to_input=activation != "jumprelu", hook_name="blocks.4.hook_resid_mid",
              model_name="m/x", metadata={"note": "hi", "context_size": 64}, dtype=dtype, **kw)
    sae.save(tmp_path / "s")
    back = SAE.load(tmp_path / "s")
    _same(sae, back)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    # SAELens' key names and conventions
    for key in ("architecture", "d_in", "d_sae", "dtype", "hook_name", "hook_layer", "apply_b_dec_to_input",
                "normalize_activations", "model_name", "activation_fn_str", "activation_fn_kwargs",
                "finetuning_scaling_factor", "context_size", "prepend_bos", "dataset_path"):
        assert key in cfg, key
    assert cfg["architecture"] == {"relu": "standard", "jumprelu": "jumprelu", "topk": "standard"}[activation]
    if activation == "topk":
        assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 13} and cfg["k"] == 13
    from safetensors import safe_open
    with safe_open(str(tmp_path / "s" / "sae_weights.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sae.state_dict())
        assert f.get_tensor("W_enc").shape == (D, F) and f.get_tensor("W_dec").shape == (F, D)


def test_save_load_round_trip_of_loaded_formats(tmp_path):
    w = rand(34)
    gemma = SAE.load(write_gemma_scope(tmp_path / "g", w))
    gemma.save(tmp_path / "g_out")
    _same(gemma, SAE.load(tmp_path / "g_out"))
    write_sparsify(tmp_path / "run", w)
    sparse = SAE.load(tmp_path / "run", subfolder="layers.6")
    sparse.save(tmp_path / "s_out")
    again = SAE.load(tmp_path / "s_out")
    _same(sparse, again)
    assert again.source_format == "sparsify" and again.hook_name == "layers.6"
    normalized = SAE(**as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec")),
                     normalize_activations="expected_average_only_in", norm_scaling_factor=0.3)
    normalized.save(tmp_path / "n_out")
    assert json.loads((tmp_path / "n_out" / "activation_scaler.json").read_text()) == {"scaling_factor": 0.3}
    _same(normalized, SAE.load(tmp_path / "n_out"))
    # saving over it without normalization removes the stale scale
    normalized.fold_normalization().save(tmp_path / "n_out")
    assert not (tmp_path / "n_out" / "activation_scaler.json").exists()
    assert SAE.load(tmp_path / "n_out").normalize_activations == "none"
    with pytest.raises(ValueError, match="linear SAE has no SAELens architecture"):
        SAE(**as_torch(w, ("W_enc", "b_enc", "W_dec", "b_dec")), activation="linear").save(tmp_path / "lin")


# ------------------------------------------------------------------ detection, paths, hub
def test_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist and is not a hub id"):
        SAE.load(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="does not exist and is not a hub id"):
        SAE.load("./relative/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SAE files found"):
        SAE.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not an SAE file"):
        SAE.load(tmp_path / "notes.txt")
    folder = write_saelens_v6(tmp_path / "s", rand(35))
    with pytest.raises(ValueError, match="format: asked for 'sparsify' but .* holds 'saelens'"):
        SAE.load(folder, format="sparsify")
    with pytest.raises(ValueError, match="format: unknown"):
        SAE.load(folder, format="onnx")
    with pytest.raises(ValueError, match="disagree"):
        SAE.load(folder, subfolder="a", hook="b")
    with pytest.raises(TypeError, match="path_or_hub_id"):
        SAE.load(3)
    with pytest.raises(TypeError, match="dtype"):
        SAE.load(folder, dtype=torch.int8)
    with pytest.raises(ValueError, match="norm_scaling_factor: only SAELens"):
        SAE.load(write_gemma_scope(tmp_path, rand(36)), norm_scaling_factor=1.0)
    assert SAE.load(folder, device="cpu").device == torch.device("cpu")


class FakeHub(types.SimpleNamespace):
    """Stands in for huggingface_hub: serves a local folder as if it were a downloaded snapshot."""

    def __init__(self, root: Path | None, error: Exception | None = None):
        super().__init__(root=root, error=error, calls=[])

    def snapshot_download(self, repo_id, allow_patterns=None, revision=None):
        self.calls.append((repo_id, tuple(allow_patterns or ()), revision))
        if self.error is not None:
            raise self.error
        return str(self.root)

    def list_repo_files(self, repo_id, revision=None):
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]


def test_hub_ids_download_only_the_needed_folder(tmp_path, monkeypatch):
    repo = tmp_path / "snapshot"
    w = rand(37)
    write_sparsify(repo, w, hookpoint="layers.3")
    write_sparsify(repo, w, hookpoint="layers.4")
    fake = FakeHub(repo)
    monkeypatch.setattr(hub_module, "_import_hub", lambda: fake)
    sae = SAE.load("EleutherAI/sae-pythia-70m-32k", subfolder="layers.3", revision="main")
    assert (sae.layer, sae.site, sae.source) == (3, "resid_post", "EleutherAI/sae-pythia-70m-32k/layers.3")
    repo_id, patterns, revision = fake.calls[-1]
    assert repo_id == "EleutherAI/sae-pythia-70m-32k" and revision == "main"
    assert "layers.3/sae.safetensors" in patterns and "layers.3/cfg.json" in patterns
    assert all(p.startswith("layers.3/") or p == "config.json" for p in patterns)
    inline = SAE.load("EleutherAI/sae-pythia-70m-32k/layers.4")
    assert inline.layer == 4
    with pytest.raises(FileNotFoundError, match="pass subfolder= one of: layers.3, layers.4"):
        SAE.load("EleutherAI/sae-pythia-70m-32k")
    gemma_repo = tmp_path / "gs"
    write_gemma_scope(gemma_repo, w, repo=".", layer=9)
    monkeypatch.setattr(hub_module, "_import_hub", lambda: FakeHub(gemma_repo))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hub id names the repository kind: no guessing
        gs = SAE.load("google/gemma-scope-2b-pt-res", subfolder="layer_9/width_16k/average_l0_71")
    assert (gs.site, gs.layer, gs.model_name) == ("resid_post", 9, "google/gemma-2-2b")


def test_hub_offline_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "_import_hub",
                        lambda: FakeHub(None, error=ConnectionError("Failed to resolve huggingface.co")))
    with pytest.raises(OSError, match="could not get SAE 'someone/some-saes'.*ConnectionError.*offline"):
        SAE.load("someone/some-saes", subfolder="layers.1")
