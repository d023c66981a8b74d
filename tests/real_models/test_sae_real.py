"""fasteer's packaged SmolLM2 SAE on the real model, and SAE-guided steering on real weights.

* The SAE (``fasteer/data/saes/smollm2-res-8``, float16, SAELens layout) loads, round-trips
  through fasteer's SAELens writer bit for bit, and on text it was not trained on still
  reconstructs the residual stream (FVE, L0, spliced cross-entropy within stated bounds --
  bounds set from the held-out figures in its training.json with margin, so a broken file,
  a wrong site or a transposed matrix fails them).
* The four steerings of benchmarks/run_fgaa.py -- CAA, FGAA through the shipped effect
  approximator, SAE-TS targeted, FeatureEdit(add) on one feature -- each on its own row of
  one batch through the fused path, equal the same edits written as plain hooks
  (`hook_reference`), logits and greedy generation (dynamic and static cache).
"""
from __future__ import annotations

import json

import pytest
import torch

import fasteer as fs
from hook_reference import RefEdit
from real_models._load import load
from real_models.test_equivalence import check, run_fasteer, run_reference
from sae_reference import feature_pair

TEXTS = [  # not in the SAE's corpus: written for this test
    "The ferry left the harbour at dawn, and the passengers watched the gulls circling "
    "above the grey water while the captain checked the charts one more time.",
    "To make the sauce, melt the butter slowly, stir in the flour, and add the milk a "
    "little at a time so that no lumps form; season it with salt and nutmeg.",
    "The committee will meet on Thursday to review the budget, and every department is "
    "asked to send its figures by Tuesday evening at the latest.",
    "She laughed when the puppy tried to climb the stairs, tumbled back down, and then "
    "tried again as if nothing had happened.",
]


@pytest.fixture(scope="module")
def packaged():
    from fasteer.sae.packaged import load_packaged_sae, packaged_sae_info
    sae, density = load_packaged_sae("smollm2")
    return sae, density, packaged_sae_info("smollm2")


def test_packaged_sae_is_what_training_json_says(packaged):
    sae, density, info = packaged
    model, _ = load("smollm2")
    assert sae.d_in == model.config.hidden_size == 576
    assert sae.d_sae == len(density) == info["training"]["d_sae"]
    assert (sae.layer, sae.site, sae.activation) == (8, "resid_post", "relu")
    assert sae.hook_name == "blocks.8.hook_resid_post"
    assert sae.dtype == torch.float16
    assert 0.0 < float(density.mean()) < 0.05          # sparse: a few % of features per token


def test_saelens_round_trip_is_exact(packaged, tmp_path):
    sae, _, _ = packaged
    out = sae.save(tmp_path / "again")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["hook_name"] == "blocks.8.hook_resid_post"
    again = fs.SAE.load(out)
    for name, t in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    h = torch.randn(7, 576, dtype=torch.float16) * 4
    assert torch.equal(again.encode(h), sae.encode(h))


def test_quality_on_unseen_text(packaged):
    """Bounds from the held-out figures (training.json: FVE, L0, loss recovered) with margin
    for 4 short texts; each would fail for a wrong site or layer (FVE < 0), for a broken
    decoder (loss recovered << 0.5) or for an SAE that is not sparse."""
    from fasteer.sae.quality import sae_quality
    sae, _, info = packaged
    model, tok = load("smollm2")
    q = sae_quality(model, tok, sae.to(dtype=torch.float32), TEXTS, progress=False)
    held_out = info["quality_held_out"]
    assert q["fve"] > held_out["fve"] - 0.15 and q["fve"] > 0.5, q
    assert 2.0 < q["mean_l0"] < 3 * held_out["mean_l0"] + 10, q
    assert q["ce_spliced"] < q["ce_zero"], q
    assert q["loss_recovered"] > 0.5, q
    # the wrong layer's stream is not reconstructed
    with pytest.warns(UserWarning, match="trained at resid_post\\[8\\]"):
        wrong = sae_quality(model, tok, sae.to(dtype=torch.float32), TEXTS, layer=20,
                            site="resid_post", progress=False)
    assert wrong["fve"] < q["fve"] - 0.2, (wrong["fve"], q["fve"])


@pytest.fixture(scope="module")
def vectors(packaged):
    """CAA, FGAA (effect mapping) and SAE-TS vectors for sentiment, and FGAA's top feature."""
    from fasteer.evaluate import load_concept
    from fasteer.sae.packaged import packaged_sae_path
    sae, density, _ = packaged
    model, tok = load("smollm2")
    pos, neg = load_concept("sentiment").pairs("train")
    pos, neg = pos[:12], neg[:12]
    approx = fs.extract.EffectApproximator.load(packaged_sae_path("smollm2") / "effects.safetensors")
    caa = fs.extract.caa(model, tok, pos, neg, layers=[8], progress=False)
    fg = fs.extract.fgaa(model, tok, sae, pos, neg, density=density, approximator=approx,
                         progress=False)
    k = int(fg.metadata["features"][0])
    ts = fs.extract.targeted_vector(approx, [k])
    return caa, fg, ts, k


def test_four_methods_fused_equal_hooks(packaged, vectors):
    sae, _, _ = packaged
    caa, fg, ts, k = vectors
    norm = float(caa[8].norm())
    # every vector at CAA's length and a strength that visibly changes the logits
    adds = []
    for vec in (caa, fg, ts):
        v = {8: vec[8].float() * (2.0 * norm / float(vec[8].norm()))}
        adds.append((fs.Add(v, 1.0, layers=[8], site="resid_post"),
                     RefEdit("add", [8], "resid_post", v, 1.0)))
    edit = feature_pair(sae.to(dtype=torch.float32), k, "add", 2.0 * norm)
    assert edit[0].fused
    sets = [([a[0]], [r]) for r, a in enumerate(adds)] + [([edit[0]], [3])]
    out = run_fasteer("smollm2", sets)
    ref = run_reference("smollm2", [[adds[0][1]], [adds[1][1]], [adds[2][1]], [edit[1]]],
                        sae=True)
    check("smollm2", out, ref, steered_rows=[0, 1, 2, 3])


def test_fgaa_and_sae_ts_vectors_are_unit_and_distinct(vectors):
    caa, fg, ts, k = vectors
    assert fg.metadata["mapping"] == "effect"
    for vec in (fg, ts):
        assert abs(float(vec[8].norm()) - 1.0) < 1e-4
    cos = float(torch.nn.functional.cosine_similarity(fg[8].double(), ts[8].double(), dim=0))
    assert cos < 0.999          # FGAA's target has many features, SAE-TS's one
