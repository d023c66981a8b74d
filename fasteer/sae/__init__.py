"""Sparse autoencoders: the `SAE` object (weights, exact math, provenance) and its file formats.

`SAE.load` reads SAELens, Gemma Scope and EleutherAI sparsify SAEs (local or from the Hugging
Face Hub); `SAE.save` writes SAELens format.  Feature edits, monitoring and FGAA build on
`SAE.feature_encoder` / `SAE.feature_decoder`, which fold the input handling into one column and
one bias per feature.
"""
from .sae import ACTIVATIONS, NORMALIZATIONS, SAE, FeatureEncoder

__all__ = ["SAE", "FeatureEncoder", "ACTIVATIONS", "NORMALIZATIONS"]
