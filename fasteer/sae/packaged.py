"""SAEs that ship inside the fasteer package, for the packaged real models (`fasteer.models`).

==========  =================  ========================================================
name        model              SAE
==========  =================  ========================================================
smollm2     SmolLM2-135M-      4096 ReLU features on ``resid_post[8]`` (SAELens
            Instruct           ``blocks.8.hook_resid_post``), float16, trained by
                               ``scripts/train_smollm2_sae.py`` on offline text
==========  =================  ========================================================

Each is an ordinary SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) under
``fasteer/data/saes/``, so it loads through `fasteer.SAE.load` exactly as a user's SAE does
(and in SAELens itself). Next to it ``training.json`` records the corpus, the
hyper-parameters, the held-out quality (fraction of variance explained, L0, dead features,
cross-entropy with the SAE spliced in), the corpus firing density of every feature (pass it
to ``fs.extract.fgaa(density=...)``) and the sha256 of the model weights it was trained on.
``effects.safetensors`` is the SAE-TS effect approximator fitted for it
(`fasteer.extract.EffectApproximator.load`; pass it to ``fs.extract.fgaa(approximator=)``
or ``fs.extract.targeted_vector``; how it was fitted and how well it predicts: its header
and docs/sae_steering.md). An SAE only means something on the activations it was trained on: ``check_model=True``
compares that hash with the converted model folder and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SAE_ROOT = Path(__file__).resolve().parent.parent / "data" / "saes"
PACKAGED_SAES = {"smollm2": "smollm2-res-8"}
_RETRAIN = "rerun `python scripts/train_smollm2_sae.py`"


def packaged_sae_path(name: str = "smollm2") -> Path:
    """The folder of packaged SAE ``name``."""
    if name not in PACKAGED_SAES:
        raise ValueError(f"packaged SAE: expected one of {sorted(PACKAGED_SAES)}, got {name!r}")
    folder = SAE_ROOT / PACKAGED_SAES[name]
    if not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"packaged SAE {name!r} not found in {folder}; {_RETRAIN}")
    return folder


def packaged_sae_info(name: str = "smollm2") -> dict:
    """The contents of the SAE's ``training.json`` (corpus, settings, quality, density)."""
    return json.loads((packaged_sae_path(name) / "training.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_packaged_sae(name: str = "smollm2", *, device="cpu", dtype=None,
                      check_model: bool = False):
    """``(sae, density)``: the packaged SAE for packaged model ``name`` and the corpus firing
    rate of each of its features (float64 [d_sae], for ``fs.extract.fgaa(density=)``).

    ``check_model=True`` converts/locates the packaged model folder
    (`fasteer.models.packaged_model_path`) and raises RuntimeError unless its
    ``model.safetensors`` is the one the SAE was trained on.
    """
    import torch

    from .sae import SAE

    folder = packaged_sae_path(name)
    info = packaged_sae_info(name)
    if check_model:
        from ..models import packaged_model_path
        weights = packaged_model_path(name) / "model.safetensors"
        if _sha256(weights) != info["model_weights_sha256"]:
            raise RuntimeError(f"packaged SAE {name!r} was trained on other weights than "
                               f"{weights}; {_RETRAIN}")
    sae = SAE.load(folder, device=device, dtype=dtype)
    density = torch.tensor(info["corpus_density"], dtype=torch.float64)
    if density.shape != (sae.d_sae,):
        raise RuntimeError(f"packaged SAE {name!r}: training.json has {density.shape[0]} "
                           f"densities for {sae.d_sae} features; {_RETRAIN}")
    return sae, density
