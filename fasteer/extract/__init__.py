"""Steering-vector extraction: CAA, repeng-style PCA, instruction vectors, ablation directions,
FGAA (SAE-guided); and learned activation scaling (`fasteer.extract.scaling`).

All methods read the residual stream in one batched forward per batch for every requested
layer (see `fasteer.extract.activations`) and return a `fasteer.SteeringVector`.
"""
from .ablation import ablation_direction
from .activations import collect_activations, resid_norms
from .caa import caa
from .effects import EffectApproximator, fit_effect_approximator, targeted_vector
from .fgaa import FGAADegenerateWarning, feature_density, fgaa
from .files import extract_from_files
from .instruction import InstructionSteering, instruction
from .instruction_layers import LayerChoice, compose, search_layer
from .pca import pca
from .scaling import ActivationScaling, activation_scaling

__all__ = [
    "ablation_direction",
    "activation_scaling",
    "ActivationScaling",
    "caa",
    "compose",
    "collect_activations",
    "EffectApproximator",
    "extract_from_files",
    "feature_density",
    "FGAADegenerateWarning",
    "fit_effect_approximator",
    "fgaa",
    "instruction",
    "InstructionSteering",
    "LayerChoice",
    "pca",
    "resid_norms",
    "search_layer",
    "targeted_vector",
]
