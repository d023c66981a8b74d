"""`SteeringVector`: one direction per layer, the site it lives at, and where it came from.

Why the design is what it is:

* A vector is a plain ``{layer: Tensor[D]}`` map (HF decoder-layer indices, 0-based) plus a
  *site* name.  That is the shape every tool in the ecosystem already uses (repeng's
  ``ControlVector.directions``, steering-vectors' ``layer_activations``, llama.cpp's
  ``direction.{il}`` tensors), so converting between them is a key rename, not a resample.
* Validation happens once, in the constructor: every tensor is 1-D, floating, finite and of
  the same width D, layer keys are non-negative ints.  Everything downstream (the patch layer,
  the kernels) can then trust a `SteeringVector` without re-checking.
* Metadata is a JSON-able dict (model name/type, hidden size, method, layers, creation date,
  free-form extras) so that it survives the safetensors header, which only stores strings.
* Files load without pickle.  ``save`` writes safetensors (or GGUF for ``.gguf`` paths) to a
  temporary file and renames it into place, so a crash never leaves half a file; ``load``
  sniffs the magic bytes, validates everything and only then builds the object, so a corrupt
  file raises instead of returning half a vector.
* Arithmetic is what composing vectors needs: scale, add/subtract (union of layers, a missing
  layer counts as zero — the same rule as repeng's ``ControlVector.__add__``), normalize.
  Vectors taken at different sites are never added: ``resid_pre[l]`` and ``resid_post[l]``
  are different points of the stream, so mixing them would silently shift a layer.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import PARSE_ERRORS, FileFormatError, load_safetensors, loads_json
from .._files import SAFETENSORS_FLOAT_DTYPES as _FLOAT_DTYPES
from .._files import atomic_write as _atomic_write

SITES = ("resid_pre", "resid_mid", "resid_post")

# Keys fasteer fills in itself; everything else in ``metadata`` is a free-form extra.
STANDARD_METADATA_KEYS = ("model_name", "model_type", "hidden_size", "method", "layers", "created")

_FORMAT_NAME = "fasteer.steering_vector"
_FORMAT_VERSION = "1"
# ASCII digits only (``\d`` would take "٣"), no leading zeros: "01" and "1" must not both name layer 1.
_TENSOR_NAME = re.compile(r"^(?:layer\.)?(0|[1-9][0-9]{0,8})$", re.ASCII)
# Tensor dtypes a vector file may hold (what the constructor accepts).
_VECTOR_DTYPES = {**_FLOAT_DTYPES, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}
_SAFETENSORS_SUFFIXES = (".safetensors", ".st")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _as_direction(layer: int, value: Any) -> torch.Tensor:
    """Turn one layer's value into a detached floating tensor, or raise naming the layer."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"directions[{layer}]: expected a numeric array, got dtype=object")
        t = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (list, tuple)):
        t = torch.as_tensor(value)
    else:
        raise TypeError(
            f"directions[{layer}]: expected a torch.Tensor, numpy array or list of floats, "
            f"got {type(value).__name__}"
        )
    if t.dim() != 1:
        raise ValueError(f"directions[{layer}]: expected a 1-D vector [D], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"directions[{layer}]: expected a non-empty vector, got D=0")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"directions[{layer}]: expected a real floating-point vector, got dtype {t.dtype}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"directions[{layer}]: contains {bad} NaN/inf value(s); expected finite values")
    return t


def _check_layer_key(layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"directions: layer keys must be ints (HF decoder-layer index), got {layer!r}")
    layer = int(layer)
    if layer < 0:
        raise ValueError(
            f"directions: layer keys must be >= 0 (0-based HF decoder-layer index), got {layer}; "
            "resolve negative indices against the model first"
        )
    return layer


def _check_site(site: Any) -> str:
    if site not in SITES:
        raise ValueError(f"site: expected one of {', '.join(SITES)}, got {site!r}")
    return site


def _check_scalar(value: Any, op: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SteeringVector {op}: expected a real scalar, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"SteeringVector {op}: expected a finite scalar, got {value}")
    return value


