"""SAE interventions: ``FeatureEdit`` (edit a few features, error term kept) and
``SAEReplace`` (encode -> edit -> decode, with or without the error term).

How they lower (`fasteer.plan`):

* ``FeatureEdit`` on **one** feature of a ReLU / JumpReLU / linear SAE becomes one FEATURE
  edit of the fused steer+norm op: ``pre = u.h + p0`` with the SAE's folded encoder column u
  and bias p0 (b_dec and input scaling folded in, `fasteer.SAE.feature_encoder`), ``z =
  act(pre)``, ``z' = op(z)``, ``h += (z' - z) w`` with the decoder row w
  (`fasteer.SAE.feature_decoder`). Only that column and row are read, and the result equals
  the full SAE path with the error term kept, exactly (up to float32 rounding).
* ``FeatureEdit`` on **several** features edits them *jointly* -- every z_k from the same h,
  ``h' = h + sum_k (z'_k - z_k) W_dec[k]``. It lowers to k FEATURE edits of the fused op,
  the 2nd..kth marked JOINT (`fasteer.ops.layout`): they take their dot products on the row
  the first one read, so the result is the full SAE's, exactly, still reading only the k
  columns and rows, inside the carrier's one steer+norm call.
* ``FeatureEdit`` on a **TopK** SAE, and every ``SAEReplace``, lower to the full SAE op on the
  whole SAE (whether a TopK feature is active depends on all features).
Full-SAE edits run, at a site, before the other interventions there; a plan that lists
them after another intervention at the same site is refused (`fasteer.plan`).

Provenance checks (the SAE only means something where it was trained): ``layers=`` and
``site=`` default to the SAE's own; applying it at another layer or site is a ValueError
naming both places unless the intervention is built with ``allow_other_site=True`` (then it
warns, naming both); an SAE trained on a non-residual hook needs an explicit ``site=`` (and
warns); the SAE's d_in must equal the model's hidden size (checked when the plan is made,
before anything changes). ``Steerer.watch`` and ``fs.extract.fgaa`` only warn.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..interventions import Intervention, _as_layers, _as_site, _check_magnitude
from ..ops import layout as L
from ..plan import Edit, LoweringContext, SAEReplaceEdit
from .carrier import SAEWeights
from .sae import SAE

__all__ = ["FeatureEdit", "SAEReplace"]

# the op's clamp bounds must be finite: "no bound" is the largest float32
_NO_BOUND = float(torch.finfo(torch.float32).max)
OPS = tuple(L.FEATURE_OPS)


# --------------------------------------------------------------------------- checks

def _check_sae(sae) -> SAE:
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a fasteer.SAE (fs.SAE.load(...)), got {type(sae).__name__}")
    return sae


def _point(layer: int, site: str) -> tuple[str, int]:
    """The stream point a (layer, site) names: resid_post[l] is resid_pre[l + 1]."""
    if site == "resid_pre":
        return ("pre", layer)
    if site == "resid_post":
        return ("pre", layer + 1)
    return ("mid", layer)


def _trained_at(sae: SAE) -> str:
    where = f"{sae.site}[{sae.layer}]" if sae.site is not None else f"layer {sae.layer}"
    return where + (f" (hook {sae.hook_name!r})" if sae.hook_name else "")


def resolve_sae_placement(sae: SAE, layers, site, who: str, allow_other_site: bool = True
                          ) -> tuple[tuple[int, ...], str]:
    """``(layers, site)`` for an SAE intervention or watch: the SAE's own by default. When the
    caller picks another place: a warning naming both (``allow_other_site``), else a
    ValueError naming both."""

    def elsewhere_(message: str) -> None:
        if not allow_other_site:
            raise ValueError(f"layers/site: {message}; pass allow_other_site=True to {who} "
                             "to apply it there anyway")
        warnings.warn(f"{who}: {message}", UserWarning, stacklevel=5)

    layers = _as_layers(layers)
    site = _as_site(site)
    if layers is None:
        if sae.layer is None:
            raise ValueError(f"layers: the SAE does not record the layer it was trained at "
                             f"(sae.layer is None); pass layers= to {who}")
        layers = (sae.layer,)
    if sae.site is None and sae.hook_name is not None:
        # trained on a point that is not the residual stream (MLP out, attention z, ...)
        if site is None:
            raise ValueError(f"site: the SAE was trained at hook {sae.hook_name!r}, which is not "
                             f"a residual-stream site; {who} edits the residual stream "
                             "(pass site= to apply it there anyway)")
        warnings.warn(f"{who}: the SAE was trained at hook {sae.hook_name!r} (not a residual-"
                      f"stream site) but is applied at {site}{list(layers)}; its features may "
                      "mean nothing there", UserWarning, stacklevel=4)
        return layers, site
    if site is None:
        site = sae.site or "resid_post"
    if sae.site is not None and sae.layer is not None:
        trained = _point(sae.layer, sae.site)
        elsewhere = [l for l in layers if _point(l, site) != trained]
        if elsewhere:
            applied = ", ".join(f"{site}[{l}]" for l in elsewhere)
            elsewhere_(f"the SAE was trained at {_trained_at(sae)} but is applied at "
                       f"{applied}; its features may mean something else there")
    elif sae.layer is not None and any(l != sae.layer for l in layers):
        elsewhere_(f"the SAE was trained at layer {sae.layer} but is applied at layers "
                   f"{list(layers)}")
    return layers, site


def check_width(sae: SAE, hidden: int) -> None:
    if sae.d_in != hidden:
        raise ValueError(f"sae: d_in = {sae.d_in} but the model's hidden size is {hidden}; this "
                         "SAE was trained on another model (or another point of it)")


def _number(value, name: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if abs(value) > _NO_BOUND:
        raise ValueError(f"{name}: {value} does not fit in float32")
    return value


def _per_feature(value, n: int, name: str, allow_none: bool = False) -> list[float | None]:
    """A scalar for every feature, or one value per feature."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and np.ndim(value) == 1:
        value = list(value.tolist())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value or {n} values (one per feature), "
                             f"got {len(value)}")
        return [_number(v, f"{name}[{i}]", allow_none) for i, v in enumerate(value)]
    return [_number(value, name, allow_none)] * n


