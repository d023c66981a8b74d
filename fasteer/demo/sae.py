"""The demo's tiny SAE: where it lives, which feature carries the demo attribute, and a guard
that it still matches the demo model.

The SAE (512 ReLU features on ``resid_post`` of decoder layer ``world.DEMO_LAYER``) is trained
by ``scripts/train_demo_sae.py`` and shipped as package data in SAELens format, so it loads
through ``fasteer.SAE.load`` exactly as a user's SAE does. Next to it, ``demo_features.json``
records the feature the script chose for the demo attribute (positive sentiment), the
corpus firing rate of every feature (FGAA's density filter) and the sha256 of the
``model.safetensors`` it was trained on: an SAE is only meaningful on the activations it was
trained on, so a retrained demo model must come with a retrained SAE, and loading refuses a
mismatch instead of steering with a stale one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import world

SAE_DIR = Path(__file__).resolve().parent / "data" / "sae"
FEATURES_FILE = "demo_features.json"
_RETRAIN = "rerun `python scripts/train_demo_sae.py`"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_demo_features() -> dict:
    """The contents of ``demo_features.json`` (feature ids, density, model hash, ...)."""
    path = SAE_DIR / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"demo SAE not found in {SAE_DIR}; {_RETRAIN}")
    return json.loads(path.read_text())


def load_demo_sae(device="cpu", dtype=None, *, check_model: bool = True):
    """``(sae, info)``: the shipped demo SAE (a `fasteer.SAE`) and its feature info.

    ``info["positive_feature"]`` is the feature tied to the demo attribute (positive
    sentiment), ``info["negative_feature"]`` its opposite, ``info["density"]`` the firing
    rate of every feature on the training corpus. Raises RuntimeError if the demo model's
    weights are not the ones the SAE was trained on (``check_model=False`` skips the check).
    """
    from ..sae import SAE

    info = load_demo_features()
    if check_model:
        model_file = world.DEMO_DIR / "model.safetensors"
        if not model_file.is_file():
            raise FileNotFoundError(f"demo model not found in {world.DEMO_DIR}")
        actual = _sha256(model_file)
        if actual != info.get("model_sha256"):
            raise RuntimeError(
                f"the demo SAE in {SAE_DIR} was trained on another demo model "
                f"(sha256 {str(info.get('model_sha256'))[:12]}..., the model now is "
                f"{actual[:12]}...); {_RETRAIN}")
    sae = SAE.load(SAE_DIR, device=device, dtype=dtype)
    return sae, info
