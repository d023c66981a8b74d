"""The SAE-TS effect approximator: a linear model of what a steering vector does to every
SAE feature, and the targeted steering vectors built from it.

Sources (formulas checked against the authors' code, github.com/slavachalnev/SAE-TS,
``ft_effects/multi_gpu.py``, ``ft_effects/utils.py``, ``ft_effects/train.py`` and
``baselines/analysis.py``; no code copied):

* Chalnev, Siu, Conmy 2024, "Improving Steering Vectors by Targeting Sparse Autoencoder
  Features" (arXiv 2411.02193), SAE-TS.  The *effect* of a steering vector ``s`` is
  ``e(s) = mean SAE latents of text generated with s added  -  the same mean for text
  generated without steering``, both measured by re-running the generated text *unsteered*
  and encoding the residual stream at the SAE's site.  A linear *effect approximator*
  ``M(s) = s W + b`` (``W`` [d_model, d_sae], ``b`` [d_sae]) is fitted to (s, e(s)) pairs
  by mean squared error.  The SAE-TS steering vector for a target ``t`` in SAE space is
  ``unit(unit(W t) - c * unit(W b))`` with ``c = 1`` (``single_step_steer``).
* Soo et al. 2025, "Interpretable Steering of Large Language Models with Feature Guided
  Activation Additions" (arXiv 2501.09929), FGAA: the filtered top-k contrast
  ``v_target`` is mapped to the residual stream with the same approximator
  (`fasteer.extract.fgaa` with ``mapping="effect"``).

What fasteer does differently from the SAE-TS code, and why:

* The fit is closed-form (ridge) least squares in float64 on the CPU instead of Adam on
  mini-batches: the MSE problem is convex and the exact minimiser is cheaper and
  reproducible.  ``ridge=0`` is plain least squares (minimum-norm when rank deficient).
* SAE-TS steers every vector at its own scale (the one that brings the LM loss to a
  target) and trains on the *unit* directions; fasteer uses one ``scale`` for all vectors
  and keeps ``s`` in residual units (``M`` then predicts the effect of adding ``s``
  itself).  With one scale the two fits differ only by a positive factor in ``W``, so
  the targeted vectors (which are unit-normalised) are the same.
* SAE-TS averages latents over all positions of fixed 32-token samples (BOS and prompt
  included); fasteer averages over the *generated* tokens only (the prompt's latents are
  the same with and without steering in the unsteered re-run, so they only dilute the
  effect) and subtracts the baseline *of the same prompt* (lower variance; the same as
  SAE-TS when every prompt is used equally often).
* Steering directions: SAE-TS measured the effects of (unit) SAE decoder rows, and tried
  random combinations of two rows and Gaussian directions.  fasteer draws a
  ``decoder_fraction`` (default one half) of SAE decoder rows -- the directions SAE-TS
  targets live near them -- and the rest as isotropic Gaussian directions, which make the
  least-squares problem well posed over the whole residual space.
* Sampling follows SAE-TS's generation settings (top_k=50, top_p=0.3, temperature 1, no
  stop at EOS), with fasteer's own seeded sampler: every generated row draws its uniforms
  from its own generator, so the result does not depend on ``batch_size``.

How steering is applied while measuring: a forward (pre-)hook on the module that carries
the site (`fasteer.sites`) adds row b's own vector ``S[b]`` to row b's real tokens, in
place, at every position (prompt and generated, as SAE-TS's hook does) -- the same edit
as ``fs.Add(S[b], 1.0)`` on a pre-norm carrier, without fasteer's slot tables: this is a
measurement, not the product path, and a hand-written decode loop with one distinct
vector per row is simplest and easiest to check this way.  The re-run reads the stream
with `fasteer.sae.site_reader.PointReader` and stops the forward after the site.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._files import FileFormatError, atomic_write, load_safetensors, loads_json
from .._version import __version__
from ..sae import SAE
from ..sae.site_reader import PointReader
from ..sites import STREAM_SITES, model_sites
from ..vectors import SteeringVector
from .activations import _model_device, _pad_id, check_prompts, encode_prompts, pad_batch

__all__ = ["EffectApproximator", "EffectMeasurement", "fit_effect_approximator", "fit_effect_map",
           "measure_effects", "targeted_vector", "row_uniforms"]

FORMAT_VERSION = "1"
# ridge values fit_effect_approximator chooses from (relative to the mean eigenvalue of the
# vectors' covariance). One 32-token sample per vector is noisy: with ~2000 vectors in 576
# dimensions, 1e-4 (nearly plain least squares) fitted the noise on SmolLM2 (held-out
# pooled R^2 -0.40, mean cosine 0.22).
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
REQUIRED_KEYS = ("d_model", "d_sae", "layer", "site")


# ----------------------------------------------------------------------- small checks
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _pos_int(name: str, x, minimum: int = 1) -> int:
    if not _is_int(x) or x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return int(x)


def _real(name: str, x, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    x = float(x)
    if (x < lo or (lo_open and x == lo)) or (x > hi or (hi_open and x == hi)):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: expected a number in {lb}{lo}, {hi}{rb}, got {x!r}")
    return x


def _unit(v: torch.Tensor, what: str, allow_zero: bool = False) -> torch.Tensor:
    n = float(v.norm())
    if not n > 0 or not math.isfinite(n):
        if allow_zero:
            return torch.zeros_like(v)
        raise ValueError(f"{what} is zero (or not finite): nothing to normalise")
    return v / n


# ------------------------------------------------------------------------ the model
class EffectApproximator:
    """``M(s) = s W + b``: the predicted change of every SAE feature's mean activation on
    generated text when ``s`` is added to the residual stream at ``site[layer]``.

    ``W`` float32 [d_model, d_sae], ``b`` float32 [d_sae]; ``metadata``: a JSON-able dict
    (model, SAE, scale, number of vectors, seed, held-out R^2 and cosine, date, ...).
    Made by `fit_effect_approximator`; saved with `save`, read back with `load`.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, *, layer: int, site: str,
                 metadata: dict | None = None):
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise ValueError(f"W: expected a float tensor [d_model, d_sae], got "
                             f"{getattr(W, 'shape', type(W).__name__)}")
        if not isinstance(b, torch.Tensor) or b.shape != (W.shape[1],) or not b.is_floating_point():
            raise ValueError(f"b: expected a float tensor [d_sae] = [{W.shape[1]}], got "
                             f"{getattr(b, 'shape', type(b).__name__)}")
        if not bool(torch.isfinite(W).all()) or not bool(torch.isfinite(b).all()):
            raise ValueError("W/b: contain NaN or inf")
        if not _is_int(layer) or layer < 0:
            raise ValueError(f"layer: expected a layer index >= 0, got {layer!r}")
        if site not in STREAM_SITES:
            raise ValueError(f"site: expected one of {STREAM_SITES}, got {site!r}")
        self.W = W.detach().to("cpu", torch.float32).contiguous()
        self.b = b.detach().to("cpu", torch.float32).contiguous()
        self.layer, self.site = int(layer), site
        meta = dict(metadata or {})
        json.dumps(meta)  # must be JSON-able: fail here, not at save time
        meta.update(d_model=self.d_model, d_sae=self.d_sae, layer=self.layer, site=self.site)
        self.metadata = meta
        self.measurement = None      # set by fit_effect_approximator (never saved)

    @property
    def d_model(self) -> int:
        return int(self.W.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W.shape[1])

    def __repr__(self):
        m = self.metadata
        r2 = m.get("r2_pooled")
        return (f"EffectApproximator({self.site}[{self.layer}], d_model={self.d_model}, "
                f"d_sae={self.d_sae}, n_vectors={m.get('n_vectors')}, held-out R2={r2})")

    def predict(self, s: torch.Tensor) -> torch.Tensor:
        """``s W + b`` for steering vectors ``s`` [..., d_model] (residual units, the scale
        they would be added at) -> predicted effects [..., d_sae] (float32, on s's device)."""
        if not isinstance(s, torch.Tensor) or s.dim() < 1 or s.shape[-1] != self.d_model:
            raise ValueError(f"s: expected a tensor [..., d_model] = [..., {self.d_model}], got "
                             f"{getattr(s, 'shape', type(s).__name__)}")
        W, b = self.W.to(s.device), self.b.to(s.device)
        return s.to(torch.float32) @ W + b

    # -- files ------------------------------------------------------------------------------
    def save(self, path, *, dtype: torch.dtype = torch.float32) -> Path:
        """One ``.safetensors`` file: tensors ``W`` [D, F] and ``b`` [F] (float32, or
        float16 with ``dtype=torch.float16`` -- half the size, for shipping; `load` returns
        float32 either way); the header's ``__metadata__`` holds ``fasteer_effects`` (format
        version) and ``header``, a JSON object with the metadata (``d_model``, ``d_sae``,
        ``layer``, ``site`` required)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path: expected a file name ending in .safetensors, got {str(path)!r}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype: expected torch.float32 or torch.float16, got {dtype!r}")
        if dtype == torch.float16:
            big = float(max(self.W.abs().max(), self.b.abs().max()))
            if big > float(torch.finfo(torch.float16).max):
                raise ValueError(f"dtype: a weight of magnitude {big:.3g} does not fit float16")
        from safetensors.torch import save_file
        meta = {"fasteer_effects": FORMAT_VERSION, "header": json.dumps(self.metadata)}
        tensors = {"W": self.W.to(dtype).contiguous(), "b": self.b.to(dtype).contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    @classmethod
    def load(cls, path) -> "EffectApproximator":
        """Read a file written by `save`; every field is checked (`fasteer.FileFormatError`
        naming the field otherwise), nothing is unpickled."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such effect-approximator file: {str(path)!r}")
        meta, tensors = load_safetensors(path, allowed_dtypes={"F32": 4, "F16": 2})
        if meta.get("fasteer_effects") is None:
            raise FileFormatError(path, "fasteer_effects", "missing from the header's __metadata__ "
                                  "(not a file written by EffectApproximator.save)")
        if meta["fasteer_effects"] != FORMAT_VERSION:
            raise FileFormatError(path, "fasteer_effects", f"format version "
                                  f"{meta['fasteer_effects']!r}; this fasteer reads {FORMAT_VERSION!r}")
        if "header" not in meta:
            raise FileFormatError(path, "header", "missing from the header's __metadata__")
        header = loads_json(meta["header"], path, "header")
        if not isinstance(header, dict):
            raise FileFormatError(path, "header", "expected a JSON object")
        for key in REQUIRED_KEYS:
            if key not in header:
                raise FileFormatError(path, f"header.{key}", "missing")
        for key in ("d_model", "d_sae", "layer"):
            if not _is_int(header[key]) or header[key] < (0 if key == "layer" else 1):
                raise FileFormatError(path, f"header.{key}", f"expected a non-negative int, got "
                                      f"{header[key]!r}")
        if header["site"] not in STREAM_SITES:
            raise FileFormatError(path, "header.site", f"expected one of {STREAM_SITES}, got "
                                  f"{header['site']!r}")
        if set(tensors) != {"W", "b"}:
            raise FileFormatError(path, "tensors", f"expected ['W', 'b'], got {sorted(tensors)}")
        D, F = header["d_model"], header["d_sae"]
        for name, want in (("W", (D, F)), ("b", (F,))):
            t = tensors[name]
            if tuple(t.shape) != want:
                raise FileFormatError(path, f"tensor {name!r}", f"shape {tuple(t.shape)}, expected "
                                      f"{want} from the header")
            if not bool(torch.isfinite(t).all()):
                raise FileFormatError(path, f"tensor {name!r}", "contains NaN or inf")
        return cls(tensors["W"], tensors["b"], layer=header["layer"], site=header["site"],
                   metadata=header)

    def check_sae(self, sae: SAE, layer: int | None = None, site: str | None = None,
                  who: str = "approximator") -> None:
        """ValueError unless this approximator was fitted for ``sae``'s width at
        ``site[layer]``."""
        if (sae.d_in, sae.d_sae) != (self.d_model, self.d_sae):
            raise ValueError(f"{who}: fitted for d_model={self.d_model}, d_sae={self.d_sae}, but "
                             f"the SAE has d_in={sae.d_in}, d_sae={sae.d_sae}")
        if layer is not None and (layer, site) != (self.layer, self.site):
            raise ValueError(f"{who}: fitted at {self.site}[{self.layer}], but the vector is "
                             f"built for {site}[{layer}]")


