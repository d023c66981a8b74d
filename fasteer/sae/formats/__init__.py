"""SAE file formats: SAELens, Gemma Scope, EleutherAI sparsify (one module each), format
detection and Hugging Face Hub downloads.  `fasteer.SAE.load` / `SAE.save` are the entry points.

The names below are resolved lazily: ``fasteer.sae.sae`` imports ``formats.hooks`` while the
format modules import ``SAE`` back, so nothing is imported here eagerly.
"""
from importlib import import_module

_EXPORTS = {
    "FORMATS": "detect",
    "detect_format": "detect",
    "find_sae_folders": "detect",
    "load_sae": "detect",
    "load_gemma_scope": "gemma_scope",
    "load_saelens": "saelens",
    "save_saelens": "saelens",
    "load_sparsify": "sparsify",
    "parse_hook_name": "hooks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
