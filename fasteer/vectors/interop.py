"""Move vectors between fasteer and repeng / steering-vectors objects.

Neither package is a dependency, so nothing here imports them at module load: objects coming
*in* are recognised by duck typing (their public attributes), and the ``to_*`` functions import
the package only when called.

What the attributes mean (read from the packages' sources):

* repeng ``ControlVector`` (``repeng/extract.py``): ``model_type: str`` and
  ``directions: dict[int, np.ndarray]``, keyed by HF decoder-layer index and added to that
  layer's *output* by ``repeng/control.py`` -> fasteer ``resid_post[layer]``.
* steering-vectors ``SteeringVector`` (``steering_vectors/steering_vector.py``):
  ``layer_activations: dict[int, Tensor]`` and ``layer_type`` (default ``"decoder_block"``).
  ``patch_activations`` registers a forward hook on the matching module and adds the vector to
  its output; for ``"decoder_block"`` that is the residual stream after the layer ->
  ``resid_post[layer]``.  Its other layer types (``"self_attn"``, ``"mlp"``, the layernorms)
  hook a sub-module's output, which is not a point on the residual stream, so they are refused.
  Negative layer numbers index from the end (Python-style) in both packages; resolving them
  needs the model's layer count (``num_layers=``).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .steering_vector import SteeringVector


def _resolve_layers(directions: Mapping[Any, Any], num_layers: int | None, arg: str) -> dict[int, Any]:
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers <= 0):
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    out: dict[int, Any] = {}
    for key, value in directions.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise TypeError(f"{arg}: layer keys must be ints, got {key!r}")
        layer = int(key)
        if layer < 0:
            if num_layers is None:
                raise ValueError(
                    f"{arg}: has negative layer index {layer}; pass num_layers= (the model's "
                    "number of decoder layers) to resolve it"
                )
            layer += int(num_layers)
        if num_layers is not None and not 0 <= layer < num_layers:
            raise ValueError(f"{arg}: layer {key} out of range for num_layers={num_layers}")
        if layer in out:
            raise ValueError(f"{arg}: layer {key} resolves to layer {layer}, which is already present")
        out[layer] = value
    return out


def from_repeng(control_vector: Any, *, num_layers: int | None = None) -> SteeringVector:
    """A `SteeringVector` (``resid_post``) from a repeng ``ControlVector``."""
    directions = getattr(control_vector, "directions", None)
    model_type = getattr(control_vector, "model_type", None)
    if not isinstance(directions, Mapping) or not isinstance(model_type, str):
        raise TypeError(
            "control_vector: expected a repeng ControlVector (attributes model_type: str and "
            f"directions: dict[int, ndarray]), got {type(control_vector).__name__}"
        )
    layers = _resolve_layers(directions, num_layers, "control_vector.directions")
    return SteeringVector(
        layers,
        site="resid_post",
        metadata={"model_type": model_type, "method": "repeng", "source_format": "repeng", "created": None},
    )


def from_steering_vectors(steering_vector: Any, *, num_layers: int | None = None) -> SteeringVector:
    """A `SteeringVector` (``resid_post``) from a steering-vectors ``SteeringVector``."""
    activations = getattr(steering_vector, "layer_activations", None)
    if not isinstance(activations, Mapping):
        raise TypeError(
            "steering_vector: expected a steering-vectors SteeringVector (attributes "
            f"layer_activations: dict[int, Tensor] and layer_type), got {type(steering_vector).__name__}"
        )
    layer_type = getattr(steering_vector, "layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise ValueError(
            f"steering_vector.layer_type: only 'decoder_block' vectors live on the residual stream "
            f"(resid_post); got {layer_type!r}"
        )
    layers = _resolve_layers(activations, num_layers, "steering_vector.layer_activations")
    return SteeringVector(
        layers,
        site="resid_post",
        metadata={"method": "steering-vectors", "source_format": "steering-vectors", "created": None},
    )


def to_steering_vector(obj: Any, *, num_layers: int | None = None) -> SteeringVector:
    """Whatever vector-like ``obj`` is (a `SteeringVector`, a repeng ``ControlVector``, a
    steering-vectors ``SteeringVector`` or a ``{layer: vector}`` mapping), as a `SteeringVector`."""
    if isinstance(obj, SteeringVector):
        return obj
    if hasattr(obj, "layer_activations"):
        return from_steering_vectors(obj, num_layers=num_layers)
    if hasattr(obj, "directions") and hasattr(obj, "model_type"):
        return from_repeng(obj, num_layers=num_layers)
    if isinstance(obj, Mapping):
        return SteeringVector(_resolve_layers(obj, num_layers, "vector"))
    raise TypeError(
        "vector: expected a fasteer SteeringVector, a repeng ControlVector, a steering-vectors "
        f"SteeringVector or a {{layer: tensor}} mapping, got {type(obj).__name__}"
    )


def _resid_post_directions(vector: SteeringVector) -> dict[int, torch.Tensor]:
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"vector: expected a SteeringVector, got {type(vector).__name__}")
    if vector.site == "resid_post":
        return dict(vector.items())
    if vector.site == "resid_pre":
        if 0 in vector:
            raise ValueError("vector: resid_pre[0] (the embedding output) is not the output of any layer")
        return {layer - 1: t for layer, t in vector.items()}  # resid_pre[l] == resid_post[l-1]
    raise ValueError(f"vector.site: only resid_post/resid_pre vectors can be exported, got {vector.site!r}")


def to_repeng(vector: SteeringVector, *, model_type: str | None = None):
    """A repeng ``ControlVector`` (needs ``pip install repeng``)."""
    directions = _resid_post_directions(vector)
    try:
        from repeng import ControlVector
    except ImportError as exc:
        raise ImportError("to_repeng() needs the 'repeng' package: pip install repeng") from exc
    model_type = model_type or vector.metadata.get("model_type") or vector.metadata.get("model_name") or ""
    return ControlVector(
        model_type=model_type,
        directions={layer: t.detach().to("cpu", torch.float32).numpy().astype(np.float32) for layer, t in directions.items()},
    )


def to_steering_vectors(vector: SteeringVector):
    """A steering-vectors ``SteeringVector`` (needs ``pip install steering-vectors``)."""
    directions = _resid_post_directions(vector)
    try:
        from steering_vectors import SteeringVector as SVSteeringVector
    except ImportError as exc:
        raise ImportError("to_steering_vectors() needs the 'steering-vectors' package: pip install steering-vectors") from exc
    return SVSteeringVector(
        layer_activations={layer: t.detach().clone() for layer, t in directions.items()},
        layer_type="decoder_block",
    )