# ---------------------------------------------------------------------- the regression
def _ridges(ridge) -> list[float]:
    """``ridge`` as a non-empty list of values (a number, or a sequence to choose from)."""
    if isinstance(ridge, (list, tuple)):
        if not ridge:
            raise ValueError("ridge: expected a number or a non-empty list of numbers, got []")
        values = [_real("ridge", r, 0.0, math.inf) for r in ridge]
        if len(set(values)) != len(values):
            raise ValueError(f"ridge: values must be distinct, got {list(ridge)}")
        return values
    return [_real("ridge", ridge, 0.0, math.inf)]


def _ridge_solve(X: torch.Tensor, Y: torch.Tensor, ridge: float):
    """(W, b) minimising |Xc W - Yc|^2 + lam |W|^2, lam = ridge * trace(Xc^T Xc) / D."""
    D = X.shape[1]
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    if ridge > 0:
        G = Xc.T @ Xc
        lam = ridge * float(torch.trace(G)) / D
        if lam <= 0:
            lam = ridge
        W = torch.linalg.solve(G + lam * torch.eye(D, dtype=torch.float64), Xc.T @ Yc)
    else:
        W = torch.linalg.lstsq(Xc, Yc, driver="gelsd").solution
    return W, ym - xm @ W


def _r2(Y: torch.Tensor, P: torch.Tensor) -> float:
    """Pooled R^2 = 1 - SSE/SST over every entry, SST about the per-feature means of Y."""
    sst = float(((Y - Y.mean(0)) ** 2).sum())
    return 1.0 - float(((Y - P) ** 2).sum()) / sst if sst > 0 else float("nan")


