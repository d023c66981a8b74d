"""`SAE`: a sparse autoencoder's weights, its exact math, and the metadata that decides
whether it may be used at a given point of a given model.

Why the design is what it is:

* One canonical layout for every project: ``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]``,
  ``b_dec [D]`` (SAELens' orientation, which Gemma Scope shares; sparsify's ``encoder.weight
  [F, D]`` is transposed on load).  The loaders own every format quirk; this class only knows
  the math, so the kernels and interventions have one thing to trust.
* The encoder is written as the composition the projects actually run::

      x    = h                                   (cast to the SAE's dtype)
      x    = s * x          if normalize_activations == "expected_average_only_in"
      x    = x - b_dec      if apply_b_dec_to_input
      pre  = x @ W_enc + b_enc                    # [.., F]
      z    = act(pre)                             # relu | jumprelu | topk | linear
      out  = (z @ W_dec + b_dec) / s              # decode; "/ s" only when normalizing

  with ``act`` one of

  - ``relu``:     ``z = max(pre, 0)``
  - ``jumprelu``: ``z = max(pre, 0) * [pre > threshold]``  (SAELens and Gemma Scope both; SAELens
    v6 compares against ``relu(threshold)``, which gives the same z for every input because a
    negative threshold only admits pre values whose ReLU is 0 anyway)
  - ``topk``:     keep the k largest ``pre`` per token, ReLU them, zero the rest (SAELens
    ``TopK``: topk then ReLU; sparsify: ReLU then topk -- identical dense output, because ReLU is
    monotone and only reorders values that end up 0)
  - ``linear``:   ``z = pre``

  The constructor validates everything once (shapes, finiteness, flags), so nothing downstream
  re-checks.
* Only normalizations that keep the pre-activation an *affine function of h* are accepted
  ("none" and "expected_average_only_in" with its scale s).  That is what lets
  `feature_encoder` fold b_dec and s into one column and one bias, so a fused kernel computes a
  feature's pre-activation from the raw residual with a single dot product.  SAELens'
  "constant_norm_rescale" and "layer_norm" rescale each token by its own norm/statistics and
  make ``decode`` depend on hidden state of the last ``encode``; they are refused with a clear
  error instead of being approximated.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .formats.hooks import SITES, parse_hook_name

ACTIVATIONS = ("relu", "jumprelu", "topk", "linear")
NORMALIZATIONS = ("none", "expected_average_only_in")
_UNSUPPORTED_NORMALIZATIONS = {
    "constant_norm_rescale": "rescales every token to norm sqrt(d_in) and undoes it in decode with "
    "that token's own factor",
    "layer_norm": "centers and standardizes every token with its own mean and std and undoes it in "
    "decode",
    "constant_scalar_rescale": "is specific to SAELens' temporal SAEs",
    "covariance_whitening": "whitens inputs with a mean and a matrix that SAELens' trainer folds into "
    "the weights at the end of training (a file still saying so was saved before folding)",
}


class FeatureEncoder(NamedTuple):
    """Per-feature encoder in folded form: ``pre_k(h) = column_k . h + bias_k`` on the *raw* h.

    ``column`` is [D] for one feature or [K, D] for several, ``bias`` a 0-d or [K] tensor,
    ``threshold`` the JumpReLU thresholds (same shape as ``bias``) or None, ``activation`` the
    SAE's activation name.
    """

    column: torch.Tensor
    bias: torch.Tensor
    threshold: torch.Tensor | None
    activation: str


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got dtype=object")
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_finite(name: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: contains {bad} NaN/inf value(s); expected finite weights")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class SAE:
    """A sparse autoencoder with its exact encode/decode math and provenance.

    Parameters
    ----------
    W_enc, b_enc, W_dec, b_dec:
        ``[D, F]``, ``[F]``, ``[F, D]``, ``[D]`` floating tensors (or numpy arrays).
    activation:
        ``"relu"``, ``"jumprelu"`` (needs ``threshold [F]``), ``"topk"`` (needs ``k``, 1 <= k <= F)
        or ``"linear"``.
    apply_b_dec_to_input:
        subtract ``b_dec`` from the input before encoding (SAELens' flag; sparsify always does,
        Gemma Scope never does).
    normalize_activations, norm_scaling_factor:
        ``"none"``, or ``"expected_average_only_in"`` with the scale ``s`` the SAE was trained with
        (inputs multiplied by ``s`` before encoding, outputs divided by ``s`` after decoding).
    model_name, hook_name, layer, site:
        where the SAE was trained.  ``hook_name`` is the project's original string; ``layer`` and
        ``site`` (``resid_pre``/``resid_mid``/``resid_post`` or None for non-residual points) are
        parsed from it when both are left as None.
    source_format:
        ``"saelens"``, ``"gemma_scope"``, ``"sparsify"`` or ``"fasteer"`` (built in memory).
    source:
        where the weights came from (local folder or hub id); informative, not saved.
    metadata:
        JSON-able extras (dataset, context size, the source folder, ...).
    device, dtype:
        where and in which dtype to hold the weights; default: those of ``W_enc``.

    Raises ``ValueError``/``TypeError`` naming the argument on any inconsistency: shapes, NaN/inf
    in a tensor, unknown activation, JumpReLU without threshold, k out of range, unsupported
    normalization, a site without a layer.
    """

    def __init__(
        self,
        W_enc: Any,
        b_enc: Any,
        W_dec: Any,
        b_dec: Any,
        *,
        activation: str = "relu",
        threshold: Any = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        normalize_activations: str = "none",
        norm_scaling_factor: float | None = None,
        model_name: str | None = None,
        hook_name: str | None = None,
        layer: int | None = None,
        site: str | None = None,
        source_format: str = "fasteer",
        source: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # -- activation and its parameters -------------------------------------------------
        if not isinstance(activation, str):
            raise TypeError(f"activation: expected a string, got {type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; expected one of {', '.join(ACTIVATIONS)}")

        W_enc = _as_tensor("W_enc", W_enc)
        b_enc = _as_tensor("b_enc", b_enc)
        W_dec = _as_tensor("W_dec", W_dec)
        b_dec = _as_tensor("b_dec", b_dec)
        if W_enc.dim() != 2:
            raise ValueError(f"W_enc: expected a 2-D tensor [d_in, d_sae], got shape {_shape(W_enc)}")
        d_in, d_sae = W_enc.shape
        if d_in == 0 or d_sae == 0:
            raise ValueError(f"W_enc: expected non-empty [d_in, d_sae], got shape {_shape(W_enc)}")
        if _shape(b_enc) != [d_sae]:
            raise ValueError(
                f"b_enc: expected shape [d_sae] = [{d_sae}] (W_enc is [{d_in}, {d_sae}]), got {_shape(b_enc)}"
                + (" -- is W_enc stored transposed?" if _shape(b_enc) == [d_in] else "")
            )
        if _shape(W_dec) != [d_sae, d_in]:
            raise ValueError(
                f"W_dec: expected shape [d_sae, d_in] = [{d_sae}, {d_in}], got {_shape(W_dec)}"
                + (" -- it looks transposed" if _shape(W_dec) == [d_in, d_sae] else "")
            )
        if _shape(b_dec) != [d_in]:
            raise ValueError(f"b_dec: expected shape [d_in] = [{d_in}], got {_shape(b_dec)}")

        if activation == "jumprelu":
            if threshold is None:
                raise ValueError("threshold: a JumpReLU SAE needs a per-feature threshold [d_sae]")
            threshold = _as_tensor("threshold", threshold)
            if _shape(threshold) != [d_sae]:
                raise ValueError(f"threshold: expected shape [d_sae] = [{d_sae}], got {_shape(threshold)}")
        elif threshold is not None:
            raise ValueError(f"threshold: only a JumpReLU SAE has thresholds; activation is {activation!r}")

        if activation == "topk":
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"k: a TopK SAE needs an integer k, got {k!r}")
            k = int(k)
            if not 1 <= k <= d_sae:
                raise ValueError(f"k: expected 1 <= k <= d_sae = {d_sae}, got {k}")
        elif k is not None:
            raise ValueError(f"k: only a TopK SAE has k; activation is {activation!r}")

        # -- flags ------------------------------------------------------------------------
        if not isinstance(apply_b_dec_to_input, (bool, np.bool_)):
            raise TypeError(f"apply_b_dec_to_input: expected a bool, got {apply_b_dec_to_input!r}")
        normalize_activations = _check_normalization(normalize_activations)
        if normalize_activations == "expected_average_only_in":
            if isinstance(norm_scaling_factor, bool) or not isinstance(norm_scaling_factor, numbers.Real):
                raise ValueError(
                    "norm_scaling_factor: normalize_activations='expected_average_only_in' needs the "
                    f"scale the SAE was trained with (a positive float), got {norm_scaling_factor!r}"
                )
            norm_scaling_factor = float(norm_scaling_factor)
            if not (math.isfinite(norm_scaling_factor) and norm_scaling_factor > 0):
                raise ValueError(f"norm_scaling_factor: expected a finite positive float, got {norm_scaling_factor}")
        elif norm_scaling_factor is not None:
            raise ValueError(
                "norm_scaling_factor: only used with normalize_activations='expected_average_only_in'"
            )

        # -- provenance -------------------------------------------------------------------
        for name, value in (("model_name", model_name), ("hook_name", hook_name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: expected a string or None, got {type(value).__name__}")
        if layer is None and site is None and hook_name:
            layer, site = parse_hook_name(hook_name)
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise ValueError(f"layer: expected a non-negative int or None, got {layer!r}")
            layer = int(layer)
        if site is not None:
            if site not in SITES:
                raise ValueError(f"site: expected one of {', '.join(SITES)} or None, got {site!r}")
            if layer is None:
                raise ValueError(f"site: {site!r} needs a layer; layer is None")
        if not isinstance(source_format, str):
            raise TypeError(f"source_format: expected a string, got {type(source_format).__name__}")
        if source is not None and not isinstance(source, str):
            raise TypeError(f"source: expected a string or None, got {type(source).__name__}")
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata: expected JSON-serializable values ({e})") from e

        # -- placement: one dtype and device for every tensor --------------------------------
        target_dtype = dtype if dtype is not None else W_enc.dtype
        if not isinstance(target_dtype, torch.dtype) or not target_dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {target_dtype!r}")
        target_device = torch.device(device) if device is not None else W_enc.device

        def place(name: str, t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=target_device, dtype=target_dtype).contiguous()
            _check_finite(name, t)  # after the cast: catches overflow to inf in fp16 too
            return t

        self.W_enc = place("W_enc", W_enc)
        self.b_enc = place("b_enc", b_enc)
        self.W_dec = place("W_dec", W_dec)
        self.b_dec = place("b_dec", b_dec)
        self.threshold = place("threshold", threshold) if threshold is not None else None
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.norm_scaling_factor = norm_scaling_factor
        self.model_name = model_name
        self.hook_name = hook_name
        self.layer = layer
        self.site = site
        self.source_format = source_format
        self.source = source
        self.metadata = meta

    # ---------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def input_scale(self) -> float:
        """``s``: the factor inputs are multiplied by before encoding (1.0 without normalization)."""
        return self.norm_scaling_factor if self.norm_scaling_factor is not None else 1.0

    # ---------------------------------------------------------------- math
    def _check_input(self, name: str, x: Any, width: int, width_name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != width:
            raise ValueError(
                f"{name}: expected last dimension {width_name} = {width}, got shape {list(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(f"{name}: is on {x.device} but the SAE is on {self.device}; move one of them")
        return x.to(self.dtype)

    def pre_activation(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``[..., d_sae]`` of residual vectors ``h [..., d_in]``.

        Step by step (in the SAE's dtype):
          1. ``x = h``
          2. ``x = s * x``       when ``normalize_activations == "expected_average_only_in"``
          3. ``x = x - b_dec``   when ``apply_b_dec_to_input``
          4. ``pre = x @ W_enc + b_enc``
        """
        x = self._check_input("h", h, self.d_in, "d_in")
        if self.norm_scaling_factor is not None:
            x = x * self.norm_scaling_factor
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Apply the SAE's activation to pre-activations ``[..., d_sae]``.

        relu: ``max(pre, 0)``; jumprelu: ``max(pre, 0) * [pre > threshold]``; topk: the k largest
        entries of each row, ReLU'd, everything else 0; linear: ``pre``.
        """
        pre = self._check_input("pre", pre, self.d_sae, "d_sae")
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.activation == "topk":
            values, indices = torch.topk(pre, self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        return pre

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Latents ``z [..., d_sae] = act(pre_activation(h))`` -- see `pre_activation`, `activate`."""
        return self.activate(self.pre_activation(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` of latents ``z [..., d_sae]``.

          1. ``out = z @ W_dec + b_dec``
          2. ``out = out / s``   when ``normalize_activations == "expected_average_only_in"``
        """
        z = self._check_input("z", z, self.d_sae, "d_sae")
        out = z @ self.W_dec + self.b_dec
        if self.norm_scaling_factor is not None:
            out = out / self.norm_scaling_factor
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``decode(encode(h))``: the SAE's reconstruction of ``h``."""
        return self.decode(self.encode(h))

    __call__ = forward

    def error(self, h: torch.Tensor) -> torch.Tensor:
        """The reconstruction error ``h - forward(h)`` (in the SAE's dtype).

        Keeping it makes SAE edits exact: ``h' = decode(z') + error(h)`` equals ``h`` when ``z' = z``.
        """
        return self._check_input("h", h, self.d_in, "d_in") - self.forward(h)

    # ---------------------------------------------------------------- per-feature (fused kernels)
    def _feature_index(self, feature: Any) -> tuple[torch.Tensor, bool]:
        """Validate feature ids; return (LongTensor of ids, is_scalar)."""
        if isinstance(feature, bool):
            raise TypeError(f"feature: expected an int or a sequence of ints, got {feature!r}")
        if isinstance(feature, numbers.Integral):
            ids, scalar = torch.tensor([int(feature)]), True
        elif isinstance(feature, torch.Tensor):
            if feature.dim() > 1 or feature.is_floating_point() or feature.dtype == torch.bool:
                raise TypeError(f"feature: expected a 0-D/1-D integer tensor, got {feature.dtype} {list(feature.shape)}")
            ids, scalar = feature.reshape(-1).to("cpu", torch.long), feature.dim() == 0
        elif isinstance(feature, Iterable) and not isinstance(feature, (str, bytes)):
            items = list(feature)
            if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
                raise TypeError(f"feature: expected integers, got {items!r}")
            ids, scalar = torch.tensor([int(i) for i in items], dtype=torch.long), False
        else:
            raise TypeError(f"feature: expected an int or a sequence of ints, got {type(feature).__name__}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.d_sae):
            bad = [int(i) for i in ids if not 0 <= int(i) < self.d_sae]
            raise ValueError(f"feature: ids {bad[:5]} out of range; expected 0 <= id < d_sae = {self.d_sae}")
        return ids.to(self.device), scalar

    def _folded_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        # fp16/bf16 SAEs hand out fp32 folded vectors: kernels accumulate in fp32 anyway and the
        # folded bias b_enc - b_dec . W_enc is a sum of D products worth keeping in full precision.
        return dtype if dtype is not None else torch.promote_types(self.dtype, torch.float32)

    def feature_encoder(self, feature: Any, *, dtype: torch.dtype | None = None) -> FeatureEncoder:
        """Encoder of feature(s) ``k`` folded so ``pre_k(h) = column_k . h + bias_k`` on the raw h.

        Derivation (``s`` = input scale, ``a`` = 1 if ``apply_b_dec_to_input`` else 0)::

            pre_k(h) = sum_d W_enc[d, k] * (s * h_d - a * b_dec[d]) + b_enc[k]
                     = (s * W_enc[:, k]) . h  +  (b_enc[k] - a * b_dec . W_enc[:, k])
                       '---- column_k ----'      '----------- bias_k -------------'

        computed in float64, returned in ``dtype`` (default: the SAE's dtype, at least float32).
        Then ``z_k = act(pre_k)`` exactly for relu / jumprelu (``threshold_k``) / linear SAEs; for
        TopK, ``pre_k`` is right but whether k is kept depends on every other feature.
        ``feature`` is an int (column [D], bias 0-d) or a sequence of ints (column [K, D], bias [K]).
        """
        ids, scalar = self._feature_index(feature)
        out_dtype = self._folded_dtype(dtype)
        W = self.W_enc.index_select(1, ids).to(torch.float64)  # [D, K]
        column = (W * self.input_scale).T  # [K, D]
        bias = self.b_enc.index_select(0, ids).to(torch.float64)
        if self.apply_b_dec_to_input:
            bias = bias - self.b_dec.to(torch.float64) @ W
        threshold = self.threshold.index_select(0, ids) if self.threshold is not None else None
        column, bias = column.to(out_dtype), bias.to(out_dtype)
        threshold = threshold.to(out_dtype) if threshold is not None else None
        if scalar:
            column, bias = column[0], bias[0]
            threshold = threshold[0] if threshold is not None else None
        return FeatureEncoder(column.contiguous(), bias, threshold, self.activation)

    def feature_decoder(self, feature: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """How the reconstruction moves per unit of ``z_k``: ``W_dec[k] / s`` ([D], or [K, D]).

        Because ``decode(z) = (z @ W_dec + b_dec) / s`` is linear in z, changing ``z_k`` by ``dz``
        changes the output (and, with the error term kept, the residual) by ``dz * W_dec[k] / s``.
        """
        ids, scalar = self._feature_index(feature)
        rows = self.W_dec.index_select(0, ids).to(torch.float64) / self.input_scale
        rows = rows.to(self._folded_dtype(dtype)).contiguous()
        return rows[0] if scalar else rows

    # ---------------------------------------------------------------- conversions
    def _replace(self, **changes: Any) -> "SAE":
        fields = dict(
            W_enc=self.W_enc, b_enc=self.b_enc, W_dec=self.W_dec, b_dec=self.b_dec,
            activation=self.activation, threshold=self.threshold, k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            normalize_activations=self.normalize_activations,
            norm_scaling_factor=self.norm_scaling_factor, model_name=self.model_name,
            hook_name=self.hook_name, layer=self.layer, site=self.site,
            source_format=self.source_format, source=self.source, metadata=self.metadata,
        )
        fields.update(changes)
        return SAE(**fields)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SAE":
        """An SAE on ``device`` / in ``dtype``; like ``Tensor.to``, ``self`` when nothing changes."""
        if isinstance(device, torch.dtype) and dtype is None:  # sae.to(torch.float16)
            device, dtype = None, device
        new_device = torch.device(device) if device is not None else self.device
        new_dtype = dtype if dtype is not None else self.dtype
        if new_device == self.device and new_dtype == self.dtype:
            return self
        return self._replace(device=new_device, dtype=new_dtype)

    def fold_normalization(self) -> "SAE":
        """An equivalent SAE with ``normalize_activations="none"`` (the scale folded into weights).

        ``W_enc * s``, ``W_dec / s``, ``b_dec / s`` (computed in float64): encode and decode agree
        with this SAE up to rounding -- what SAELens' ``fold_activation_norm_scaling_factor`` does,
        and what a file must contain for SAELens' ``load_from_disk`` (which ignores the scale).
        """
        if self.norm_scaling_factor is None:
            return self
        s = self.norm_scaling_factor

        def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
            return (t.to(torch.float64) * factor).to(self.dtype)

        return self._replace(
            W_enc=scaled(self.W_enc, s), W_dec=scaled(self.W_dec, 1.0 / s), b_dec=scaled(self.b_dec, 1.0 / s),
            normalize_activations="none", norm_scaling_factor=None,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under SAELens' names (``threshold`` only for JumpReLU)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    # ---------------------------------------------------------------- files
    @classmethod
    def load(
        cls,
        path_or_hub_id: str | Path,
        *,
        subfolder: str | None = None,
        hook: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm_scaling_factor: float | None = None,
        format: str | None = None,
        revision: str | None = None,
    ) -> "SAE":
        """Load an SAE from a local path or a Hugging Face Hub repository, detecting the format.

        Formats (from the files present): SAELens (``cfg.json`` + ``sae_weights.safetensors``),
        Gemma Scope (``params.npz``), EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``).
        ``subfolder`` (alias ``hook``) picks one SAE inside a folder/repo holding several (a
        sparsify hookpoint such as ``"layers.6"``, a Gemma Scope path such as
        ``"layer_20/width_16k/average_l0_71"``); a hub id may also carry it as
        ``"owner/repo/sub/folder"``.  ``norm_scaling_factor`` supplies the scale of an SAELens
        SAE saved with ``normalize_activations="expected_average_only_in"``.  ``format`` forces
        ``"saelens"``, ``"gemma_scope"`` or ``"sparsify"``.  A path that does not exist locally
        and looks like ``owner/name`` is downloaded with ``huggingface_hub`` (only the needed
        folder).
        """
        from .formats.detect import load_sae

        return load_sae(
            path_or_hub_id, subfolder=subfolder, hook=hook, device=device, dtype=dtype,
            norm_scaling_factor=norm_scaling_factor, format=format, revision=revision,
        )

    def save(self, path: str | Path) -> Path:
        """Write SAELens format into folder ``path``: ``cfg.json`` + ``sae_weights.safetensors``.

        `load` reads it back bit for bit; SAELens reads the same key and tensor names.  Returns
        the folder.  See `fasteer.sae.formats.saelens.save_saelens` for the exact keys.
        """
        from .formats.saelens import save_saelens

        return save_saelens(self, path)

    # ---------------------------------------------------------------- display
    def __repr__(self) -> str:
        extra = ""
        if self.activation == "topk":
            extra = f", k={self.k}"
        where = f"{self.site}[{self.layer}]" if self.site else (self.hook_name or "unknown site")
        return (
            f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}, "
            f"apply_b_dec_to_input={self.apply_b_dec_to_input}, "
            f"normalize_activations={self.normalize_activations!r}, at {where}, "
            f"model={self.model_name!r}, format={self.source_format!r}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _check_normalization(value: Any) -> str:
    if value is None or value is False:  # SAELens: None and False both mean "none"
        return "none"
    if not isinstance(value, str):
        raise TypeError(f"normalize_activations: expected a string, got {value!r}")
    if value in NORMALIZATIONS:
        return value
    if value in _UNSUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"normalize_activations: {value!r} is not supported: it {_UNSUPPORTED_NORMALIZATIONS[value]}, "
            "so a feature's pre-activation is not an affine function of the residual and fasteer's "
            "exact per-feature edits cannot be computed; supported: " + ", ".join(NORMALIZATIONS)
        )
    raise ValueError(
        f"normalize_activations: unknown {value!r}; expected one of {', '.join(NORMALIZATIONS)}"
    )
