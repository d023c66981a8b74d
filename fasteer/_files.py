"""File helpers shared by the vector and SAE formats: atomic writes, the `FileFormatError`
every loader raises for a malformed file, strict JSON and a safetensors header check that
bounds everything by the file's real size before any tensor is read."""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import tokenize
import zlib
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over
    ``path``: a reader never sees a half-written file, and a failed write leaves the old
    one. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- bad files
class FileFormatError(ValueError):
    """A file that exists and was read, but is not a valid file of the expected format.

    The message names the file and the field (JSON key, tensor, header entry) at fault.  It is
    a ``ValueError``, so ``except ValueError`` keeps working; real I/O problems (a missing file,
    a permission error) stay ``FileNotFoundError`` / ``OSError``.  ``path`` and ``field`` are
    also kept as attributes (``None`` when not known)."""

    def __init__(self, path: Any, field: str | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.problem = problem
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{field}: {problem}" if field else f"{where}{problem}")


#: Exception types that a parser of untrusted bytes may raise on malformed input (on top of
#: ``ValueError``).  Loaders turn them into `FileFormatError`; nothing here is an I/O error.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
    ArithmeticError, UnicodeError, EOFError, struct.error, zlib.error, NotImplementedError,
    tokenize.TokenError, SyntaxError,
)

MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 64 << 20


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range for a float")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def loads_json(text: str | bytes, path: Any, field: str | None = None) -> Any:
    """Strict ``json.loads`` for text from a file: no NaN/Infinity, no number that overflows a
    float, at most `MAX_JSON_DEPTH` levels of nesting; anything else is a `FileFormatError`."""
    if len(text) > MAX_JSON_BYTES:
        raise FileFormatError(path, field, f"JSON text of {len(text)} bytes is too large")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise FileFormatError(path, field, "JSON nested too deeply") from None
    except (ValueError, UnicodeError) as exc:
        raise FileFormatError(path, field, f"not valid JSON ({exc})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise FileFormatError(path, field, f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def read_json_file(path: Path) -> Any:
    """Read and strictly decode a JSON file (see `loads_json`); a missing file is
    ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise FileFormatError(path, None, f"{size} bytes is too large for a JSON config")
    return loads_json(path.read_bytes(), path)


# ------------------------------------------------------------------------ safetensors
# Tensor dtypes the loaders accept, with their item size.  float8/int/bool tensors are refused
# here with a clear error instead of failing later in torch (``isfinite`` has no float8 kernel).
SAFETENSORS_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_SAFETENSORS_ALL_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_SAFETENSORS_HEADER = 100 << 20  # the limit the safetensors library itself uses


def check_safetensors(path: Path, *, allowed_dtypes: dict[str, int] | None = None) -> dict[str, Any]:
    """Validate a safetensors file's header against the file before anything loads it.

    Checks: the header length fits the file; the header is a JSON object of bounded depth;
    every tensor has a known dtype (one of ``allowed_dtypes``, default the float types),
    a shape of non-negative ints whose byte size equals its data range, and a data range inside
    the file that overlaps no other tensor's.  Returns the header (``__metadata__`` included)."""
    path = Path(path)
    allowed = SAFETENSORS_FLOAT_DTYPES if allowed_dtypes is None else allowed_dtypes
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(path, None, f"not a valid safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 1 or n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise FileFormatError(path, "header length", f"not a valid safetensors file ({n} bytes of header do not fit a {size}-byte file)")
        try:
            header = loads_json(f.read(n), path, "header")
        except FileFormatError as exc:
            raise FileFormatError(path, "header", f"not a valid safetensors file ({exc.problem})") from None
    if not isinstance(header, dict):
        raise FileFormatError(path, "header", f"expected a JSON object, got {type(header).__name__}")
    data_size = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise FileFormatError(path, "__metadata__", "expected an object of strings")
            continue
        field = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise FileFormatError(path, field, "header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_ALL_DTYPES:
            raise FileFormatError(path, f"{field} dtype", f"unknown dtype {dtype!r}")
        if dtype not in allowed:
            raise FileFormatError(
                path, f"{field} dtype", f"{dtype} is not supported; expected one of {', '.join(allowed)}"
            )
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
            raise FileFormatError(path, f"{field} shape", f"expected a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FileFormatError(path, f"{field} data_offsets", f"expected [begin, end], got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise FileFormatError(
                path, f"{field} data_offsets", f"[{begin}, {end}] is outside the {data_size} data bytes of the file"
            )
        nbytes = math.prod(shape) * _SAFETENSORS_ALL_DTYPES[dtype]
        if nbytes != end - begin:
            raise FileFormatError(
                path, f"{field} data_offsets", f"shape {shape} needs {nbytes} bytes, the range holds {end - begin}"
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise FileFormatError(path, f"tensor {n1!r} data_offsets", f"overlaps the data of tensor {n0!r}")
    return header


def load_safetensors(path: Path, *, allowed_dtypes: dict[str, int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``__metadata__``, ``{name: tensor}``) of a checked safetensors file, on the CPU."""
    header = check_safetensors(path, allowed_dtypes=allowed_dtypes)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own error types; callers want one kind
        raise FileFormatError(path, None, f"corrupt or unreadable safetensors file ({exc})") from None
    return dict(header.get("__metadata__") or {}), tensors