def _feature_ids(sae: SAE, feature) -> tuple[list[int], bool]:
    ids, scalar = sae._feature_index(feature)
    ids = [int(i) for i in ids.tolist()]
    if not ids:
        raise ValueError("feature: expected at least one feature id, got none")
    if len(set(ids)) != len(ids):
        raise ValueError(f"feature: ids must be distinct, got {ids}")
    return ids, scalar


def _op_code(op) -> int:
    if op not in L.FEATURE_OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return L.FEATURE_OPS[op]


def _op_values(op: str, value, hi, n: int) -> tuple[list[float], list[float]]:
    """(value, hi) per feature; clamp takes value=lo with hi=, or value=(lo, hi)."""
    if op != "clamp":
        if hi is not None:
            raise ValueError(f"hi: only used with op='clamp', got op={op!r}")
        if value is None:
            raise ValueError(f"value: required for op={op!r}")
        values = _per_feature(value, n, "value")
        for v in values:
            _check_magnitude(abs(v), "value", "|value|")
        return values, [0.0] * n
    if hi is None:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise ValueError("value: op='clamp' takes value=(lo, hi) or value=lo with hi= "
                             "(None for no bound)")
        value, hi = value
    lo = [(-_NO_BOUND if v is None else v) for v in _per_feature(value, n, "value", True)]
    up = [(_NO_BOUND if v is None else v) for v in _per_feature(hi, n, "hi", True)]
    for name, bounds in (("value", lo), ("hi", up)):
        for v in bounds:      # None (no bound) is stored as the float32 maximum
            if abs(v) != _NO_BOUND:
                _check_magnitude(abs(v), name, f"the clamp bound |{name}|")
    for i, (a, b) in enumerate(zip(lo, up)):
        if a > b:
            raise ValueError(f"value/hi: clamp bounds must satisfy lo <= hi, got lo={a} > "
                             f"hi={b}" + (f" for feature #{i}" if n > 1 else ""))
    return lo, up


# --------------------------------------------------------------------------- interventions

