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
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .steering_vector import SteeringVector, _atomic_write

ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
KEY_FASTEER_METADATA = "fasteer.metadata"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


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
_LAYER_KEYED_METADATA = ("clamp_targets",)


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


def _field_value(reader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


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


def read_gguf(
    path: str | os.PathLike[str],
    *,
    expected_model: Any = None,
    dtype: torch.dtype = torch.float32,
) -> SteeringVector:
    """Read a llama.cpp / repeng control vector as a ``resid_post`` `SteeringVector`.

    ``expected_model`` (a string or a model): warn when the file's ``controlvector.model_hint``
    names another model.  A file that is not a readable control vector raises ``ValueError``
    naming the path and the problem; nothing is returned half-read."""
    path = Path(path)
    names = _model_names(expected_model) if expected_model is not None else None
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _field_value(reader, "general.architecture")
        hint = _field_value(reader, KEY_MODEL_HINT)
        count = _field_value(reader, KEY_LAYER_COUNT)
        fasteer_meta = _field_value(reader, KEY_FASTEER_METADATA)
        tensors = [
            (t.name, t.tensor_type, [int(d) for d in t.shape], np.array(t.data, copy=True))
            for t in reader.tensors
        ]
        del reader  # release the memory map now, not at garbage collection
    except Exception as exc:  # gguf raises ValueError/IndexError/struct/UnicodeDecodeError...
        raise ValueError(f"{path}: corrupt or unreadable GGUF file ({type(exc).__name__}: {exc})") from None

    if arch != ARCH:
        raise ValueError(
            f"{path}: general.architecture is {arch!r}, expected {ARCH!r} (is this a model file "
            "rather than a control vector?)"
        )
    directions: dict[int, np.ndarray] = {}
    for name, ttype, shape, data in tensors:
        m = _DIRECTION.match(name)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {name!r}; control vectors hold 'direction.<N>' tensors")
        if ttype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ValueError(f"{path}: tensor {name!r} has type {ttype.name}, expected F32 or F16")
        if data.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {name!r} is truncated ({data.size} of {int(np.prod(shape))} values)")
        if len(shape) != 1:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected a 1-D [n_embd] vector")
        directions[int(m.group(1))] = data.reshape(-1).astype(np.float32)
    if not directions:
        raise ValueError(f"{path}: control vector holds no direction tensors")
    if count is not None and int(count) != len(directions):
        warnings.warn(
            f"{path}: {KEY_LAYER_COUNT} says {count} but the file holds {len(directions)} direction tensors",
            stacklevel=2,
        )

    metadata: dict[str, Any] = {}
    if isinstance(fasteer_meta, str):
        try:
            metadata = json.loads(fasteer_meta)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: {KEY_FASTEER_METADATA} is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: {KEY_FASTEER_METADATA} is not a JSON object")
        metadata.pop("layers", None)
        metadata.pop("site", None)  # the file's directions are resid_post whatever they were before
    else:  # written by repeng, llama.cpp or another tool
        if hint:
            metadata["model_type"] = hint
        metadata["source_format"] = "gguf"
        metadata["created"] = None  # the file does not say; don't stamp it with the load time
    try:
        vector = SteeringVector(directions, site="resid_post", metadata=metadata, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid control vector ({exc})") from None

    if names is not None and hint:
        if not _hint_matches(hint, names):
            warnings.warn(
                f"{path}: control vector was made for model {hint!r} "
                f"(controlvector.model_hint), not for {names[0]!r}",
                UserWarning,
                stacklevel=2,
            )
    return vector
