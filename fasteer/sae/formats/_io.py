"""Small file helpers shared by the format modules: strict reads, atomic writes.

Every reader turns a low-level failure (missing file, bad JSON, a truncated safetensors
header, a pickled npz) into an error that names the file and what was expected, so a user
never has to decode a ``SafetensorError`` or a zipfile traceback.  Writers go through a
temporary file in the same folder and ``os.replace`` so an interrupted save never leaves a
half-written SAE behind.  Nothing here unpickles.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._files import atomic_write as _atomic_write

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.float64": torch.float64,
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def dtype_from_str(value: Any, where: str) -> torch.dtype:
    """SAELens writes dtypes as ``"float32"`` or ``"torch.float32"``; map both."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(
        f"{where}: unknown dtype {value!r}; expected one of float32, float16, bfloat16, float64"
    )


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file on the CPU, or raise naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Load an ``.npz`` archive without pickle (object arrays are refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.array(archive[name]) for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path}: not a valid .npz archive without pickled objects ({e})") from e
    out = {}
    for name, arr in arrays.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{path}: array {name!r} has dtype {arr.dtype}; expected floating point")
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