class _SAEIntervention(Intervention):
    _needs_layers = False

    def __init__(self, sae, *, layers, site, positions, when, preserve_norm,
                 allow_other_site=False):
        self.sae = _check_sae(sae)
        if not isinstance(allow_other_site, bool):
            raise TypeError(f"allow_other_site: expected a bool, got "
                            f"{type(allow_other_site).__name__}")
        layers, site = resolve_sae_placement(sae, layers, site, type(self).__name__,
                                             allow_other_site)
        super().__init__(vectors=None, layers=layers, site=site, positions=positions, when=when,
                         preserve_norm=preserve_norm)

    def lower(self, ctx: LoweringContext) -> list:
        check_width(self.sae, ctx.hidden)
        return [self._edit(l, ctx) for l in self.resolved_layers(ctx)]


class FeatureEdit(_SAEIntervention):
    """Edit SAE feature(s) in the residual stream, keeping the SAE's error term.

    ``z_k = act(enc(h))_k``, ``z'_k = op(z_k)``, ``h <- h + sum_k (z'_k - z_k) W_dec[k] / s``
    (the SAE's decode of the latent change; ``s`` its input scale), for the features ``k`` in
    ``feature`` (an id or a list of distinct ids), all computed from the same h.

    ``op``: ``"add"`` (z + value), ``"set"`` (value), ``"scale"`` (z * value) or ``"clamp"``
    (to [lo, hi]: ``value=(lo, hi)`` or ``value=lo, hi=hi``; ``None`` for no bound). ``value``
    (and ``hi``) is one number or one per feature. ``layers``/``site`` default to where the SAE
    was trained; ``positions``, ``when`` (condition on the incoming h) and ``preserve_norm`` as
    for `fasteer.Add`; both need the fused path (a ReLU / JumpReLU / linear SAE), and
    ``preserve_norm`` a single feature. ``allow_other_site=True`` lets ``layers``/``site``
    name a place the SAE was not trained at (a warning instead of a ValueError). See the
    module docstring for which path runs.

    The encoder columns and decoder rows of a fused edit are read when the edit is built.
    """

    def __init__(self, sae, feature, op: str = "add", value=None, hi=None, *, layers=None,
                 site=None, positions="all", when=None, preserve_norm: bool = False,
                 allow_other_site: bool = False):
        _check_sae(sae)
        self.features, self._scalar = _feature_ids(sae, feature)
        self.op = op
        self._op = _op_code(op)
        self.values, self.his = _op_values(op, value, hi, len(self.features))
        self.fused = sae.activation != "topk"
        if not self.fused:
            for name, given in (("when", when is not None), ("preserve_norm", preserve_norm)):
                if given:
                    raise ValueError(
                        f"{name}: FeatureEdit on a TopK SAE runs the full SAE op, which has "
                        f"no {name}; it needs a ReLU/JumpReLU/linear SAE")
        elif preserve_norm and len(self.features) > 1:
            raise ValueError(
                f"preserve_norm: FeatureEdit on {len(self.features)} features edits them "
                "jointly, and norm preservation is per single edit; use one feature, or "
                "several FeatureEdits (each then sees the previous one's result)")
        super().__init__(sae, layers=layers, site=site, positions=positions, when=when,
                         preserve_norm=preserve_norm, allow_other_site=allow_other_site)
        if self.fused:
            self._fused_features = [self._read_feature(sae, k) for k in self.features]
        else:
            self._replace = None       # built on first lowering (reads the SAE once)

    @staticmethod
    def _read_feature(sae: SAE, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(folded encoder column u, decoder row w, bias, JumpReLU threshold) of feature k."""
        enc = sae.feature_encoder(k, dtype=torch.float32)
        dec = sae.feature_decoder(k, dtype=torch.float32)
        for name, t in (("W_enc/b_enc", enc.column), ("W_enc/b_enc", enc.bias),
                        ("W_dec", dec)) + ((("threshold", enc.threshold),)
                                           if enc.threshold is not None else ()):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"sae: {name} of feature {k} contains NaN/inf; expected "
                                 "finite SAE weights")
        theta = max(float(enc.threshold), 0.0) if enc.threshold is not None else 0.0
        return (enc.column.detach().to("cpu").contiguous(), dec.detach().to("cpu").contiguous(),
                float(enc.bias), theta)

    def _replace_edit(self) -> tuple[SAEWeights, tuple]:
        if self._replace is None:
            edits = tuple((f, self._op, v, h)
                          for f, v, h in zip(self.features, self.values, self.his))
            self._replace = (SAEWeights.full(self.sae), edits)
        return self._replace

    def lower(self, ctx: LoweringContext) -> list:
        check_width(self.sae, ctx.hidden)
        if not self.fused:
            weights, edits = self._replace_edit()
            return [SAEReplaceEdit(layer=l, site=self.site, weights=weights, edits=edits,
                                   keep_error=True) for l in self.resolved_layers(ctx)]
        act = L.ACTIVATIONS[self.sae.activation]
        out = []
        for layer in self.resolved_layers(ctx):
            common = self._common(layer, ctx)
            # one FEATURE edit per feature; all but the first JOINT: every feature reads the
            # same row, so the sum of their changes is the SAE's own (module docstring)
            for i, (u, w, bias, theta) in enumerate(self._fused_features):
                out.append(Edit(kind=L.FEATURE, u=u, w=w,
                                p=(bias, theta, self.values[i], self.his[i]),
                                feature_op=self._op, activation=act, joint=i > 0, **common))
        return out

    def __repr__(self):
        feats = self.features[0] if self._scalar else self.features
        values = self.values[0] if self._scalar else self.values
        path = "fused" if self.fused else "full SAE"
        return (f"FeatureEdit(feature={feats}, op={self.op!r}, value={values}, "
                f"layers={list(self.layers)}, site={self.site!r}, path={path})")


class SAEReplace(_SAEIntervention):
    """Replace h by the SAE's decode of its edited latents: ``z = enc(h)``, ``z' = edit(z)``,
    ``h <- dec(z') + (h - dec(z))`` (``keep_error=True``) or ``h <- dec(z')``.

    ``edits``: ``{feature: value}`` (set), or a list of ``(feature, op, value)`` /
    ``(feature, "clamp", lo, hi)`` tuples applied to the latents in order (a feature may
    appear more than once); None or empty for the plain reconstruction. ``layers``/``site``
    default to where the SAE was trained (``allow_other_site=True`` to apply it elsewhere, as
    for `FeatureEdit`); ``positions`` as for `fasteer.Add`. Runs the full
    SAE op (`fasteer.ops.sae_replace_`): reads all of W_enc and W_dec for every edited token.
    """

    def __init__(self, sae, edits=None, *, keep_error: bool = True, layers=None, site=None,
                 positions="all", allow_other_site: bool = False):
        _check_sae(sae)
        if not isinstance(keep_error, bool):
            raise TypeError(f"keep_error: expected a bool, got {type(keep_error).__name__}")
        self.keep_error = keep_error
        self.edits = self._parse_edits(sae, edits)
        super().__init__(sae, layers=layers, site=site, positions=positions, when=None,
                         preserve_norm=False, allow_other_site=allow_other_site)

    @staticmethod
    def _parse_edits(sae: SAE, edits) -> tuple:
        if edits is None:
            return ()
        if isinstance(edits, Mapping):
            items = [(f, "set", v) for f, v in edits.items()]
        elif isinstance(edits, Sequence) and not isinstance(edits, (str, bytes)):
            items = list(edits)
        else:
            raise TypeError(f"edits: expected {{feature: value}} or a list of (feature, op, "
                            f"value) tuples, got {type(edits).__name__}")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) not in (3, 4):
                raise TypeError(f"edits[{i}]: expected (feature, op, value) or (feature, "
                                f"'clamp', lo, hi), got {item!r}")
            feature, op = item[0], item[1]
            ids, scalar = sae._feature_index(feature)
            if not scalar:
                raise TypeError(f"edits[{i}]: expected one feature id, got {feature!r}")
            code = _op_code(op)
            if len(item) == 4 and op != "clamp":
                raise ValueError(f"edits[{i}]: only op='clamp' takes (lo, hi), got op={op!r}")
            value, hi = (item[2], item[3]) if len(item) == 4 else (item[2], None)
            (v,), (h,) = _op_values(op, value, hi, 1)
            out.append((int(ids[0]), code, v, h))
        return tuple(out)

    def _edit(self, layer: int, ctx: LoweringContext):
        return SAEReplaceEdit(layer=layer, site=self.site, weights=SAEWeights.full(self.sae),
                              edits=self.edits, keep_error=self.keep_error)

    def __repr__(self):
        return (f"SAEReplace({len(self.edits)} edit(s), keep_error={self.keep_error}, "
                f"layers={list(self.layers)}, site={self.site!r})")