def fit_effect_map(S: torch.Tensor, effects: torch.Tensor, *, ridge=0.0,
                   held_out: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit ``effects ~ S W + b`` by (ridge) least squares in float64.

    ``S`` [N, D] steering vectors, ``effects`` [N, F].  A seeded random ``held_out``
    fraction of the rows (at least one when ``held_out > 0``) is left out of the fit and
    scored.  On the training rows, with ``Xc = S - mean(S)``, ``Yc = effects - mean``:
    ``W = argmin |Xc W - Yc|^2 + lam |W|^2`` with ``lam = ridge * trace(Xc^T Xc) / D``
    (``ridge`` is relative to the mean eigenvalue, so it is scale-free; ``ridge=0``: the
    minimum-norm least-squares solution), ``b = mean(effects) - mean(S) W``. ``ridge`` may
    be a list: each value is fitted on 90% of the training rows and scored (pooled R^2) on
    the other 10% (seeded; the held-out rows are never used), and the best one is refitted
    on all training rows (``ridge_chosen``, ``ridge_validation_r2`` in the metrics).

    Returns ``(W [D, F], b [F], metrics)`` (float64); metrics: ``n_train``, ``n_held_out``,
    ``r2_pooled = 1 - SSE/SST`` over every held-out entry (SST about the held-out
    per-feature means), ``r2_mean_feature`` (the mean per-feature R^2 over features whose
    held-out variance is above 1e-12 of the largest), ``n_features_varying`` and
    ``mean_cosine`` (mean cosine between predicted and measured held-out effect vectors,
    rows with a zero vector skipped); None where there is nothing held out.
    """
    if not isinstance(S, torch.Tensor) or S.dim() != 2:
        raise ValueError(f"S: expected a tensor [N, d_model], got {getattr(S, 'shape', type(S).__name__)}")
    if not isinstance(effects, torch.Tensor) or effects.dim() != 2 or effects.shape[0] != S.shape[0]:
        raise ValueError(f"effects: expected a tensor [N, d_sae] with N = {S.shape[0]}, got "
                         f"{getattr(effects, 'shape', type(effects).__name__)}")
    ridges = _ridges(ridge)
    held_out = _real("held_out", held_out, 0.0, 1.0, hi_open=True)
    X = S.detach().to("cpu", torch.float64)
    Y = effects.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(X).all()) or not bool(torch.isfinite(Y).all()):
        raise ValueError("S/effects: contain NaN or inf")
    N, D = X.shape
    n_held = 0 if held_out == 0 else max(1, int(round(held_out * N)))
    if N - n_held < 1:
        raise ValueError(f"held_out: {held_out} of {N} vectors leaves none to fit on")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(N, generator=g)
    test, train = order[:n_held], order[n_held:]
    validation: dict[str, float] = {}
    if len(ridges) == 1:
        ridge = ridges[0]
    else:
        # choose the ridge on an inner validation split of the training rows (never the
        # held-out ones), then refit on all training rows with it
        if len(train) < 4:
            raise ValueError(f"ridge: choosing among {len(ridges)} values needs at least 4 "
                             f"training vectors, got {len(train)}")
        n_val = max(1, len(train) // 10)
        inner = train[torch.randperm(len(train), generator=g)]
        val, fit_rows = inner[:n_val], inner[n_val:]
        for r in ridges:
            Wr, br = _ridge_solve(X[fit_rows], Y[fit_rows], r)
            validation[repr(r)] = _r2(Y[val], X[val] @ Wr + br)
        ridge = max(ridges, key=lambda r: validation[repr(r)])
    W, b = _ridge_solve(X[train], Y[train], ridge)
    metrics: dict[str, Any] = {"n_train": int(len(train)), "n_held_out": int(n_held),
                               "ridge_chosen": ridge, "ridge_validation_r2": validation or None,
                               "r2_pooled": None, "r2_mean_feature": None,
                               "n_features_varying": None, "mean_cosine": None}
    if n_held:
        Yh = Y[test]
        P = X[test] @ W + b
        sse_f = ((Yh - P) ** 2).sum(0)
        sst_f = ((Yh - Yh.mean(0)) ** 2).sum(0)
        sst = float(sst_f.sum())
        metrics["r2_pooled"] = (1.0 - float(sse_f.sum()) / sst) if sst > 0 else None
        varying = sst_f > 1e-12 * float(sst_f.max()) if sst > 0 else torch.zeros_like(sst_f, dtype=torch.bool)
        metrics["n_features_varying"] = int(varying.sum())
        if bool(varying.any()):
            metrics["r2_mean_feature"] = float((1.0 - sse_f[varying] / sst_f[varying]).mean())
        pn, yn = P.norm(dim=1), Yh.norm(dim=1)
        ok = (pn > 0) & (yn > 0)
        if bool(ok.any()):
            cos = (P[ok] * Yh[ok]).sum(1) / (pn[ok] * yn[ok])
            metrics["mean_cosine"] = float(cos.mean())
    return W, b, metrics


# ---------------------------------------------------------------------- generation
def row_uniforms(seed: int, stream: int, index: int, n: int) -> torch.Tensor:
    """The ``n`` uniforms [0, 1) (float64) that generated row ``index`` of ``stream``
    (0: steered rows, numbered vector * samples_per_vector + sample; 1: baseline rows,
    numbered prompt * baseline_samples + sample) uses, one per generated token."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(stream) * 2_147_483_647
                                       + int(index)) % (2 ** 63))
    return torch.rand(n, generator=g, dtype=torch.float64)


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, *, temperature: float,
                  top_k: int | None, top_p: float) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with uniforms ``u`` [B]: softmax of
    ``logits / temperature`` (float64), keep the ``top_k`` most likely tokens and then the
    shortest prefix (by descending probability, ties in token order) whose mass reaches
    ``top_p``, renormalise, return the first token whose cumulative mass exceeds ``u``."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    V = p.shape[-1]
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None and top_k < V:
        keep[:, top_k:] = False
    p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    if top_p < 1.0:
        mass = p / p.sum(-1, keepdim=True)
        before = mass.cumsum(-1) - mass                   # mass of the strictly better tokens
        p = torch.where(before < top_p, p, torch.zeros((), dtype=p.dtype, device=p.device))
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    pick = torch.searchsorted(cdf, u.to(cdf.device, cdf.dtype).reshape(-1, 1).contiguous(),
                              right=True)
    pick = pick.clamp(max=V - 1)
    return idx.gather(-1, pick).squeeze(-1)


