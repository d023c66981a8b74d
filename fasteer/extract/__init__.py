"""Steering-vector extraction: CAA, repeng-style PCA, instruction vectors, ablation directions,
FGAA (SAE-guided).

All methods read the residual stream in one batched forward per batch for every requested
layer (see `fasteer.extract.activations`) and return a `fasteer.SteeringVector`.
"""
from .ablation import ablation_direction
from .activations import collect_activations
from .caa import caa
from .fgaa import feature_density, fgaa
from .files import extract_from_files
from .instruction import InstructionSteering, instruction
from .pca import pca

__all__ = [
    "ablation_direction",
    "caa",
    "collect_activations",
    "extract_from_files",
    "feature_density",
    "fgaa",
    "instruction",
    "InstructionSteering",
    "pca",
]
