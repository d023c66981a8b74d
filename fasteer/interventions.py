"""Interventions: what to do to the residual stream, independent of how it is carried.

``Add(v, alpha)``, ``Clamp(u, value)``, ``Ablate(u)``, ``Scale(s)`` each describe an edit
of the residual stream at some layers and one site, restricted to some token positions
(``positions=``) and optionally to tokens passing a condition (``when=Cosine(...)``).
They know nothing of models or kernels: each one validates its arguments when it is
built, and lowers (`lower`) to `fasteer.plan.Edit` entries once the model's layer count
and hidden size are known. The SAE feature edits lower through the same protocol.

A vector argument is a tensor ``[D]`` (the same vector at every listed layer), a
``{layer: tensor}`` dict, or a steering vector object with ``.directions`` (a
``{layer: tensor}`` dict) and ``.site`` (`fasteer.SteeringVector`); ``layers=`` defaults
to the vector's own layers and ``site=`` to the vector's site (else ``"resid_post"``).
Directions of ``Clamp``/``Ablate`` are normalised here, on the host, so the kernels
read unit vectors. ``Add(v, alpha, scale="resid")`` is resolved here too: each layer's
vector becomes ``resid_norm[l] * v / |v|`` (the vector's metadata), so ``alpha`` is a
fraction of a typical activation whatever extractor made ``v``.

Magnitudes are bounded: an edit that moves the stream by more than ``MAX_MAGNITUDE``
(1e15) -- ``|alpha| * max|v|`` for ``Add``, ``|value|`` for ``Clamp``, ``|factor|`` for
``Scale`` -- is refused when built, because the model's own float32 norm of such a row
overflows (non-finite logits); half-precision models overflow far earlier (float16 at
65504), which is not checked. A ``Cosine`` condition's vector must be non-zero.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .ops import layout as L
from .plan import MAX_POSITIONS, POSITION_RULES, Edit, LoweredCondition, LoweringContext
from .sites import SITES

__all__ = ["Intervention", "Add", "Clamp", "Ablate", "Scale", "DynScale", "Condition",
           "Cosine", "Projection"]


# --------------------------------------------------------------------------- argument checks

# Largest edit size accepted (see the module docstring): past it the squared norm of an
# edited row overflows float32 for hidden sizes up to 65536 (sqrt(3.4e38 / 65536) ~ 7e16).
MAX_MAGNITUDE = 1e15


def _check_magnitude(size: float, name: str, what: str) -> None:
    if not size <= MAX_MAGNITUDE:
        raise ValueError(f"{name}: {what} is {size:.3g}, beyond the {MAX_MAGNITUDE:.0e} fasteer "
                         "accepts (the model's norm of the edited row would overflow float32)")


def _as_vector(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name}: expected a numeric vector, got a numpy object array")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [D], got {type(value).__name__}")
    if value.dim() != 1 or value.numel() == 0:
        raise ValueError(f"{name}: expected a 1-D vector [D], got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real vector, got dtype {value.dtype}")
    v = value.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return v


def _as_number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _as_layers(layers, name: str = "layers") -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise TypeError(f"{name}: expected an int or an iterable of ints, got bool")
    if isinstance(layers, numbers.Integral):
        layers = (int(layers),)
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        layers = tuple(layers)
    else:
        raise TypeError(f"{name}: expected an int or an iterable of ints, got {type(layers).__name__}")
    out = []
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, numbers.Integral):
            raise TypeError(f"{name}: expected ints, got {l!r}")
        if l < 0:
            raise ValueError(f"{name}: expected layer indices >= 0, got {int(l)}")
        out.append(int(l))
    if not out:
        raise ValueError(f"{name}: expected at least one layer, got none")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: layer indices must be distinct, got {out}")
    return tuple(out)


def _as_positions(positions):
    if isinstance(positions, str):
        if positions not in POSITION_RULES:
            raise ValueError(f"positions: expected one of {POSITION_RULES} or a bool mask "
                             f"[batch, prompt_len], got {positions!r}")
        return positions
    if isinstance(positions, np.ndarray):
        positions = torch.from_numpy(np.ascontiguousarray(positions))
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions: expected a rule name {POSITION_RULES} or a bool tensor, "
                        f"got {type(positions).__name__}")
    if positions.dim() not in (1, 2) or positions.numel() == 0:
        raise ValueError(f"positions: expected a mask [batch, prompt_len] or [prompt_len], "
                         f"got shape {tuple(positions.shape)}")
    if positions.dtype != torch.bool:
        if positions.is_floating_point() or positions.is_complex() or \
                not bool(((positions == 0) | (positions == 1)).all()):
            raise TypeError(f"positions: expected a bool (or 0/1 integer) mask, got dtype "
                            f"{positions.dtype}")
        positions = positions != 0
    return positions.detach().to("cpu")


def _as_site(site) -> str | None:
    if site is None:
        return None
    if site not in SITES:
        raise ValueError(f"site: expected one of {SITES}, got {site!r}")
    return site


class _Vectors:
    """A vector argument: one tensor, a {layer: tensor} dict, or a steering-vector object."""

    def __init__(self, value, name: str):
        self.name = name
        self.site = None
        self.single: torch.Tensor | None = None
        self.per_layer: dict[int, torch.Tensor] | None = None
        if isinstance(value, (torch.Tensor, np.ndarray)):
            self.single = _as_vector(value, name)
            return
        if isinstance(value, Mapping):
            mapping = value
        elif isinstance(getattr(value, "directions", None), Mapping):
            mapping = value.directions
            self.site = getattr(value, "site", None)
            if self.site is not None and self.site not in SITES:
                raise ValueError(f"{name}.site: expected one of {SITES}, got {self.site!r}")
        else:
            raise TypeError(f"{name}: expected a tensor [D], a {{layer: tensor}} dict or a "
                            f"SteeringVector, got {type(value).__name__}")
        if not mapping:
            raise ValueError(f"{name}: has no layers")
        self.per_layer = {}
        width = None
        for layer, v in mapping.items():
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise TypeError(f"{name}: layer keys must be ints >= 0, got {layer!r}")
            t = _as_vector(v, f"{name}[{int(layer)}]")
            if width is not None and t.numel() != width:
                raise ValueError(f"{name}[{int(layer)}]: expected width {width} like the other "
                                 f"layers, got {t.numel()}")
            width = t.numel()
            self.per_layer[int(layer)] = t

    @property
    def layers(self) -> tuple[int, ...] | None:
        return None if self.per_layer is None else tuple(sorted(self.per_layer))

    def at(self, layer: int, hidden: int) -> torch.Tensor:
        if self.single is not None:
            v = self.single
        else:
            if layer not in self.per_layer:
                raise ValueError(f"{self.name}: has no vector for layer {layer} (it has layers "
                                 f"{list(self.layers)})")
            v = self.per_layer[layer]
        if v.numel() != hidden:
            raise ValueError(f"{self.name}: expected width {hidden} (the model's hidden size), "
                             f"got {v.numel()}")
        return v


def _unit(v: torch.Tensor, name: str) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v.double())
    if not norm > 0:
        raise ValueError(f"{name}: direction has zero norm")
    return (v.double() / norm).float()


# --------------------------------------------------------------------------- conditions

class Condition:
    """A per-token test on the stream as it enters the site; the edit applies if it passes."""
    kind: int = L.COND_NONE

    def __init__(self, vector, threshold, *, bias=0.0, below: bool = False):
        self.vector = _Vectors(vector, "when.vector")
        self.threshold = _as_number(threshold, "when.threshold")
        self.bias = _as_number(bias, "when.bias")
        if self.kind == L.COND_COSINE:
            vectors = ([self.vector.single] if self.vector.single is not None else
                       list(self.vector.per_layer.values()))
            for v in vectors:
                if not float((v * v).sum()) > 0:      # float32, as the kernels compute it
                    raise ValueError("when.vector: a Cosine condition's vector is zero (or too "
                                     "small to normalise in float32); the cosine with a zero "
                                     "vector is undefined")
        if not isinstance(below, bool):
            raise TypeError(f"when.below: expected a bool, got {type(below).__name__}")
        self.below = below

    def lower(self, layer: int, hidden: int) -> LoweredCondition:
        c = self.vector.at(layer, hidden)
        if self.below:
            # x <= t  <=>  -x >= -t, and both tests are linear in c: negate c, t and bias.
            return LoweredCondition(self.kind, -c, -self.threshold, -self.bias)
        return LoweredCondition(self.kind, c, self.threshold, self.bias)


class Cosine(Condition):
    """Passes when cos(h, c) >= threshold (``below=True``: cos(h, c) <= threshold)."""
    kind = L.COND_COSINE

    def __init__(self, vector, threshold, *, below: bool = False):
        super().__init__(vector, threshold, below=below)
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"when.threshold: a cosine threshold must lie in [-1, 1], "
                             f"got {self.threshold}")

    def __repr__(self):
        return f"Cosine(threshold={self.threshold}, below={self.below})"


class Projection(Condition):
    """Passes when h . c + bias >= threshold (``below=True``: <= threshold)."""
    kind = L.COND_PROJ

    def __repr__(self):
        return f"Projection(threshold={self.threshold}, bias={self.bias}, below={self.below})"


# --------------------------------------------------------------------------- interventions

class Intervention:
    """Base class: layers, site, position rule, condition; `lower` makes the edits."""

    _needs_layers = True

    def __init__(self, *, vectors: _Vectors | None, layers, site, positions, when,
                 preserve_norm):
        self._vectors = vectors
        self.layers = _as_layers(layers)
        if self.layers is None and vectors is not None:
            self.layers = vectors.layers
        if self.layers is None and self._needs_layers:
            raise ValueError(f"layers: required for {type(self).__name__} when the vector is a "
                             "single tensor (e.g. layers=range(8, 16))")
        explicit_site = _as_site(site)
        vec_site = vectors.site if vectors is not None else None
        self.site = explicit_site or vec_site or "resid_post"
        self.positions = _as_positions(positions)
        if when is not None and not isinstance(when, Condition):
            raise TypeError(f"when: expected a fasteer condition (Cosine, Projection), got "
                            f"{type(when).__name__}")
        self.when = when
        if not isinstance(preserve_norm, bool):
            raise TypeError(f"preserve_norm: expected a bool, got {type(preserve_norm).__name__}")
        self.preserve_norm = preserve_norm

    def resolved_layers(self, ctx: LoweringContext) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else tuple(range(ctx.n_layers))
        bad = [l for l in layers if l >= ctx.n_layers]
        if bad:
            raise ValueError(f"layers: {bad} out of range 0..{ctx.n_layers - 1} (the model has "
                             f"{ctx.n_layers} layers)")
        return layers

    def _edit(self, layer: int, ctx: LoweringContext) -> Edit:  # pragma: no cover - abstract
        raise NotImplementedError

    def lower(self, ctx: LoweringContext) -> list[Edit]:
        return [self._edit(l, ctx) for l in self.resolved_layers(ctx)]

    def _common(self, layer: int, ctx: LoweringContext) -> dict:
        cond = None if self.when is None else self.when.lower(layer, ctx.hidden)
        return dict(layer=layer, site=self.site, preserve_norm=self.preserve_norm, condition=cond)

    def __repr__(self):
        extra = "" if self.when is None else f", when={self.when!r}"
        pos = self.positions if isinstance(self.positions, str) else "mask"
        return (f"{type(self).__name__}(layers={list(self.layers) if self.layers else 'all'}, "
                f"site={self.site!r}, positions={pos!r}{extra})")


def _split_positions(value, name: str):
    """Per-position vectors: a [P, D] tensor or a {layer: [P, D]} mapping -> (a value
    `_Vectors` accepts: each layer's first row, only for checks; {layer or None: [P, D]}),
    or (value, None) when ``value`` holds 1-D vectors."""
    def two_d(t):
        return isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 2
    if two_d(value):
        rows = _as_rows_tensor(value, name)
        return rows[0], {None: rows}
    if isinstance(value, Mapping) and value and all(two_d(v) for v in value.values()):
        rows = {k: _as_rows_tensor(v, f"{name}[{k}]") for k, v in value.items()}
        return {k: r[0] for k, r in rows.items()}, rows
    return value, None


def _as_rows_tensor(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to("cpu", torch.float32)
    if t.shape[0] == 0 or t.shape[0] > MAX_POSITIONS:
        raise ValueError(f"{name}: expected 1..{MAX_POSITIONS} per-position vectors [P, D], "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return t.contiguous()


ADD_SCALES = ("raw", "resid")


class Add(Intervention):
    """h <- h + alpha * v (CAA, instruction vectors, FGAA).

    ``scale`` says what ``alpha`` measures:

    * ``"raw"`` (default): ``h + alpha * v`` with ``v`` as stored. What one unit is depends
      on the extractor: a CAA vector is the raw difference of means (``alpha=1`` adds the
      mean difference, often tens of residual units long), pca / instruction / ablation
      vectors and FGAA's ``mapping="effect"`` are unit vectors (``alpha=8`` adds a vector
      of length 8, often invisible next to activations of norm 50-500), FGAA's
      ``mapping="decoder"`` keeps the decoded contrast's own scale.
    * ``"resid"``: ``h + alpha * n_l * v_l / |v_l|`` at each layer ``l``, with ``n_l`` the
      median L2 norm of the residual stream there (the vector's metadata ``resid_norm``,
      which every `fasteer.extract` method records): ``alpha`` is a fraction of a typical
      activation (``alpha=0.1`` adds a vector 10% as long), the same meaning for every
      extractor. Resolved here, when the intervention is built (the kernels see a plain
      ADD edit). It needs a `fasteer.SteeringVector` with ``resid_norm`` for every steered
      layer (``vec.with_resid_norm(model, tok, prompts)`` or re-extract with this fasteer),
      steered at the vector's own site; per-position vectors and zero vectors are refused.

    ``vector`` may also hold *per-position* vectors: a [P, D] tensor (or a
    ``{layer: [P, D]}`` mapping) adds row i to the prompt token at index i of its row
    (counting real tokens from 0, like per-position `Scale` factors); prompt tokens past
    P-1 and generated tokens are left alone. The SteerVec baseline of activation scaling
    (`fasteer.extract.scaling`) applies this way.
    """

    def __init__(self, vector, alpha=1.0, *, layers=None, site=None, positions="all", when=None,
                 preserve_norm: bool = False, scale: str = "raw"):
        self.alpha = _as_number(alpha, "alpha")
        if not isinstance(scale, str) or scale not in ADD_SCALES:
            raise ValueError(f"scale: expected one of {ADD_SCALES}, got {scale!r}")
        self.scale = scale
        source = vector
        vector, self._per_position = _split_positions(vector, "vector")
        if scale == "resid" and self._per_position is not None:
            raise ValueError("scale: 'resid' is not defined for per-position vectors [P, D]; "
                             "scale them yourself and use scale='raw'")
        vectors = _Vectors(vector, "vector")
        if scale == "resid":
            _resid_scaled(vectors, source, layers, site)
        if self._per_position is not None:
            vectors_all = list(self._per_position.values())
            _check_magnitude(abs(self.alpha) * max(float(v.abs().max()) for v in vectors_all),
                             "alpha", "|alpha| * max|vector|")
            if not (isinstance(positions, str) and positions in ("all", "prompt")):
                raise ValueError("positions: per-position vectors add to prompt tokens by their "
                                 "index; use positions='prompt' (or 'all')")
        largest = max(float(v.abs().max()) for v in
                      ([vectors.single] if vectors.single is not None else
                       vectors.per_layer.values()))
        _check_magnitude(abs(self.alpha) * largest, "alpha", "|alpha| * max|vector|")
        super().__init__(vectors=vectors, layers=layers, site=site,
                         positions=positions, when=when, preserve_norm=preserve_norm)

    def _edit(self, layer, ctx):
        return Edit(kind=L.ADD, u=self._vectors.at(layer, ctx.hidden), p=(self.alpha,),
                    **self._common(layer, ctx))

    def lower(self, ctx: LoweringContext) -> list[Edit]:
        if self._per_position is None:
            return super().lower(ctx)
        edits = []
        for layer in self.resolved_layers(ctx):
            rows = self._per_position.get(layer, self._per_position.get(None))
            self._vectors.at(layer, ctx.hidden)          # checks the width
            common = self._common(layer, ctx)
            edits.extend(Edit(kind=L.ADD, u=rows[i], p=(self.alpha,), position=i, **common)
                         for i in range(rows.shape[0]) if bool(rows[i].any()))
        return edits


def _resid_scaled(vectors: _Vectors, source, layers, site) -> None:
    """Replace ``vectors``' per-layer vectors by ``resid_norm[l] * v_l / |v_l|`` (float64
    arithmetic, float32 result) for ``Add(..., scale="resid")``; raises before anything is
    built when the norms are missing."""
    how = ("re-extract the vector with this fasteer (every fs.extract method records "
           "metadata 'resid_norm'), or attach them: vec = vec.with_resid_norm(model, tokenizer, "
           "prompts) (fs.extract.resid_norms measures {layer: median norm}) or "
           "vec.with_resid_norm({layer: norm})")
    meta = getattr(source, "metadata", None)
    if vectors.per_layer is None or not isinstance(getattr(source, "directions", None), Mapping) \
            or not isinstance(meta, Mapping):
        raise ValueError("scale: 'resid' needs a fasteer.SteeringVector whose metadata holds "
                         f"resid_norm (a plain tensor or dict has no residual norms); {how}")
    stored = meta.get("resid_norm")
    if not isinstance(stored, Mapping):
        raise ValueError(f"scale: 'resid': the vector's metadata has no resid_norm; {how}")
    norms = _as_layer_values(stored, "vector.metadata['resid_norm']")
    steered = _as_layers(layers) or vectors.layers
    missing = [l for l in steered if l not in norms]
    if missing:
        raise ValueError(f"scale: 'resid': the vector's resid_norm has no norm for layers "
                         f"{missing} (it has layers {sorted(norms)}); {how}")
    explicit = _as_site(site)
    if explicit is not None and vectors.site is not None and explicit != vectors.site:
        raise ValueError(f"site: scale='resid' uses the norms measured at the vector's site "
                         f"{vectors.site!r}; steering at {explicit!r} would use another point's "
                         "norm (leave site= out, or use scale='raw')")
    for l in steered:
        if l not in vectors.per_layer:
            continue                 # `_Vectors.at` reports the missing vector when lowering
        n = norms[l]
        if not n > 0:
            raise ValueError(f"vector.metadata['resid_norm'][{l}]: expected a norm > 0, got {n}")
        v = vectors.per_layer[l].double()
        length = torch.linalg.vector_norm(v)
        if not length > 0:
            raise ValueError(f"vector[{l}]: zero vector; scale='resid' needs a direction")
        vectors.per_layer[l] = (v * (n / length)).float()


def _as_layer_values(value, name: str) -> dict[int, float]:
    """A ``{layer: number}`` mapping (keys ints, or digit strings as stored in metadata)."""
    out = {}
    for key, v in value.items():
        if isinstance(key, str) and key.isascii() and key.isdigit():
            layer = int(key)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool) and key >= 0:
            layer = int(key)
        else:
            raise TypeError(f"{name}: layer keys must be ints >= 0, got {key!r}")
        if layer in out:
            raise ValueError(f"{name}: layer {layer} given twice")
        out[layer] = _as_number(v, f"{name}[{layer}]")
    if not out:
        raise ValueError(f"{name}: has no layers")
    return out


class Clamp(Intervention):
    """h <- h + (c - h.u) u with u = direction / |direction|: pins the projection to c.

    ``value`` is one number for every layer, or a ``{layer: c}`` mapping (what
    ``u, c = fs.extract.instruction(...)`` returns as ``c``). Left out, the targets come
    from the vector's metadata ``clamp_targets`` (stored by ``fs.extract.instruction``),
    so ``fs.Clamp(fs.SteeringVector.load("instr.safetensors"))`` works too."""

    def __init__(self, direction, value=None, *, layers=None, site=None, positions="all",
                 when=None, preserve_norm: bool = False):
        if value is None:
            stored = (getattr(direction, "metadata", None) or {}).get("clamp_targets")
            if not isinstance(stored, Mapping):
                raise ValueError("value: required (a number or a {layer: value} mapping) unless "
                                 "the direction is a SteeringVector whose metadata holds "
                                 "clamp_targets (as fs.extract.instruction stores)")
            value, value_name = stored, "direction.metadata['clamp_targets']"
        else:
            value_name = "value"
        if isinstance(value, Mapping):
            self.value = _as_layer_values(value, value_name)
            for layer, c in self.value.items():
                _check_magnitude(abs(c), f"{value_name}[{layer}]", "|value|")
        else:
            self.value = _as_number(value, value_name)
            _check_magnitude(abs(self.value), value_name, "|value|")
        super().__init__(vectors=_Vectors(direction, "direction"), layers=layers, site=site,
                         positions=positions, when=when, preserve_norm=preserve_norm)
        if isinstance(self.value, dict) and self.layers is not None:
            missing = [l for l in self.layers if l not in self.value]
            if missing:
                raise ValueError(f"{value_name}: has no target for layers {missing} (it has "
                                 f"layers {sorted(self.value)})")

    def value_at(self, layer: int) -> float:
        if isinstance(self.value, dict):
            if layer not in self.value:
                raise ValueError(f"value: has no target for layer {layer} (it has layers "
                                 f"{sorted(self.value)})")
            return self.value[layer]
        return self.value

    def _edit(self, layer, ctx):
        u = _unit(self._vectors.at(layer, ctx.hidden), f"direction[{layer}]")
        return Edit(kind=L.CLAMP, u=u, p=(self.value_at(layer),), **self._common(layer, ctx))


class Ablate(Intervention):
    """h <- h - (h.u) u with u = direction / |direction| (directional ablation)."""

    def __init__(self, direction, *, layers=None, site=None, positions="all", when=None,
                 preserve_norm: bool = False):
        super().__init__(vectors=_Vectors(direction, "direction"), layers=layers, site=site,
                         positions=positions, when=when, preserve_norm=preserve_norm)

    def _edit(self, layer, ctx):
        u = _unit(self._vectors.at(layer, ctx.hidden), f"direction[{layer}]")
        return Edit(kind=L.ABLATE, u=u, **self._common(layer, ctx))


def _as_factors(value, name: str):
    """A number, or a 1-D sequence/tensor of per-position factors (float64 list)."""
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) and not (
            isinstance(value, torch.Tensor) and value.dim() == 0):
        t = torch.as_tensor(np.asarray(value) if isinstance(value, (list, tuple)) else value)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name}: expected a number or a 1-D sequence of per-position "
                             f"factors [P], got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or
                                                           t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected real factors, got dtype {t.dtype}")
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or inf")
        if t.numel() > MAX_POSITIONS:
            raise ValueError(f"{name}: {t.numel()} per-position factors; fasteer supports up to "
                             f"{MAX_POSITIONS} prompt positions")
        _check_magnitude(float(t.abs().max()), name, "max |factor|")
        return [float(x) for x in t]
    f = _as_number(value, name)
    _check_magnitude(abs(f), name, "|factor|")
    return f


class Scale(Intervention):
    """h <- factor * h (activation scaling, Stoehr et al. 2024); ``layers=None`` scales
    every layer.

    ``factor`` is a number; or a 1-D sequence of *per-position* factors ``[P]``: the
    prompt token at index i of its row (counting real tokens from 0 -- the position id,
    so left padding does not shift it) is scaled by ``factor[i]``, prompt tokens past
    index P-1 and generated tokens are left alone (``positions`` must then be "prompt"
    or "all"); or a ``{layer: number or [P]}`` mapping (what a learned
    `fasteer.extract.scaling.ActivationScaling` holds). Per-position factors take one
    slot per index (patch with ``slots >= P`` when arming ahead for CUDA graphs); the
    kernels run the plain SCALE edit.
    """

    _needs_layers = False

    def __init__(self, factor, *, layers=None, site=None, positions="all", when=None,
                 preserve_norm: bool = False):
        if isinstance(factor, Mapping):
            if not factor:
                raise ValueError("factor: has no layers")
            self.factor = {}
            for layer, f in factor.items():
                if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                    raise TypeError(f"factor: layer keys must be ints >= 0, got {layer!r}")
                self.factor[int(layer)] = _as_factors(f, f"factor[{int(layer)}]")
            if layers is None:
                layers = sorted(self.factor)
        else:
            self.factor = _as_factors(factor, "factor")
        super().__init__(vectors=None, layers=layers, site=site, positions=positions, when=when,
                         preserve_norm=preserve_norm)
        if isinstance(self.factor, dict):
            missing = [l for l in self.layers if l not in self.factor]
            if missing:
                raise ValueError(f"factor: has no factor for layers {missing} (it has layers "
                                 f"{sorted(self.factor)})")
        if self._indexed and not (isinstance(self.positions, str) and
                                  self.positions in ("all", "prompt")):
            raise ValueError("positions: per-position factors scale prompt tokens by their "
                             "index; use positions='prompt' (or 'all')")

    @property
    def _indexed(self) -> bool:
        values = self.factor.values() if isinstance(self.factor, dict) else [self.factor]
        return any(isinstance(f, list) for f in values)

    def _factor_at(self, layer: int):
        return self.factor[layer] if isinstance(self.factor, dict) else self.factor

    def lower(self, ctx: LoweringContext) -> list[Edit]:
        edits = []
        for layer in self.resolved_layers(ctx):
            f = self._factor_at(layer)
            common = self._common(layer, ctx)
            if isinstance(f, list):
                edits.extend(Edit(kind=L.SCALE, p=(x,), position=i, **common)
                             for i, x in enumerate(f) if x != 1.0)
            else:
                edits.append(Edit(kind=L.SCALE, p=(f,), **common))
        return edits


class DynScale(Intervention):
    """h <- (bias + w.h) * h: a scale factor that is a linear function of the activation
    itself (DynScalar of Stoehr et al. 2024, where h(1 + beta (w'.h + b')) is this with
    w = beta w' and bias = 1 + beta b'). Works at any prompt length (no position index).

    ``weight`` is a tensor [D] or a ``{layer: tensor}`` mapping (not normalised: the dot
    product is with the raw vector); ``bias`` a number or ``{layer: number}``. Lowers to
    the DYN_SCALE edit of `fasteer.ops.layout`, one fused pass like every other edit.
    """

    def __init__(self, weight, bias=1.0, *, layers=None, site=None, positions="all",
                 when=None, preserve_norm: bool = False):
        if isinstance(bias, Mapping):
            self.bias = _as_layer_values(bias, "bias")
        else:
            self.bias = _as_number(bias, "bias")
        for b in (self.bias.values() if isinstance(self.bias, dict) else [self.bias]):
            _check_magnitude(abs(b), "bias", "|bias|")
        super().__init__(vectors=_Vectors(weight, "weight"), layers=layers, site=site,
                         positions=positions, when=when, preserve_norm=preserve_norm)
        if isinstance(self.bias, dict):
            missing = [l for l in self.layers if l not in self.bias]
            if missing:
                raise ValueError(f"bias: has no value for layers {missing}")

    def _edit(self, layer, ctx):
        b = self.bias[layer] if isinstance(self.bias, dict) else self.bias
        return Edit(kind=L.DYN_SCALE, u=self._vectors.at(layer, ctx.hidden), p=(b, 1.0),
                    **self._common(layer, ctx))