class _RowAdd:
    """Adds ``vectors[b]`` to row b's real tokens at one stream point, in place."""

    def __init__(self, point):
        self.point = point
        self.vectors: torch.Tensor | None = None    # [B, D]
        self.gate: torch.Tensor | None = None       # [B, T] of the current forward
        if point.kind in ("norm", "input"):
            self.handle = point.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = point.module.register_forward_hook(self._post)

    def _edit(self, h):
        if self.vectors is None or not isinstance(h, torch.Tensor):
            return
        add = self.vectors.to(h.dtype).unsqueeze(1) * self.gate.to(h.dtype).unsqueeze(-1)
        h.add_(add)

    def _pre(self, module, args, kwargs):
        self._edit(args[0] if args else kwargs.get("hidden_states"))

    def _post(self, module, args, output):
        self._edit(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self):
        self.handle.remove()


class _SiteRead(Exception):
    pass


@dataclass
class EffectMeasurement:
    """What `measure_effects` measured."""
    vectors: torch.Tensor          # float32 [N, D]: the steering vectors, residual units
    effects: torch.Tensor          # float64 [N, F]: mean steered latents - same-prompt baseline
    baseline: torch.Tensor         # float64 [P, F]: mean unsteered latents per prompt
    steered: torch.Tensor          # float64 [N, F]: mean steered latents (before subtracting)
    n_tokens: int                  # generated tokens encoded (steered + baseline)
    info: dict = field(default_factory=dict)


