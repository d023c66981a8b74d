"""Small file helpers shared by the format modules: strict reads, atomic writes.

Every reader turns a low-level failure (missing file, bad JSON, a truncated safetensors
header, a pickled npz) into an error that names the file and what was expected, so a user
never has to decode a ``SafetensorError`` or a zipfile traceback.  Writers go through a
temporary file in the same folder and ``os.replace`` so an interrupted save never leaves a
half-written SAE behind.  Nothing here unpickles.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._files import PARSE_ERRORS, FileFormatError, load_safetensors, read_json_file
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
    """A JSON object from ``path``, strictly decoded (`fasteer._files.loads_json`)."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise FileFormatError(path, None, f"expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file on the CPU, or raise naming the file.

    The header is checked against the file first (`fasteer._files.check_safetensors`): sizes
    bounded by the file, no overlapping tensors, float dtypes only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return load_safetensors(path)[1]


# numpy dtypes an .npz SAE may hold: torch has them all (not float128, not object arrays).
_NPZ_FLOATS = ("f2", "f4", "f8")
# deflate cannot expand data by more than ~1032x: a member claiming more is a lie (a zip bomb).
_MAX_DEFLATE_RATIO = 1100


def _npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    field = f"array {info.filename!r}"
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 4096:
        raise FileFormatError(path, field, f"declares {info.file_size} bytes from {info.compress_size} compressed")
    with archive.open(info) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except PARSE_ERRORS as exc:  # numpy raises ValueError, TokenError, SyntaxError, ...
            raise FileFormatError(path, field, f"malformed .npy header ({type(exc).__name__}: {exc})") from None
        if any(d < 0 for d in shape):
            raise FileFormatError(path, field, f"negative dimension in shape {list(shape)}")
        if dtype.hasobject:
            raise FileFormatError(path, field, "holds pickled Python objects; .npz files are loaded without pickled objects")
        if dtype.kind != "f" or dtype.str[1:] not in _NPZ_FLOATS:
            raise FileFormatError(path, field, f"has dtype {dtype}; expected float16, float32 or float64")
        header_len = stream.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - header_len:
            raise FileFormatError(
                path, field, f"header declares shape {list(shape)} ({nbytes} bytes) but the member "
                f"holds {info.file_size - header_len} data bytes"
            )
        data = bytearray(nbytes)  # the size was checked against the member just above
        view, got = memoryview(data), 0
        while got < nbytes:
            n = stream.readinto(view[got:])
            if not n:
                raise FileFormatError(path, field, f"truncated: {got} of {nbytes} data bytes")
            got += n
    arr = np.frombuffer(data, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Load an ``.npz`` archive without pickle (object arrays are refused).

    Each member's ``.npy`` header is parsed on its own and its declared shape checked against the
    member's size before any data is read, so a malformed archive cannot make numpy allocate
    memory the file does not hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    out: dict[str, torch.Tensor] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if not name.endswith(".npy") or info.is_dir():
                    raise FileFormatError(path, f"member {name!r}", "not an .npy array")
                key = name[: -len(".npy")]
                if key in out:
                    raise FileFormatError(path, f"array {key!r}", "stored twice in the archive")
                out[key] = torch.from_numpy(_npz_member(archive, info, path))
    except FileFormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError, KeyError, OverflowError, UnicodeError) as e:
        raise FileFormatError(path, None, f"not a valid .npz archive without pickled objects ({type(e).__name__}: {e})") from None
    return out


def build_sae(path: Path, *args: Any, **kwargs: Any):
    """``SAE(*args, **kwargs)`` for values read from ``path``: a value the SAE refuses (NaN
    weights, a bad layer, a non-string name...) is a `FileFormatError` naming the file."""
    from ..sae import SAE

    try:
        return SAE(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FileFormatError(path, None, f"invalid SAE ({exc})") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
