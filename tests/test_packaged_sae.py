"""The SAE shipped in the package (`fasteer.sae.packaged`): it loads from the package data
as the SAE training.json describes, and refuses what it should, before loading weights.
(Its quality on the real model: tests/real_models/test_sae_real.py.)"""
from __future__ import annotations

import json

import pytest
import torch

import fasteer.sae.packaged as packaged
from fasteer.sae.packaged import load_packaged_sae, packaged_sae_info, packaged_sae_path


def test_loads_as_described():
    sae, density = load_packaged_sae("smollm2")
    info = packaged_sae_info("smollm2")
    cfg = json.loads((packaged_sae_path("smollm2") / "cfg.json").read_text())
    assert (sae.d_in, sae.d_sae) == (576, info["training"]["d_sae"]) == (cfg["d_in"], cfg["d_sae"])
    assert (sae.layer, sae.site, sae.activation) == (8, "resid_post", "relu")
    assert sae.dtype == torch.float16
    assert density.dtype == torch.float64 and density.shape == (sae.d_sae,)
    assert bool(((density >= 0) & (density <= 1)).all())
    # unit decoder rows (the training constraint; float16 rounding only)
    norms = sae.W_dec.float().norm(dim=1)
    assert float((norms - 1).abs().max()) < 2e-3
    # the density is what the features do: a dead-on-corpus feature has none
    assert int((density == 0).sum()) < 0.01 * sae.d_sae
    q = info["quality_held_out"]
    assert 0 < q["fve"] < 1 and q["ce_clean"] < q["ce_spliced"] < q["ce_zero"]


def test_unknown_name_and_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="expected one of \\['smollm2'\\]"):
        load_packaged_sae("gpt2")
    monkeypatch.setattr(packaged, "SAE_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_smollm2_sae.py"):
        load_packaged_sae("smollm2")


def test_density_length_mismatch_is_refused(monkeypatch):
    info = packaged_sae_info("smollm2")
    info["corpus_density"] = info["corpus_density"][:-1]
    monkeypatch.setattr(packaged, "packaged_sae_info", lambda name="smollm2": info)
    with pytest.raises(RuntimeError, match="densities for 4096 features"):
        load_packaged_sae("smollm2")


def test_check_model_refuses_other_weights(tmp_path, monkeypatch):
    import fasteer.models as models
    (tmp_path / "model.safetensors").write_bytes(b"not the weights the SAE was trained on")
    monkeypatch.setattr(models, "packaged_model_path", lambda name="smollm2": tmp_path)
    with pytest.raises(RuntimeError, match="trained on other weights"):
        load_packaged_sae("smollm2", check_model=True)