def _check_model_free(model: nn.Module) -> None:
    import importlib
    _patch = importlib.import_module("fasteer.patch")
    sites = model_sites(model)
    st = _patch._PATCHED.get(sites.layers)
    if st is not None and st.patched and st.requests:
        raise ValueError("model: fasteer steering is set on this model (fs.patch / fs.steer); "
                         "effects are measured against the unsteered model -- st.clear() first")


def _prepare(model, tokenizer, sae, layer, site, batch_size):
    from .fgaa import _prepare as fgaa_prepare
    return fgaa_prepare(model, tokenizer, sae, layer, site, batch_size, None)


def _sampling_args(max_new_tokens, samples_per_vector, baseline_samples, temperature, top_k,
                   top_p, seed, progress):
    max_new_tokens = _pos_int("max_new_tokens", max_new_tokens)
    samples_per_vector = _pos_int("samples_per_vector", samples_per_vector)
    baseline_samples = _pos_int("baseline_samples", baseline_samples)
    temperature = _real("temperature", temperature, 0.0, math.inf, lo_open=True)
    if top_k is not None:
        top_k = _pos_int("top_k", top_k)
    top_p = _real("top_p", top_p, 0.0, 1.0, lo_open=True)
    if not _is_int(seed):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    return max_new_tokens, samples_per_vector, baseline_samples, temperature, top_k, top_p, int(seed)


@torch.inference_mode()
def _generate_and_encode(model, sae, sites, key, encoded, rows, vectors, *, pad_id,
                         max_new_tokens, temperature, top_k, top_p, seed, batch_size, bar):
    """For each row (stream, index, prompt, vector-or-None): generate ``max_new_tokens``
    tokens with the row's vector added at ``key``, re-run the sequence unsteered up to the
    site, and return the mean SAE latents over the generated tokens, float64 [R, F]."""
    device = _model_device(model)
    sae_here = sae.to(device)
    params = inspect.signature(model.forward).parameters
    accepts_positions = "position_ids" in params
    # transformers 5.x renamed past_key_values to cache (the old name still works, deprecated)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    point = sites.points[key]
    out = torch.zeros(len(rows), sae.d_sae, dtype=torch.float64)
    D = sites.hidden
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        B = len(chunk)
        ids, mask = pad_batch([encoded[r[2]] for r in chunk], pad_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        U = torch.stack([row_uniforms(seed, r[0], r[1], max_new_tokens) for r in chunk])
        V = torch.zeros(B, D, dtype=torch.float32)
        steered = False
        for i, r in enumerate(chunk):
            if r[3] is not None:
                V[i] = vectors[r[3]]
                steered = True
        hook = _RowAdd(point) if steered else None
        try:
            if hook is not None:
                hook.vectors = V.to(device)
            past = None
            cur_ids, cur_mask = ids, mask
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cur_pos = pos
            new_tokens = []
            for t in range(max_new_tokens):
                kwargs: dict[str, Any] = {"input_ids": cur_ids, "attention_mask": cur_mask,
                                          "use_cache": True}
                if past is not None:
                    kwargs[cache_arg] = past
                if accepts_positions:
                    kwargs["position_ids"] = cur_pos
                if hook is not None:
                    hook.gate = cur_mask[:, -cur_ids.shape[1]:]
                res = model(**kwargs)
                past = res.get("cache", None)
                if past is None:
                    past = res.get("past_key_values", None)
                if past is None:
                    raise RuntimeError("the model returned no KV cache with use_cache=True; "
                                       "measure_effects needs one to generate")
                nxt = sample_tokens(res.logits[:, -1, :], U[:, t], temperature=temperature,
                                    top_k=top_k, top_p=top_p).to(device)
                new_tokens.append(nxt)
                cur_ids = nxt.unsqueeze(-1)
                cur_mask = torch.cat([cur_mask, torch.ones(B, 1, dtype=cur_mask.dtype,
                                                           device=device)], dim=1)
                cur_pos = cur_pos[:, -1:] + 1
            del past, res
        finally:
            if hook is not None:
                hook.remove()
        gen = torch.stack(new_tokens, dim=1)                        # [B, G]
        full_ids = torch.cat([ids, gen], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(gen, dtype=mask.dtype)], dim=1)
        seen: dict[str, torch.Tensor] = {}

        def read(h):
            seen["h"] = h
            raise _SiteRead

        reader = PointReader(sites, key, read)
        try:
            kwargs = {"input_ids": full_ids, "attention_mask": full_mask, "use_cache": False}
            if accepts_positions:
                kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
            try:
                model(**kwargs)
            except _SiteRead:
                pass
        finally:
            reader.remove()
        if "h" not in seen:
            raise RuntimeError("the forward pass never reached the SAE's site")
        h_gen = seen["h"][:, ids.shape[1]:]                         # generated tokens only
        z = sae_here.encode(h_gen).double()                         # [B, G, F]
        out[start:start + B] = z.mean(1).cpu()
        bar.update(B)
    return out


