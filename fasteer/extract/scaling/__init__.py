"""Activation scaling (Stoehr et al. 2024): learned scalars on component outputs.

* `params`    -- ActivScalar, DynScalar and the SteerVec baseline as trainable modules;
* `objective` -- effectiveness, faithfulness, minimality;
* `hooks`     -- the training-time forward (out-of-place hooks on the carriers' modules);
* `train`     -- `activation_scaling` (also ``fs.extract.activation_scaling``);
* `result`    -- `ActivationScaling`: save / load, ``.interventions()`` for the fused path;
* `evaluate`  -- held-out effectiveness, faithfulness and minimality through the fused path;
* `tasks`     -- country-capital conflict and IOI prompts built per tokenizer.
"""
from .params import METHODS, ScalingParams
from .result import ActivationScaling
from .train import activation_scaling

__all__ = ["METHODS", "ActivationScaling", "ScalingParams", "activation_scaling"]
