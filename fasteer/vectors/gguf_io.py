"""llama.cpp / repeng GGUF control vectors: read and write them as `SteeringVector`s.

The file format
---------------
A control vector is a GGUF file with ``general.architecture = "controlvector"``, the keys
``controlvector.model_hint`` (string: the model *type* it was made for, e.g. ``"llama"``) and
``controlvector.layer_count`` (the number of direction tensors), and one 1-D F32 tensor
``direction.{N}`` of length ``n_embd`` per steered layer.

The layer-index convention (read from the sources, not guessed)
--------------------------------------------------------------
* llama.cpp, ``common/common.cpp`` ``common_control_vector_load_one``: parses ``N`` out of
  ``direction.N``, **rejects N == 0** ("invalid (zero) direction tensor layer index": the whole
  file is skipped; the check is the same in the older ``llama_control_vector_load`` and the
  current ``common_control_vector_load_one``) and rejects non-F32 / non-1-D tensors; it stores
  ``direction.N`` at offset ``n_embd * (N - 1)`` of a flat buffer ("layer 1 at [0]").  It
  does not read ``model_hint`` or ``layer_count`` at all.
* llama.cpp, ``src/llama-adapter.cpp`` ``llama_adapter_cvec::apply``: fills ``tensors[il]`` for
  ``il = 1 .. n_layer-1`` from offset ``n_embd * (il - 1)`` (``tensors[0]`` is always null:
  "there's never a tensor for layer 0").  The two ``-1`` cancel: **direction.N steers block
  il = N**.
* llama.cpp model graphs (e.g. ``src/models/llama.cpp``): ``cur = ggml_add(cur, ffn_inp);
  cur = build_cvec(cur, il); cb(cur, "l_out", il)`` — the vector is added to the *output* of
  block ``il`` (after the FFN residual add).  llama.cpp's block ``il`` is HF's decoder layer
  ``il`` (same 0-based order of ``blk.{il}`` / ``model.layers.{il}``).
* repeng, ``repeng/extract.py``: ``read_representations`` indexes layers in
  ``model_layer_list(model)`` (``model.model.layers``, HF decoder-layer index) and reads them from
  ``out.hidden_states[layer + 1]``, i.e. the output of decoder layer ``layer``;
  ``ControlVector.export_gguf`` writes them as ``direction.{layer}`` unchanged.
  ``repeng/control.py`` ``ControlModule.forward`` adds ``directions[layer]`` to the output of
  decoder layer ``layer``.  repeng's default layers are ``range(-1, -num_hidden_layers, -1)``,
  i.e. ``n-1 .. 1`` — it never writes ``direction.0``, which is why its files load in llama.cpp.

So all three agree: **``direction.N`` == fasteer ``resid_post[N]`` (output of HF decoder layer
N)**, no shift.  Conversions fasteer does on write:

* ``site="resid_post"``: layer ``l`` -> ``direction.l``.
* ``site="resid_pre"``: ``resid_pre[l] == resid_post[l-1]`` -> ``direction.{l-1}``
  (``resid_pre[0]``, the embedding output, has no slot: error).
* ``site="resid_mid"``: not expressible in this format: error.
* ``direction.0`` (``resid_post[0]``) makes llama.cpp refuse the whole file, so writing it is an
  error unless ``allow_layer_zero=True`` (repeng and fasteer read such files fine).

Two caveats worth knowing, documented rather than "fixed" because the files are what they are:

* repeng reads its *last* layer from ``hidden_states[-1]``, which HF takes *after* the final
  norm, while it applies it before the norm; so repeng's top-layer direction was measured at a
  slightly different point than where it is applied.
* llama.cpp's own ``tools/cvector-generator`` records ``l_out`` of blocks ``0 .. n-2`` and names
  them ``direction.{il+1}`` (``mean.hpp``/``pca.hpp``: ``"direction.%zu", il+1``): its vectors
  are measured one block below where they are applied.  fasteer reads the file as written
  (``direction.N`` -> ``resid_post[N]``, where llama.cpp applies it).

Round trip: fasteer also stores its own metadata as a JSON string under ``fasteer.metadata``
(llama.cpp and repeng ignore unknown keys), so ``write_gguf`` then ``read_gguf`` gives back the
same layers, values (F32, bit for bit) and metadata.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import PARSE_ERRORS, FileFormatError, loads_json
from .steering_vector import SteeringVector, _atomic_write

ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
KEY_FASTEER_METADATA = "fasteer.metadata"
# ASCII digits only ("direction.٣" is not layer 3) and no leading zeros ("direction.01" beside
# "direction.1" would name layer 1 twice); llama.cpp's own writer never produces either.
_DIRECTION = re.compile(r"^direction\.(0|[1-9][0-9]{0,8})$", re.ASCII)


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - the fasteer[gguf] extra
        raise ImportError("reading/writing GGUF control vectors needs the 'gguf' package: pip install 'fasteer[gguf]'") from exc
    return gguf


def _gguf_layers(vector: SteeringVector, allow_layer_zero: bool) -> dict[int, torch.Tensor]:
    """Map the vector's layers to llama.cpp ``direction.N`` indices (see module docstring)."""
    if vector.site == "resid_post":
        shift = 0
    elif vector.site == "resid_pre":
        if 0 in vector:
            raise ValueError(
                "vector: resid_pre[0] (the embedding output) has no slot in a GGUF control vector; "
                "drop layer 0 with vector.select(...)"
            )
        shift = -1
    else:
        raise ValueError(
            f"vector.site: GGUF control vectors steer the output of a layer (resid_post); "
            f"got site {vector.site!r}"
        )
    out = {layer + shift: t for layer, t in vector.items()}
    if 0 in out and not allow_layer_zero:
        raise ValueError(
            "vector: has a direction for resid_post[0] (direction.0), which llama.cpp rejects "
            "(it skips the whole file); drop it with vector.select(...) or pass "
            "allow_layer_zero=True for a file only repeng/fasteer will read"
        )
    return out