def measure_effects(model: nn.Module, tokenizer: Any, sae: SAE, prompts: Sequence[str],
                    vectors: torch.Tensor, *, max_new_tokens: int = 32, samples_per_vector: int = 4,
                    baseline_samples: int = 16, batch_size: int = 32, layer: int | None = None,
                    site: str | None = None, temperature: float = 1.0, top_k: int | None = 50,
                    top_p: float = 0.3, seed: int = 0, chat_template: bool = False,
                    system_prompt: str | None = None, progress: bool = True) -> EffectMeasurement:
    """SAE-TS effects of given steering vectors ``vectors`` [N, D] (residual units, added
    as they are) at ``site[layer]`` (default the SAE's).

    Steered rows: vector i, sample j (j < ``samples_per_vector``) continues prompt
    ``(i * samples_per_vector + j) % P``; baseline rows: every prompt ``baseline_samples``
    times, unsteered.  Each row generates ``max_new_tokens`` tokens (sampling as in
    `sample_tokens`, uniforms from `row_uniforms`; no stop at EOS), is re-run unsteered,
    and its SAE latents are averaged over the generated tokens.  ``effects[i]`` = mean over
    vector i's rows of (row mean - the baseline mean of the row's prompt).
    """
    return _measure(model, tokenizer, sae, prompts, vectors, max_new_tokens=max_new_tokens,
                    samples_per_vector=samples_per_vector, baseline_samples=baseline_samples,
                    batch_size=batch_size, layer=layer, site=site, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, chat_template=chat_template,
                    system_prompt=system_prompt, progress=progress)


def _measure(model, tokenizer, sae, prompts, vectors, *, max_new_tokens, samples_per_vector,
             baseline_samples, batch_size, layer, site, temperature, top_k, top_p, seed,
             chat_template, system_prompt, progress, _checked=False, encoded=None):
    if not _checked:
        prompts = check_prompts(prompts, "prompts")
        layer, site = _prepare(model, tokenizer, sae, layer, site, batch_size)
        (max_new_tokens, samples_per_vector, baseline_samples, temperature, top_k, top_p,
         seed) = _sampling_args(max_new_tokens, samples_per_vector, baseline_samples,
                                temperature, top_k, top_p, seed, progress)
        D = model_sites(model).hidden
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != D \
                or vectors.shape[0] < 1 or not vectors.is_floating_point():
            raise ValueError(f"vectors: expected a float tensor [N, d_model] = [N, {D}], got "
                             f"{getattr(vectors, 'shape', type(vectors).__name__)}")
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("vectors: contain NaN or inf")
        _check_model_free(model)
        encoded = encode_prompts(tokenizer, prompts, name="prompts", chat_template=chat_template,
                                 system_prompt=system_prompt)
    vectors = vectors.detach().to("cpu", torch.float32)
    sites = model_sites(model)
    key = sites.stream_point(layer, site)
    P, N = len(encoded), vectors.shape[0]
    steered_rows = [(0, i * samples_per_vector + j, (i * samples_per_vector + j) % P, i)
                    for i in range(N) for j in range(samples_per_vector)]
    base_rows = [(1, p * baseline_samples + j, p, None)
                 for p in range(P) for j in range(baseline_samples)]
    was_training = model.training
    try:
        model.eval()
        with tqdm(total=len(steered_rows) + len(base_rows), desc="effects", unit="sample",
                  disable=not progress) as bar:
            common = dict(pad_id=_pad_id(tokenizer), max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          batch_size=batch_size, bar=bar)
            base = _generate_and_encode(model, sae, sites, key, encoded, base_rows, vectors, **common)
            steer = _generate_and_encode(model, sae, sites, key, encoded, steered_rows, vectors,
                                         **common)
    finally:
        model.train(was_training)
    baseline = base.view(P, baseline_samples, -1).mean(1)                     # [P, F]
    prompt_of = torch.tensor([r[2] for r in steered_rows])
    diffs = (steer - baseline[prompt_of]).view(N, samples_per_vector, -1)
    effects = diffs.mean(1)
    steered_mean = steer.view(N, samples_per_vector, -1).mean(1)
    info = dict(max_new_tokens=max_new_tokens, samples_per_vector=samples_per_vector,
                baseline_samples=baseline_samples, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, n_prompts=P, layer=layer, site=site)
    return EffectMeasurement(vectors, effects, baseline, steered_mean,
                             (len(steered_rows) + len(base_rows)) * max_new_tokens, info)


# --------------------------------------------------------------------------- fitting
@torch.inference_mode()
def _median_norm(model, sites, key, encoded, pad_id, batch_size) -> float:
    """Median L2 norm of the stream at ``key`` over the prompts' real tokens after the
    first (all real tokens when every prompt is one token long)."""
    device = _model_device(model)
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters
    rest, first = [], []
    seen: dict[str, torch.Tensor] = {}

    def read(h):
        seen["h"] = h
        raise _SiteRead

    reader = PointReader(sites, key, read)
    try:
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            ids, mask = pad_batch(rows, pad_id, "right")
            ids, mask = ids.to(device), mask.to(device)
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            if accepts_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            seen.clear()
            try:
                model(**kwargs)
            except _SiteRead:
                pass
            norms = seen["h"].float().norm(dim=-1).cpu()             # [B, T]
            for i, r in enumerate(rows):
                first.append(norms[i, 0])
                rest.extend(norms[i, 1:len(r)].tolist())
    finally:
        reader.remove()
    values = torch.tensor(rest if rest else [float(x) for x in first], dtype=torch.float64)
    return float(values.median())


