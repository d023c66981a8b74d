"""Sparse autoencoders: the `SAE` object (weights, exact math, provenance) and its file formats.

`SAE.load` reads SAELens, Gemma Scope and EleutherAI sparsify SAEs (local or from the Hugging
Face Hub); `SAE.save` writes SAELens format.  Feature edits, monitoring and FGAA build on
`SAE.feature_encoder` / `SAE.feature_decoder`, which fold the input handling into one column and
one bias per feature.  `sae_quality` measures an SAE at its site (FVE, L0, dead features,
spliced / zero-ablated cross-entropy); `top_contexts` / `label_table` show what features fire on.
"""
from .sae import ACTIVATIONS, NORMALIZATIONS, SAE, FeatureEncoder
from .quality import sae_quality
from .labels import Context, FeatureContexts, format_contexts, label_table, top_contexts

__all__ = ["SAE", "FeatureEncoder", "ACTIVATIONS", "NORMALIZATIONS", "sae_quality", "top_contexts",
           "label_table", "format_contexts", "Context", "FeatureContexts"]