# Metadata fields keyed by layer number ({"<layer>": value}): renumbered with the directions.
_LAYER_KEYED_METADATA = ("clamp_targets", "resid_norm")


def _metadata_at_gguf_layers(meta: dict[str, Any], site: str) -> dict[str, Any]:
    """The metadata as the file's ``direction.N`` numbering sees it (resid_post layers).

    A ``resid_pre`` vector's layer ``l`` is written as ``direction.{l-1}``; every field that
    names layers moves with it, so the loaded vector's metadata matches its layers."""
    shift = -1 if site == "resid_pre" else 0
    meta = dict(meta)
    meta.pop("layers", None)  # the reader fills it from the tensors
    meta["site"] = "resid_post"
    if shift:
        meta["saved_from_site"] = site
        for key in _LAYER_KEYED_METADATA:
            field = meta.get(key)
            if isinstance(field, dict) and all(str(k).isascii() and str(k).isdigit() for k in field):
                meta[key] = {str(int(k) + shift): v for k, v in meta[key].items()}
    return meta


def write_gguf(
    vector: SteeringVector,
    path: str | os.PathLike[str],
    *,
    model_hint: str | None = None,
    allow_layer_zero: bool = False,
) -> Path:
    """Write ``vector`` as a llama.cpp control vector (``--control-vector FILE``).

    ``model_hint`` defaults to the vector's ``metadata["model_type"]`` (what repeng and
    llama.cpp's generator write: the architecture, e.g. ``"llama"``), else its model name,
    else ``""``.  See the module docstring for the layer convention and layer 0."""
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"vector: expected a SteeringVector, got {type(vector).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"path: expected a file name ending in .gguf, got {str(path)!r}")
    layers = _gguf_layers(vector, allow_layer_zero)
    meta = vector.metadata
    if model_hint is None:
        model_hint = meta.get("model_type") or meta.get("model_name") or ""
    if not isinstance(model_hint, str):
        raise TypeError(f"model_hint: expected a string, got {type(model_hint).__name__}")
    meta = _metadata_at_gguf_layers(meta, vector.site)
    arrays = {n: t.detach().to("cpu", torch.float32).numpy().copy() for n, t in sorted(layers.items())}

    gguf = _gguf()

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(KEY_MODEL_HINT, model_hint)
        writer.add_uint32(KEY_LAYER_COUNT, len(arrays))
        writer.add_string(KEY_FASTEER_METADATA, json.dumps(meta))
        for n, arr in arrays.items():
            writer.add_tensor(f"direction.{n}", arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _atomic_write(path, write)
    return path


def _model_names(expected_model: Any) -> list[str]:
    """Names ``expected_model`` goes by: its model type and its name/path, lower-cased."""
    if isinstance(expected_model, str):
        return [expected_model.lower()]
    config = getattr(expected_model, "config", expected_model)
    names = [getattr(config, "model_type", None), getattr(config, "_name_or_path", None),
             getattr(config, "name_or_path", None)]
    names = [n.lower() for n in names if isinstance(n, str) and n]
    if not names:
        raise TypeError(
            "expected_model: expected a model name/type string or a model with a config, "
            f"got {type(expected_model).__name__}"
        )
    return names


def _hint_matches(hint: str, names: list[str]) -> bool:
    hint = hint.lower()
    # A hint is a model type ("llama"); a model *name* ("meta-llama/Llama-3-8B") contains it.
    return any(hint == name or hint in name or name in hint for name in names)


# ----------------------------------------------------------------------------- reading
# The reader below parses the GGUF layout itself (``ggml/include/gguf.h``, ``gguf-py``'s
# ``GGUFReader``), bounding every declared count and length by the bytes left in the file
# before it reads or allocates anything, so a hostile file cannot hang the process or make it
# allocate memory the file does not hold.  It decodes only the keys a control vector needs.
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_NESTING = 8
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_KEY_LEN = 65536
# GGUF value types: fixed sizes and struct codes (little-endian).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# GGML tensor types a control vector may hold, with their numpy dtype.
_TENSOR_TYPES = {0: ("F32", np.dtype("<f4")), 1: ("F16", np.dtype("<f2"))}
_WANTED_KEYS = ("general.architecture", "general.alignment", KEY_MODEL_HINT, KEY_LAYER_COUNT, KEY_FASTEER_METADATA)


def _type_name(ttype: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(ttype).name
    except Exception:  # noqa: BLE001 - unknown number, or gguf not installed
        return f"#{ttype}"


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every error names the field."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, field: str, problem: str) -> FileFormatError:
        return FileFormatError(self.path, field, problem)

    def need(self, n: int, field: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos} but the file has "
                                   f"{self.size - self.pos} left (truncated or corrupt)")

    def scalar(self, code: str, field: str):
        n = struct.calcsize("<" + code)
        self.need(n, field)
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, field: str, limit: int | None = None) -> str:
        n = self.scalar("Q", f"{field} length")
        if limit is not None and n > limit:
            raise self.fail(field, f"string of {n} bytes is longer than {limit}")
        self.need(n, field)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(field, "not valid UTF-8") from None

    def skip_string(self, field: str) -> None:
        n = self.scalar("Q", f"{field} length")
        self.need(n, field)
        self.pos += n

    def value(self, vtype: int, field: str, keep: bool, depth: int = 0):
        """Read (``keep``) or skip one value of GGUF type ``vtype``."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], field)
        if vtype == _STRING:
            if keep:
                return self.string(field)
            self.skip_string(field)
            return None
        if vtype != _ARRAY:
            raise self.fail(field, f"unknown value type {vtype}")
        if depth >= _MAX_ARRAY_NESTING:
            raise self.fail(field, f"arrays nested more than {_MAX_ARRAY_NESTING} deep")
        etype = self.scalar("I", f"{field} element type")
        count = self.scalar("Q", f"{field} element count")
        if etype in _SCALARS:
            n = count * struct.calcsize("<" + _SCALARS[etype])
            self.need(n, field)  # bounded by the file before anything is read
            self.pos += n
            return None
        if etype not in (_STRING, _ARRAY):
            raise self.fail(field, f"unknown array element type {etype}")
        # Every string/array element takes at least 8 (resp. 12) bytes: bound the count first.
        least = 8 if etype == _STRING else 12
        if count > (self.size - self.pos) // least:
            raise self.fail(field, f"declares {count} elements but the file has {self.size - self.pos} bytes left")
        for i in range(count):
            self.value(etype, f"{field}[{i}]", False, depth + 1)
        return None


def _parse_gguf(buf, path: Path) -> tuple[dict[str, Any], list[tuple[str, int, list[int], np.ndarray]]]:
    """(wanted key values, [(name, type, shape, data)]) of a GGUF file held in ``buf``."""
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[:4]) != b"GGUF":
        raise c.fail("magic", "not a GGUF file")
    c.pos = 4
    version = c.scalar("I", "version")
    if version not in _GGUF_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 16) in (2, 3, 512, 768):
            raise c.fail("version", "big-endian GGUF files are not supported")
        raise c.fail("version", f"{version} is not supported (expected 2 or 3)")
    n_tensors = c.scalar("Q", "tensor_count")
    n_kv = c.scalar("Q", "kv_count")
    # Each KV pair takes at least 8 + 4 + 1 bytes, each tensor info at least 8 + 4 + 4 + 8.
    if n_kv > (c.size - c.pos) // 13:
        raise c.fail("kv_count", f"{n_kv} key/value pairs cannot fit in a {c.size}-byte file")
    if n_tensors > (c.size - c.pos) // 24:
        raise c.fail("tensor_count", f"{n_tensors} tensors cannot fit in a {c.size}-byte file")
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for i in range(n_kv):
        key = c.string(f"key #{i}", limit=_MAX_KEY_LEN)
        if key in seen:
            raise c.fail(key, "key given twice")
        seen.add(key)
        vtype = c.scalar("I", f"{key} type")
        keep = key in _WANTED_KEYS
        value = c.value(vtype, key, keep)
        if keep:
            values[key] = (vtype, value)
    arch = values.get("general.architecture", (None, None))[1]
    if arch != ARCH:  # before the tensors: a model file is refused without touching its weights
        raise c.fail(
            "general.architecture",
            f"general.architecture is {arch!r}, expected {ARCH!r} (is this a model file "
            "rather than a control vector?)"
        )
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name", limit=_MAX_KEY_LEN)
        if name in names:
            raise c.fail(f"tensor {name!r}", "name given twice")
        names.add(name)
        n_dims = c.scalar("I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name!r} n_dims", f"{n_dims} (expected 1..{_MAX_DIMS})")
        shape = [c.scalar("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
        ttype = c.scalar("I", f"tensor {name!r} type")
        offset = c.scalar("Q", f"tensor {name!r} offset")
        infos.append((name, shape, ttype, offset))
    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in values:
        vtype, align = values["general.alignment"]
        if vtype != 4 or align == 0 or align & (align - 1):
            raise c.fail("general.alignment", f"expected a power-of-two uint32, got {align!r}")
        alignment = align
    data_start = -(-c.pos // alignment) * alignment
    tensors = []
    spans = []
    for name, shape, ttype, offset in infos:
        field = f"tensor {name!r}"
        if ttype not in _TENSOR_TYPES:
            raise c.fail(f"{field} type", f"has type {_type_name(ttype)}, expected F32 or F16")
        dtype = _TENSOR_TYPES[ttype][1]
        if offset % alignment:
            raise c.fail(f"{field} offset", f"{offset} is not a multiple of the alignment {alignment}")
        count = 1
        for d in shape:
            count *= d
        begin = data_start + offset
        end = begin + count * dtype.itemsize
        if end > c.size:
            raise c.fail(f"{field} offset", f"data [{begin}, {end}) runs past the end of the "
                                            f"{c.size}-byte file (truncated or corrupt)")
        spans.append((begin, end, name))
        tensors.append((name, ttype, [int(d) for d in reversed(shape)], begin, count, dtype))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise c.fail(f"tensor {n1!r} offset", f"its data overlaps the data of tensor {n0!r}")
    out = [
        (name, ttype, shape, np.frombuffer(buf, dtype=dtype, count=count, offset=begin).copy())
        for name, ttype, shape, begin, count, dtype in tensors
    ]
    return {k: v for k, (t, v) in values.items()}, out


def _typed(values: dict[str, Any], key: str, kind: type, path: Path, what: str) -> Any:
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FileFormatError(path, key, f"expected {what}, got {value!r}")
    return value


def read_gguf(
    path: str | os.PathLike[str],
    *,
    expected_model: Any = None,
    dtype: torch.dtype = torch.float32,
) -> SteeringVector:
    """Read a llama.cpp / repeng control vector as a ``resid_post`` `SteeringVector`.

    ``expected_model`` (a string or a model): warn when the file's ``controlvector.model_hint``
    names another model.  A file that is not a readable control vector raises
    `fasteer.FileFormatError` (a ``ValueError``) naming the path and the field; nothing is
    returned half-read.  Every count and length the file declares is checked against its real
    size before anything is read, so a malformed file cannot hang or exhaust memory."""
    path = Path(path)
    names = _model_names(expected_model) if expected_model is not None else None
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise FileFormatError(path, "magic", "empty file, not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                values, tensors = _parse_gguf(buf, path)
    except (FileFormatError, OSError, MemoryError):
        raise
    except PARSE_ERRORS as exc:  # a safety net: the parser above should have named the field
        raise FileFormatError(path, None, f"corrupt or unreadable GGUF file ({type(exc).__name__}: {exc})") from None
    hint = _typed(values, KEY_MODEL_HINT, str, path, "a string")
    count = _typed(values, KEY_LAYER_COUNT, int, path, "an integer")
    fasteer_meta = _typed(values, KEY_FASTEER_METADATA, str, path, "a JSON string")

    directions: dict[int, np.ndarray] = {}
    for name, ttype, shape, data in tensors:
        m = _DIRECTION.match(name)
        if m is None:
            raise FileFormatError(
                path, f"tensor {name!r}",
                f"unexpected tensor {name!r}; control vectors hold 'direction.<N>' tensors "
                "(N in ASCII digits, no leading zeros)"
            )
        if len(shape) != 1:
            raise FileFormatError(path, f"tensor {name!r}", f"has shape {shape}, expected a 1-D [n_embd] vector")
        layer = int(m.group(1))
        if layer in directions:
            raise FileFormatError(path, f"tensor {name!r}", f"layer {layer} stored twice")
        directions[layer] = data.reshape(-1).astype(np.float32)
    if not directions:
        raise FileFormatError(path, None, "control vector holds no direction tensors")
    if count is not None and int(count) != len(directions):
        warnings.warn(
            f"{path}: {KEY_LAYER_COUNT} says {count} but the file holds {len(directions)} direction tensors",
            stacklevel=2,
        )

    metadata: dict[str, Any] = {}
    if isinstance(fasteer_meta, str):
        metadata = loads_json(fasteer_meta, path, KEY_FASTEER_METADATA)
        if not isinstance(metadata, dict):
            raise FileFormatError(path, KEY_FASTEER_METADATA, "is not a JSON object")
        metadata.pop("layers", None)
        metadata.pop("site", None)  # the file's directions are resid_post whatever they were before
    else:  # written by repeng, llama.cpp or another tool
        if hint:
            metadata["model_type"] = hint
        metadata["source_format"] = "gguf"
        metadata["created"] = None  # the file does not say; don't stamp it with the load time
    try:
        vector = SteeringVector(directions, site="resid_post", metadata=metadata, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FileFormatError(path, None, f"invalid control vector ({exc})") from None

    if names is not None and hint:
        if not _hint_matches(hint, names):
            warnings.warn(
                f"{path}: control vector was made for model {hint!r} "
                f"(controlvector.model_hint), not for {names[0]!r}",
                UserWarning,
                stacklevel=2,
            )
    return vector