def _draw_directions(sae: SAE, n: int, n_decoder: int, D: int, seed: int) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(int(seed))
    F = sae.d_sae
    if n_decoder <= F:
        feats = torch.randperm(F, generator=g)[:n_decoder]
    else:
        feats = torch.randint(0, F, (n_decoder,), generator=g)
    rows = sae.feature_decoder(feats.tolist(), dtype=torch.float64).cpu() if n_decoder else \
        torch.zeros(0, D, dtype=torch.float64)
    gauss = torch.randn(n - n_decoder, D, generator=g, dtype=torch.float64)
    dirs = torch.cat([rows, gauss])
    norms = dirs.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("sae: a decoder row is zero; cannot use it as a steering direction")
    return dirs / norms, [int(f) for f in feats]


def fit_effect_approximator(
    model: nn.Module,
    tokenizer: Any,
    sae: SAE,
    prompts: Sequence[str],
    *,
    n_vectors: int = 2048,
    scale: float = 1.0,
    max_new_tokens: int = 32,
    samples_per_vector: int = 4,
    baseline_samples: int = 16,
    batch_size: int = 32,
    held_out: float = 0.1,
    ridge=RIDGE_GRID,
    decoder_fraction: float = 0.5,
    layer: int | None = None,
    site: str | None = None,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 0.3,
    seed: int = 0,
    chat_template: bool = False,
    system_prompt: str | None = None,
    progress: bool = True,
) -> EffectApproximator:
    """Measure the SAE-TS effects of ``n_vectors`` random steering vectors and fit
    ``M(s) = s W + b`` (Chalnev et al. 2024; see the module docstring for the sources and
    what differs from their code).

    1. ``r`` = median L2 norm of the residual stream at ``site[layer]`` (default the SAE's)
       over the prompts' real tokens after the first (BOS / attention-sink tokens have
       outlier norms).  Every steering vector has norm ``scale * r``: ``scale`` is relative
       to a typical residual vector there.
    2. Directions (seeded): ``round(decoder_fraction * n_vectors)`` distinct SAE decoder
       rows ``W_dec[k] / s`` (random k), the rest isotropic Gaussian; all unit-normalised,
       times ``scale * r``.
    3. `measure_effects`: each vector continues ``samples_per_vector`` prompts (sampled,
       ``max_new_tokens`` tokens, its own vector per batch row), the text is re-run
       unsteered, latents averaged over the generated tokens, minus the unsteered baseline of
       the same prompt (``baseline_samples`` generations per prompt).
    4. `fit_effect_map` (ridge least squares, float64) on all but a ``held_out`` fraction
       of the vectors, the ridge chosen from ``ridge`` (a number, or a list: default
       `RIDGE_GRID`) on a validation tenth of the training vectors; the held-out R^2
       (pooled and per-feature) and mean cosine go into the metadata. The returned
       approximator's ``measurement`` attribute keeps the measured pairs (not saved), so
       `fit_effect_map` can refit them with other settings.

    Cost: ``n_vectors * samples_per_vector + len(prompts) * baseline_samples`` generations
    of ``max_new_tokens`` tokens plus one re-run each.  Every argument is checked before
    any forward (ValueError / TypeError).
    """
    prompts = check_prompts(prompts, "prompts")
    layer, site = _prepare(model, tokenizer, sae, layer, site, batch_size)
    n_vectors = _pos_int("n_vectors", n_vectors, 2)
    scale = _real("scale", scale, 0.0, math.inf, lo_open=True)
    held_out = _real("held_out", held_out, 0.0, 1.0, hi_open=True)
    ridge = _ridges(ridge)
    ridge = ridge[0] if len(ridge) == 1 else ridge
    decoder_fraction = _real("decoder_fraction", decoder_fraction, 0.0, 1.0)
    (max_new_tokens, samples_per_vector, baseline_samples, temperature, top_k, top_p,
     seed) = _sampling_args(max_new_tokens, samples_per_vector, baseline_samples, temperature,
                            top_k, top_p, seed, progress)
    n_held = 0 if held_out == 0 else max(1, int(round(held_out * n_vectors)))
    if n_vectors - n_held < 1:
        raise ValueError(f"held_out: {held_out} of n_vectors={n_vectors} leaves none to fit on")
    _check_model_free(model)
    encoded = encode_prompts(tokenizer, prompts, name="prompts", chat_template=chat_template,
                             system_prompt=system_prompt)

    sites = model_sites(model)
    key = sites.stream_point(layer, site)
    was_training = model.training
    try:
        model.eval()
        r = _median_norm(model, sites, key, encoded, _pad_id(tokenizer), batch_size)
    finally:
        model.train(was_training)
    if not (r > 0 and math.isfinite(r)):
        raise RuntimeError(f"the residual stream at {site}[{layer}] has median norm {r}")
    n_dec = int(round(decoder_fraction * n_vectors))
    dirs, feats = _draw_directions(sae, n_vectors, n_dec, sites.hidden, seed)
    S = (dirs * (scale * r)).float()
    m = _measure(model, tokenizer, sae, prompts, S, max_new_tokens=max_new_tokens,
                 samples_per_vector=samples_per_vector, baseline_samples=baseline_samples,
                 batch_size=batch_size, layer=layer, site=site, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed, chat_template=chat_template,
                 system_prompt=system_prompt, progress=progress, _checked=True, encoded=encoded)
    W, b, metrics = fit_effect_map(m.vectors.double(), m.effects, ridge=ridge, held_out=held_out,
                                   seed=seed)
    config = getattr(model, "config", None)
    meta = {
        "method": "sae-ts effect approximator",
        "model_name": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "sae": sae.hook_name or sae.source or repr(sae),
        "scale": scale, "scale_unit": "median residual norm at the site",
        "residual_norm": r, "vector_norm": scale * r,
        "n_vectors": n_vectors, "n_decoder_vectors": n_dec, "decoder_fraction": decoder_fraction,
        "ridge": ridge, "held_out": held_out, "seed": seed, "n_prompts": len(prompts),
        "n_generated_tokens": m.n_tokens,
        **{k: v for k, v in m.info.items() if k not in ("layer", "site")},
        **metrics,
        "fit": "closed-form ridge least squares, float64",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fasteer_version": __version__,
    }
    approx = EffectApproximator(W.float(), b.float(), layer=layer, site=site, metadata=meta)
    approx.measurement = m          # the (vector, effect) pairs, to refit without measuring
    return approx