class SteeringVector:
    """Per-layer steering directions at one residual-stream site, with metadata.

    Args:
        directions: ``{layer: vector}`` with ``layer`` the 0-based HF decoder-layer index and
            ``vector`` a 1-D tensor / array of length D (the model's hidden size).  Values are
            copied and stored as float32 unless ``dtype`` says otherwise.
        site: ``"resid_post"`` (output of layer ``l``; the convention of repeng, steering-vectors
            and llama.cpp), ``"resid_pre"`` (input of layer ``l``) or ``"resid_mid"``.
        metadata: JSON-serialisable dict.  ``hidden_size`` and ``layers`` are filled from the
            directions (a conflicting ``hidden_size`` is an error); ``created`` defaults to now
            (ISO 8601, UTC).  Other keys (``model_name``, ``model_type``, ``method``, extras) are
            kept as given.
        dtype: storage dtype (default float32).
    """

    __slots__ = ("_directions", "_site", "_metadata")

    def __init__(
        self,
        directions: Mapping[int, Any],
        site: str = "resid_post",
        metadata: Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(directions, Mapping):
            raise TypeError(
                f"directions: expected a mapping {{layer: vector}}, got {type(directions).__name__}"
            )
        if len(directions) == 0:
            raise ValueError("directions: expected at least one layer, got an empty mapping")
        site = _check_site(site)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")

        checked: dict[int, torch.Tensor] = {}
        width = None
        for layer, key in sorted((_check_layer_key(key), key) for key in directions):
            if layer in checked:
                raise ValueError(f"directions: layer {layer} given twice")
            t = _as_direction(layer, directions[key])
            if width is None:
                width = t.numel()
            elif t.numel() != width:
                raise ValueError(
                    f"directions[{layer}]: expected D={width} like the other layers, got D={t.numel()}"
                )
            checked[layer] = t
        # Convert only after every check passed: nothing is half-built on error.
        converted = {layer: t.to(dtype=dtype, copy=True).contiguous() for layer, t in sorted(checked.items())}
        for layer, t in converted.items():
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"dtype: directions[{layer}] does not fit in {dtype} (values overflow to inf)"
                )
        self._directions = converted
        self._site = site

        meta = dict(metadata or {})
        for key in meta:
            if not isinstance(key, str):
                raise TypeError(f"metadata: keys must be strings, got {key!r}")
        declared = meta.get("hidden_size")
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, numbers.Integral)):
            raise ValueError(f"metadata['hidden_size']: expected an int, got {declared!r}")
        if declared is not None and int(declared) != width:
            raise ValueError(
                f"metadata['hidden_size']: says {meta['hidden_size']} but the directions have D={width}"
            )
        meta["hidden_size"] = width
        meta["layers"] = list(self._directions)
        meta.setdefault("created", _now_iso())
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata: values must be JSON-serialisable ({exc})") from None
        self._metadata = meta

    # ------------------------------------------------------------------ access
    @property
    def directions(self) -> dict[int, torch.Tensor]:
        """``{layer: Tensor[D]}`` (a shallow copy: replacing entries does not change the vector)."""
        return dict(self._directions)

    @property
    def site(self) -> str:
        return self._site

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata dict (a copy)."""
        return json.loads(json.dumps(self._metadata))

    @property
    def layers(self) -> list[int]:
        return list(self._directions)

    @property
    def hidden_size(self) -> int:
        return next(iter(self._directions.values())).numel()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._directions.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._directions.values())).device

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self._directions:
            raise KeyError(f"layer {layer!r} not in this SteeringVector (layers: {self.layers})")
        return self._directions[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self._directions

    def __iter__(self) -> Iterator[int]:
        return iter(self._directions)

    def __len__(self) -> int:
        return len(self._directions)

    def items(self):
        return self._directions.items()

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's direction."""
        return {layer: float(t.double().norm()) for layer, t in self._directions.items()}

    @property
    def resid_norm(self) -> dict[int, float] | None:
        """``{layer: median L2 norm of the residual stream at this site}`` from the metadata
        (``resid_norm``, recorded by every `fasteer.extract` method or attached with
        `with_resid_norm`), or None. ``fs.Add(v, alpha, scale="resid")`` reads it."""
        stored = self._metadata.get("resid_norm")
        if not isinstance(stored, Mapping):
            return None
        return {int(k): float(v) for k, v in stored.items()}

    def with_resid_norm(self, model_or_norms: Any, tokenizer: Any = None,
                        prompts: Any = None, **options: Any) -> "SteeringVector":
        """A copy whose metadata holds ``resid_norm`` for ``fs.Add(..., scale="resid")``.

        ``vec.with_resid_norm({layer: norm})`` attaches given norms (every layer of the
        vector, positive finite numbers); ``vec.with_resid_norm(model, tokenizer, prompts)``
        measures them with `fasteer.extract.resid_norms` at the vector's layers and site
        (``options`` are passed on: ``position="all"|"last"``, ``batch_size``, ...)."""
        if isinstance(model_or_norms, Mapping):
            if tokenizer is not None or prompts is not None or options:
                raise TypeError("with_resid_norm({layer: norm}) takes no other arguments")
            norms = {}
            for key, value in model_or_norms.items():
                layer = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() \
                    else _check_layer_key(key)
                norms[layer] = _check_scalar(value, "with_resid_norm")
                if not norms[layer] > 0:
                    raise ValueError(f"with_resid_norm: the norm of layer {layer} must be > 0, "
                                     f"got {norms[layer]}")
            missing = [l for l in self.layers if l not in norms]
            if missing:
                raise ValueError(f"with_resid_norm: no norm for layers {missing} of this vector")
        else:
            if tokenizer is None or prompts is None:
                raise TypeError("with_resid_norm: pass {layer: norm}, or (model, tokenizer, "
                                "prompts) to measure them")
            if self._site == "resid_mid":
                raise ValueError("with_resid_norm: measuring norms at resid_mid is not supported; "
                                 "pass {layer: norm}")
            from fasteer.extract.activations import resid_norms

            options.setdefault("site", self._site)
            if options["site"] != self._site:
                raise ValueError(f"site: the vector lives at {self._site!r}; its norms must be "
                                 f"measured there, got {options['site']!r}")
            norms = resid_norms(model_or_norms, tokenizer, prompts, self.layers, **options)
        stored = dict(self._metadata.get("resid_norm") or {})
        stored.update({str(l): float(n) for l, n in norms.items()})
        return self._derive(self._directions, resid_norm=stored)

    def __repr__(self) -> str:
        method = self._metadata.get("method")
        model = self._metadata.get("model_name")
        extra = "".join(f", {k}={v!r}" for k, v in (("method", method), ("model", model)) if v)
        return f"SteeringVector(layers={self.layers}, D={self.hidden_size}, site={self.site!r}{extra})"

    # --------------------------------------------------------------- builders
    def _derive(self, directions: Mapping[int, torch.Tensor], **meta_updates: Any) -> "SteeringVector":
        meta = self.metadata
        meta.pop("layers", None)
        meta.update(meta_updates)
        return SteeringVector(directions, site=self._site, metadata=meta, dtype=self.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SteeringVector":
        """A copy with every direction moved to ``device`` / cast to ``dtype``."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        out = object.__new__(SteeringVector)
        out._directions = {
            layer: t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)
            for layer, t in self._directions.items()
        }
        for layer, t in out._directions.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"dtype: layer {layer} does not fit in {t.dtype} (values overflow to inf)")
        out._site = self._site
        out._metadata = self.metadata
        return out

    def select(self, layers: Iterable[int]) -> "SteeringVector":
        """A copy restricted to ``layers`` (each must be present)."""
        layers = list(layers)
        missing = [layer for layer in layers if layer not in self._directions]
        if missing:
            raise KeyError(f"layers {missing} not in this SteeringVector (layers: {self.layers})")
        if not layers:
            raise ValueError("layers: expected at least one layer")
        return self._derive({layer: self._directions[layer] for layer in layers})

    def normalized(self) -> "SteeringVector":
        """A copy with every layer's direction scaled to unit L2 norm."""
        out = {}
        for layer, t in self._directions.items():
            norm = t.double().norm()
            if norm == 0:
                raise ValueError(f"normalized(): layer {layer} is the zero vector; it has no direction")
            out[layer] = (t.double() / norm).to(t.dtype)
        return self._derive(out)

    # ------------------------------------------------------------- arithmetic
    def _scaled(self, factor: float) -> "SteeringVector":
        return self._derive({layer: t * factor for layer, t in self._directions.items()})

    def __mul__(self, other: Any) -> "SteeringVector":
        if isinstance(other, SteeringVector):
            return NotImplemented
        return self._scaled(_check_scalar(other, "*"))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "SteeringVector":
        value = _check_scalar(other, "/")
        if value == 0:
            raise ZeroDivisionError("SteeringVector / 0")
        return self._scaled(1.0 / value)

    def __neg__(self) -> "SteeringVector":
        return self._scaled(-1.0)

    def _combine(self, other: Any, sign: float, op: str) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.site != self.site:
            raise ValueError(
                f"SteeringVector {op}: sites differ ({self.site!r} vs {other.site!r}); "
                "vectors at different points of the residual stream cannot be combined"
            )
        if other.hidden_size != self.hidden_size:
            raise ValueError(
                f"SteeringVector {op}: hidden sizes differ (D={self.hidden_size} vs D={other.hidden_size})"
            )
        mine, theirs = self._metadata.get("model_name"), other._metadata.get("model_name")
        if mine and theirs and mine != theirs:
            warnings.warn(
                f"SteeringVector {op}: combining vectors from different models ({mine!r} and {theirs!r})",
                stacklevel=3,
            )
        out: dict[int, torch.Tensor] = {}
        for layer in sorted(set(self._directions) | set(other._directions)):
            a = self._directions.get(layer)
            b = other._directions.get(layer)
            if b is not None:
                b = b.to(device=self.device, dtype=self.dtype)
            if a is None:
                out[layer] = sign * b
            elif b is None:
                out[layer] = a.clone()
            else:
                out[layer] = a + sign * b
        extra = {}
        mine_norm, their_norm = self._metadata.get("resid_norm"), other._metadata.get("resid_norm")
        if isinstance(mine_norm, Mapping) or isinstance(their_norm, Mapping):
            # the stream's norms, not the vector's: same site, so either side's value holds
            extra["resid_norm"] = {**(their_norm or {}), **(mine_norm or {})}
        return self._derive(out, method=f"({self._metadata.get('method')}){op}({other._metadata.get('method')})",
                            **extra)

    def __add__(self, other: Any) -> "SteeringVector":
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: Any) -> "SteeringVector":
        return self._combine(other, -1.0, "-")

    def allclose(self, other: "SteeringVector", rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """Same site and layers, and every direction ``torch.allclose``."""
        if not isinstance(other, SteeringVector):
            raise TypeError(f"other: expected a SteeringVector, got {type(other).__name__}")
        if other.site != self.site or other.layers != self.layers or other.hidden_size != self.hidden_size:
            return False
        return all(
            torch.allclose(self[layer].double().cpu(), other[layer].double().cpu(), rtol=rtol, atol=atol)
            for layer in self.layers
        )

    # ------------------------------------------------------------- model fit
    def check_compatible(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if this vector cannot steer ``model`` (hidden size or layer range)."""
        from fasteer.sites import decoder_layers

        n_layers = len(decoder_layers(model))
        config = getattr(model, "config", None)
        width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if width is not None and int(width) != self.hidden_size:
            raise ValueError(
                f"vector: hidden size D={self.hidden_size} does not match the model "
                f"(hidden_size={width}); was it extracted from another model?"
            )
        out_of_range = [layer for layer in self.layers if layer >= n_layers]
        if out_of_range:
            raise ValueError(
                f"vector: layers {out_of_range} out of range for a model with {n_layers} decoder "
                f"layers (expected 0..{n_layers - 1})"
            )

    # -------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike[str], **gguf_options: Any) -> Path:
        """Write the vector to ``path``: ``.safetensors`` (metadata in the header) or ``.gguf``
        (llama.cpp/repeng control vector; see `fasteer.vectors.gguf_io.write_gguf` for options).
        The file is written next to its destination and renamed into place."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            from .gguf_io import write_gguf

            return write_gguf(self, path, **gguf_options)
        if gguf_options:
            raise TypeError(f"save(): options {sorted(gguf_options)} only apply to .gguf files")
        if suffix not in _SAFETENSORS_SUFFIXES:
            raise ValueError(
                f"path: expected a file name ending in .safetensors or .gguf, got {str(path)!r}"
            )
        from safetensors.torch import save_file

        tensors = {f"layer.{layer}": t.detach().to("cpu", torch.float32).contiguous() for layer, t in self.items()}
        header = {"format": _FORMAT_NAME, "format_version": _FORMAT_VERSION, "site": self._site}
        header.update({f"meta.{key}": json.dumps(value) for key, value in self._metadata.items()})
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_model: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> "SteeringVector":
        """Read a vector written by `save`, a plain ``{"layer.N"|"N": tensor}`` safetensors
        file, or a llama.cpp / repeng GGUF control vector (detected by its magic bytes).

        ``expected_model`` (a model, a model name or a model type) only affects GGUF files,
        whose ``controlvector.model_hint`` is compared with it (a mismatch warns)."""
        path = Path(path)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        if not path.is_file():
            raise FileNotFoundError(f"path: no such file {str(path)!r}")
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic[:4] == b"GGUF":
            from .gguf_io import read_gguf

            return read_gguf(path, expected_model=expected_model, dtype=dtype)
        if len(magic) < 8:
            raise FileFormatError(path, None, f"file too short to be a safetensors or GGUF file ({len(magic)} bytes)")
        try:
            return _load_safetensors(path, dtype)
        except (FileFormatError, OSError, MemoryError):
            raise
        except PARSE_ERRORS as exc:  # a safety net: every malformed file gives one error type
            raise as_file_error(path, exc) from None


def as_file_error(path: Path, exc: BaseException) -> FileFormatError:
    """``exc`` (raised while parsing ``path``) as a `FileFormatError` naming the file."""
    text = str(exc)
    if text.startswith(str(path)):
        return FileFormatError(None, None, text)
    return FileFormatError(path, None, f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text)


def _load_safetensors(path: Path, dtype: torch.dtype) -> SteeringVector:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len <= 0 or header_len > path.stat().st_size - 8:
        raise FileFormatError(
            path, "header length",
            f"not a safetensors or GGUF file (bad header length {header_len} for a "
            f"{path.stat().st_size}-byte file)"
        )
    header, tensors = load_safetensors(path, allowed_dtypes=_VECTOR_DTYPES)

    fmt = header.get("format", _FORMAT_NAME)
    if fmt != _FORMAT_NAME:
        raise FileFormatError(path, "format", f"safetensors header says format {fmt!r}, expected {_FORMAT_NAME!r}")
    version = header.get("format_version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION:
        raise FileFormatError(
            path, "format_version", f"steering-vector format version {version!r} is not supported "
            f"(this fasteer reads version {_FORMAT_VERSION})"
        )
    directions = {}
    for name, t in tensors.items():
        m = _TENSOR_NAME.match(name)
        if m is None:
            raise FileFormatError(
                path, f"tensor {name!r}", "unexpected name; a steering-vector file holds tensors named "
                "'layer.<N>' (N = decoder-layer index, ASCII digits, no leading zeros)"
            )
        layer = int(m.group(1))
        if layer in directions:
            raise FileFormatError(path, f"tensor {name!r}", f"layer {layer} stored twice")
        directions[layer] = t
    if not directions:
        raise FileFormatError(path, None, "the file holds no 'layer.<N>' tensors")
    metadata = {}
    for key, raw in header.items():
        if key.startswith("meta."):
            metadata[key[len("meta."):]] = loads_json(raw, path, f"metadata entry {key!r}")
    metadata.pop("layers", None)
    try:
        return SteeringVector(directions, site=header.get("site", "resid_post"), metadata=metadata, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FileFormatError(path, None, f"invalid steering vector ({exc})") from None


