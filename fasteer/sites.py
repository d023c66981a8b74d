"""Where the residual stream can be read and edited in a Hugging Face model.

(First cut: only the decoder-layer lookup. The architecture table of carriers
lands with the patch layer.)
"""
from __future__ import annotations

import torch.nn as nn

# Attribute paths (from the top-level CausalLM module) of the decoder-layer list,
# tried in order. Covers the HF families fasteer knows.
_LAYER_PATHS = (
    "model.layers",          # Llama, Mistral, Mixtral, Qwen2/3(-MoE), Gemma 1/2/3, Phi-3, OLMo-2
    "model.language_model.layers",  # Gemma-3 multimodal wrappers
    "transformer.h",         # GPT-2, Falcon
    "gpt_neox.layers",       # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
    "layers",                # a bare decoder stack
)


def _get_attr_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder layers of a HF causal LM (or its base model)."""
    for path in _LAYER_PATHS:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"model: cannot find the decoder layers of {type(model).__name__}; "
        f"looked for {', '.join(_LAYER_PATHS)}"
    )