# -------------------------------------------------------------------------- targeting
def _target(approx: EffectApproximator, features, weights) -> torch.Tensor:
    F = approx.d_sae
    if isinstance(features, torch.Tensor) and features.is_floating_point():
        if weights is not None:
            raise ValueError("weights: not used when features is a dense target tensor [d_sae]")
        if features.shape != (F,):
            raise ValueError(f"features: a dense target must be [d_sae] = [{F}], got "
                             f"{tuple(features.shape)}")
        t = features.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("features: contains NaN or inf")
        return t
    if isinstance(features, torch.Tensor):
        features = features.tolist()
    if _is_int(features):
        features = [features]
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
        raise TypeError(f"features: expected a feature id, a list of them or a float tensor "
                        f"[d_sae], got {features!r}")
    ids = []
    for f in features:
        if not _is_int(f):
            raise TypeError(f"features: expected int feature ids, got {f!r}")
        if not 0 <= f < F:
            raise ValueError(f"features: feature {f} out of range 0..{F - 1}")
        ids.append(int(f))
    if len(set(ids)) != len(ids):
        raise ValueError(f"features: ids must be distinct, got {ids}")
    if weights is None:
        w = [1.0] * len(ids)
    else:
        if isinstance(weights, torch.Tensor):
            weights = weights.tolist()
        if isinstance(weights, numbers.Real) and not isinstance(weights, bool):
            weights = [weights]
        if not isinstance(weights, Sequence) or len(weights) != len(ids):
            raise ValueError(f"weights: expected {len(ids)} numbers (one per feature), got {weights!r}")
        w = [_real("weights", x, -math.inf, math.inf) for x in weights]
    t = torch.zeros(F, dtype=torch.float64)
    t[ids] = torch.tensor(w, dtype=torch.float64)
    return t


def effect_direction(approx: EffectApproximator, target: torch.Tensor,
                     bias_scale: float = 1.0) -> tuple[torch.Tensor, bool]:
    """``unit(unit(W t) - bias_scale * unit(W b))`` in float64 (SAE-TS ``single_step_steer``);
    returns ``(vector [D], bias_used)`` -- the bias term is dropped when ``W b = 0``."""
    W, b = approx.W.double(), approx.b.double()
    wt = W @ target.double()
    u = _unit(wt, "W t (the target mapped through the approximator)")
    wb = W @ b
    bias_used = bool(float(wb.norm()) > 0)
    v = u - bias_scale * _unit(wb, "W b", allow_zero=True)
    return _unit(v, "unit(W t) - bias_scale * unit(W b)"), bias_used


def targeted_vector(approx: EffectApproximator, features, weights=None, *,
                    bias_scale: float = 1.0) -> SteeringVector:
    """SAE-TS steering vector (Chalnev et al. 2024) at the approximator's layer and site.

    Target ``t`` in SAE space: ``t[features[i]] = weights[i]`` (default 1), or ``features``
    itself when it is a float tensor [d_sae].  With the approximator ``M(s) = s W + b``:

        s = unit( unit(W t) - bias_scale * unit(W b) ),   unit(x) = x / |x|

    ``W t`` [d_model] is the direction whose predicted effect grows ``t`` the most per
    unit norm (``d/ds (t . M(s)) = W t``); subtracting ``unit(W b)`` removes the part
    that only reproduces the generic effect of steering at all (``b``, the same for every
    vector).  ``bias_scale = 1`` is the authors' setting (their ``single_step_steer``).
    The result has unit norm, so ``fs.Add(v, alpha)`` adds ``alpha`` residual units (the
    approximator's metadata ``vector_norm`` is the norm it was fitted at).
    """
    if not isinstance(approx, EffectApproximator):
        raise TypeError(f"approx: expected an EffectApproximator, got {type(approx).__name__}")
    bias_scale = _real("bias_scale", bias_scale, 0.0, math.inf)
    t = _target(approx, features, weights)
    v, bias_used = effect_direction(approx, t, bias_scale)
    nz = torch.nonzero(t).flatten().tolist()
    meta = {
        "method": "sae-ts",
        "model_name": approx.metadata.get("model_name"),
        "model_type": approx.metadata.get("model_type"),
        "sae": approx.metadata.get("sae"),
        "features": nz, "feature_weights": [float(t[i]) for i in nz],
        "bias_scale": bias_scale, "bias_term": bias_used,
        "formula": "unit(unit(W t) - bias_scale * unit(W b)); M(s) = s W + b "
                   "(Chalnev et al. 2024, arXiv 2411.02193)",
        "approximator_vector_norm": approx.metadata.get("vector_norm"),
    }
    meta = {k: v_ for k, v_ in meta.items() if v_ is not None}
    return SteeringVector({approx.layer: v.float()}, site=approx.site, metadata=meta)
