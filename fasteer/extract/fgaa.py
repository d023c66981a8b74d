"""Feature Guided Activation Additions (FGAA; Soo et al. 2025, "Interpretable Steering of
Large Language Models with Feature Guided Activation Additions").

A contrastive steering vector built in SAE space: average the SAE latents of positive and
negative prompts, keep the few features that separate them and are not generic, and turn
those features back into a residual-stream vector. See `fgaa` for exactly which of the
paper's steps are implemented.

The latents are read at the SAE's own site through `fasteer.sae.site_reader` (any of
resid_pre / resid_mid / resid_post), one batched forward per batch, cut short once the
site has been read; prompts are tokenized and padded as in `fasteer.extract.activations`.
"""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fasteer.sae import SAE
from fasteer.sae.interventions import check_width, resolve_sae_placement
from fasteer.sae.site_reader import PointReader
from fasteer.sites import model_sites
from fasteer.vectors import SteeringVector

from .effects import EffectApproximator, effect_direction
from .activations import (_model_device, _pad_id, check_prompts, encode_prompts, model_metadata,
                          pad_batch)


# `fgaa` warns (`FGAADegenerateWarning`) when the kept features carry less than this
# fraction of the contrast, both decoded to the residual stream (see `fgaa`).
MIN_RETAINED = 0.05


class FGAADegenerateWarning(UserWarning):
    """`fgaa` kept almost none of the contrast (the filters dropped what carried it)."""


class _SiteRead(Exception):
    """Raised from the reader once the site has been read (skips the layers above)."""


@dataclass
class LatentStats:
    """Per-prompt mean latents and firing statistics of a list of prompts."""
    prompt_means: torch.Tensor   # float64 [P, F]: each prompt's latents averaged over its real tokens
    active: torch.Tensor         # int64 [F]: real tokens on which the feature fired (z > 0)
    n_tokens: int
    bos_active: torch.Tensor     # bool [F]: fired on a BOS token of some prompt
    n_bos: int                   # prompts that start with the tokenizer's BOS token
    token_norms: torch.Tensor | None = None   # float64 [n_tokens]: |h| of every real token


def _retained(sae: SAE, v_diff: torch.Tensor, features: torch.Tensor, weights: torch.Tensor):
    """(fraction, norms): ``D(v_target) / D(max(v_diff, 0))`` with ``D(t) = |t W_dec / s|``
    in float64, and the decoded norms (kept, positive, mean_difference)."""
    W = sae.W_dec.detach()
    def decoded(t: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm((t.to(W.device) @ W.double()) / sae.input_scale))
    target = torch.zeros_like(v_diff)
    target[features] = weights
    kept, positive = decoded(target), decoded(v_diff.clamp(min=0))
    fraction = kept / positive if positive > 0 else 0.0
    return fraction, dict(kept=kept, positive=positive, mean_difference=decoded(v_diff))


def _check_sae(sae) -> SAE:
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a fasteer.SAE, got {type(sae).__name__}")
    return sae


def latent_stats(model: nn.Module, tokenizer: Any, sae: SAE, encoded: list[list[int]], *,
                 layer: int, site: str, batch_size: int = 8, padding_side: str | None = None,
                 progress: bool = True, desc: str = "fgaa") -> LatentStats:
    """SAE latents of already tokenized prompts at ``site[layer]`` (validated by the caller)."""
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"tokenizer.padding_side: expected 'left' or 'right', got {side!r}")
    sites = model_sites(model)
    key = sites.stream_point(layer, site)
    device = _model_device(model)
    sae_here = sae.to(device)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters
    F = sae.d_sae
    means, active, norms = [], torch.zeros(F, dtype=torch.int64), []
    bos_active = torch.zeros(F, dtype=torch.bool)
    n_tokens = n_bos = 0
    seen: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> None:
        seen["h"] = h
        raise _SiteRead

    reader = PointReader(sites, key, read)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, disable=not progress,
                                          unit="prompt") as bar:
            for start in range(0, len(encoded), batch_size):
                rows = encoded[start:start + batch_size]
                ids, mask = pad_batch(rows, _pad_id(tokenizer), side)
                ids, mask = ids.to(device), mask.to(device)
                kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                          "use_cache": False}
                if accepts_positions:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                seen.clear()
                try:
                    model(**kwargs)
                except _SiteRead:
                    pass
                if "h" not in seen:
                    raise RuntimeError(f"the forward pass never reached {site}[{layer}]")
                z = sae_here.encode(seen["h"]).double()            # [B, T, F]
                real = mask.bool()
                norms.append(torch.linalg.vector_norm(seen["h"][real].double(), dim=-1).cpu())
                # padded positions may hold anything (even NaN): select, never multiply
                z = torch.where(real.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype,
                                                                   device=z.device))
                means.append((z.sum(1) / real.sum(1, keepdim=True)).cpu())
                active += ((z > 0) & real.unsqueeze(-1)).sum((0, 1)).cpu()
                n_tokens += int(real.sum())
                if bos_id is not None:
                    first = torch.argmax(real.int(), dim=1)        # first real token per row
                    rows_idx = torch.arange(ids.shape[0], device=ids.device)
                    is_bos = ids[rows_idx, first] == bos_id
                    if bool(is_bos.any()):
                        n_bos += int(is_bos.sum())
                        bos_active |= (z[rows_idx, first][is_bos] > 0).any(0).cpu()
                bar.update(len(rows))
    finally:
        reader.remove()
        model.train(was_training)
    return LatentStats(torch.cat(means), active, n_tokens, bos_active, n_bos, torch.cat(norms))


def _prepare(model, tokenizer, sae, layer, site, batch_size, padding_side):
    _check_sae(sae)
    layers, site = resolve_sae_placement(sae, layer, site, "fgaa")
    layer = layers[0]
    sites = model_sites(model)
    check_width(sae, sites.hidden)
    sites.stream_point(layer, site)                 # layer in range, site exists
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side: expected 'left', 'right' or None, got {padding_side!r}")
    return layer, site


def feature_density(model: nn.Module, tokenizer: Any, sae: SAE, texts: Sequence[str], *,
                    layer: int | None = None, site: str | None = None, batch_size: int = 8,
                    padding_side: str | None = None, progress: bool = True) -> torch.Tensor:
    """Fraction of the real tokens of ``texts`` on which each SAE feature fires (z > 0):
    float64 [d_sae]. Run it on a generic corpus and pass the result to ``fgaa(density=)``."""
    texts = check_prompts(texts, "texts")
    layer, site = _prepare(model, tokenizer, sae, layer, site, batch_size, padding_side)
    stats = latent_stats(model, tokenizer, sae, encode_prompts(tokenizer, texts, name="texts"),
                         layer=layer, site=site, batch_size=batch_size,
                         padding_side=padding_side, progress=progress, desc="feature density")
    return stats.active.double() / max(stats.n_tokens, 1)


def fgaa(
    model: nn.Module,
    tokenizer: Any,
    sae: SAE,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    density_threshold: float | None = 0.01,
    top_k: int = 50,
    bos_feature_filter: bool = True,
    density: torch.Tensor | None = None,
    layer: int | None = None,
    site: str | None = None,
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
    approximator: "EffectApproximator | None" = None,
    mapping: str | None = None,
) -> SteeringVector:
    """FGAA steering vector at the SAE's layer and site.

    What fasteer computes (F = d_sae, z(x) the SAE latents of prompt x's real tokens at
    ``site[layer]``, default the SAE's own):

    1. ``v_diff = mean_{x in positive} mean_t z_t(x) - mean_{x in negative} mean_t z_t(x)``
       (float64; every real token counts, BOS and chat-template tokens included).
    2. Density filter: drop features whose density -- the fraction of tokens on which
       ``z > 0`` -- exceeds ``density_threshold`` (None: no filter). The density is
       ``density`` when given (a [F] tensor of firing rates over a large corpus, e.g.
       `feature_density` or Neuronpedia's statistics, as in the paper), else measured on
       the positive and negative prompts together; that estimate has a resolution of one
       over the number of tokens, and features that fire on most positive tokens count as
       dense there, so pass a corpus density for real SAEs.
    3. BOS filter (``bos_feature_filter``): drop features that fire (z > 0) on the BOS token
       of any prompt that starts with the tokenizer's ``bos_token_id`` (no-op for tokenizers
       that add no BOS).
    4. Keep the ``top_k`` largest *positive* entries of what is left: ``v_target``.
    5. Map ``v_target`` (zero outside the kept features) to the residual stream, by
       ``mapping``:

       * ``"effect"`` (the paper's step; the default when ``approximator`` is given): with
         SAE-TS's linear effect approximator ``M(s) = s W + b`` (Chalnev et al. 2024;
         `fasteer.extract.fit_effect_approximator`, ``W`` [d_model, d_sae]),
         ``v = unit(unit(W v_target) - unit(W b))`` -- the SAE-TS targeted vector of
         `fasteer.extract.targeted_vector` with ``bias_scale = 1``. ``v`` has unit norm:
         ``fs.Add(v, alpha)`` adds ``alpha`` residual units (the paper's steering scale).
         The approximator must have been fitted for this SAE at this layer and site.
       * ``"decoder"`` (the default without an approximator; not the paper's):
         ``v = sum_k v_target[k] * W_dec[k] / s`` (`fasteer.SAE.feature_decoder`: the
         decoder row in residual units, ``s`` the SAE's input scale; no b_dec), SAE decoder
         steering weighted by the contrast, not normalised (it keeps its natural scale, and
         ``alpha`` multiplies it).

       Returned as a float32 `fasteer.SteeringVector` ``{layer: v}`` at ``site``; use it
       with ``fs.Add(v, alpha)``. Its metadata records the mapping, the kept features and
       their weights and how many were dropped.

    What of the paper this is: steps 1-4 follow the paper's contrast in SAE space,
    density filtering (threshold 0.01), BOS-feature removal and top-k selection; fasteer
    keeps only the top-k *positive* entries. Step 5 with ``mapping="effect"`` is the
    paper's use of the SAE-TS effect approximator (the approximator itself costs a
    training run of many steered generations per model and SAE; fit it once, save it);
    ``mapping="decoder"`` is fasteer's cheaper stand-in.

    Scale: ``mapping="decoder"`` keeps the natural scale (``fs.Add(v, 1.0)`` adds the
    kept features' contrast, decoded); ``mapping="effect"`` gives a unit vector (``alpha``
    residual units). Either way the metadata holds ``resid_norm`` ({layer: median L2
    norm of the stream over every real token read}), so ``fs.Add(v, alpha,
    scale="resid")`` reads ``alpha`` as a fraction of a typical activation.

    Degenerate results warn (`FGAADegenerateWarning`): with ``D(t) = |sum_k t_k W_dec[k]
    / s|`` (a target decoded to the residual stream), when ``D(v_target) <
    MIN_RETAINED * D(max(v_diff, 0))`` -- the kept features carry under 5% of what the
    positive contrast decodes to, typically because the density filter, measured on the
    prompts themselves, dropped the features that separate them. The message gives the
    counts each filter dropped, both norms and the SAE reconstruction of the plain mean
    difference (about CAA's norm), and the fix (``density=`` from a corpus, or a higher
    ``density_threshold``). The metadata records ``retained_fraction``.

    Raises ValueError before any forward for a non-SAE, an SAE whose d_in differs from the
    model's hidden size, a layer out of range, bad thresholds, an unknown ``mapping``,
    ``mapping="effect"`` without an approximator, an approximator fitted for another SAE
    width or another layer/site; and when no feature survives the filters (the message
    says how many each filter dropped).
    """
    pos = check_prompts(positive, "positive")
    neg = check_prompts(negative, "negative")
    layer, site = _prepare(model, tokenizer, sae, layer, site, batch_size, padding_side)
    if density_threshold is not None:
        if isinstance(density_threshold, bool) or not isinstance(density_threshold, numbers.Real) \
                or not 0.0 <= float(density_threshold) <= 1.0:
            raise ValueError(f"density_threshold: expected a fraction in [0, 1] or None, got "
                             f"{density_threshold!r}")
        density_threshold = float(density_threshold)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if not isinstance(bos_feature_filter, bool):
        raise TypeError(f"bos_feature_filter: expected a bool, got {type(bos_feature_filter).__name__}")
    if density is not None:
        if not isinstance(density, torch.Tensor) or density.shape != (sae.d_sae,) or \
                not density.is_floating_point():
            raise ValueError(f"density: expected a float tensor [d_sae] = [{sae.d_sae}] of firing "
                             f"rates, got {getattr(density, 'shape', type(density).__name__)}")
        density = density.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(density).all()) or bool((density < 0).any()) or \
                bool((density > 1).any()):
            raise ValueError("density: expected finite firing rates in [0, 1]")
    if approximator is not None and not isinstance(approximator, EffectApproximator):
        raise TypeError(f"approximator: expected a fasteer.extract.EffectApproximator or None, "
                        f"got {type(approximator).__name__}")
    if mapping is None:
        mapping = "effect" if approximator is not None else "decoder"
    if mapping not in ("decoder", "effect"):
        raise ValueError(f"mapping: expected 'decoder' or 'effect', got {mapping!r}")
    if mapping == "effect":
        if approximator is None:
            raise ValueError("mapping='effect' needs approximator= (an EffectApproximator from "
                             "fasteer.extract.fit_effect_approximator or EffectApproximator.load)")
        approximator.check_sae(sae, layer, site, who="approximator")
    enc = dict(chat_template=chat_template, system_prompt=system_prompt)
    encoded = encode_prompts(tokenizer, pos, name="positive", **enc) + \
        encode_prompts(tokenizer, neg, name="negative", **enc)

    stats = latent_stats(model, tokenizer, sae, encoded, layer=layer, site=site,
                         batch_size=batch_size, padding_side=padding_side, progress=progress)
    n = len(pos)
    v_diff = stats.prompt_means[:n].mean(0) - stats.prompt_means[n:].mean(0)      # float64 [F]

    measured = stats.active.double() / max(stats.n_tokens, 1)
    rate = density if density is not None else measured
    dense = (rate > density_threshold) if density_threshold is not None else \
        torch.zeros(sae.d_sae, dtype=torch.bool)
    bos = stats.bos_active if bos_feature_filter else torch.zeros(sae.d_sae, dtype=torch.bool)
    keep = ~dense & ~bos & (v_diff > 0)
    if not bool(keep.any()):
        raise ValueError(
            f"fgaa: no feature left: {int(dense.sum())} dropped as denser than "
            f"{density_threshold}, {int(bos.sum())} as BOS features, "
            f"{int((v_diff > 0).sum())} with a positive difference before filtering; raise "
            "density_threshold, pass density= from a larger corpus, or use more prompts")
    candidates = torch.where(keep, v_diff, torch.full_like(v_diff, -torch.inf))
    k = min(top_k, int(keep.sum()))
    weights, features = torch.topk(candidates, k)
    retained, report = _retained(sae, v_diff, features, weights)
    if retained < MIN_RETAINED:
        import warnings
        source = ("given (density=)" if density is not None else
                  "measured on the positive and negative prompts themselves, where features "
                  "that fire on most of their tokens count as dense")
        warnings.warn(
            f"fgaa: degenerate steering vector: the {k} kept feature(s) carry "
            f"{100 * retained:.2g}% of the contrast (decoded norm {report['kept']:.3g}, vs "
            f"{report['positive']:.3g} for every feature with a positive difference and "
            f"{report['mean_difference']:.3g} for the SAE reconstruction of the plain mean "
            f"difference, about CAA's norm). {int((dense & (v_diff > 0)).sum())} feature(s) "
            f"with a positive difference were dropped as denser than {density_threshold} "
            f"(density {source}) and {int((bos & (v_diff > 0)).sum())} as BOS features. Pass "
            "density= (fs.extract.feature_density on a generic corpus) or raise "
            "density_threshold (None disables the filter).",
            FGAADegenerateWarning, stacklevel=2)
    extra: dict[str, Any] = {}
    if mapping == "effect":
        target = torch.zeros(sae.d_sae, dtype=torch.float64)
        target[features] = weights
        direction, bias_used = effect_direction(approximator, target, 1.0)
        vector = direction.float()
        extra = dict(formula="unit(unit(W v_target) - unit(W b)), M(s) = s W + b "
                             "(SAE-TS effect approximator)", bias_term=bias_used,
                     approximator_vector_norm=approximator.metadata.get("vector_norm"),
                     approximator_r2=approximator.metadata.get("r2_pooled"))
    else:
        rows = sae.feature_decoder(features.tolist(), dtype=torch.float64).cpu()   # [k, D]
        vector = (weights.unsqueeze(-1) * rows).sum(0).float()
    meta = model_metadata(
        model, "fgaa", sae=sae.hook_name or sae.source or repr(sae),
        features=[int(f) for f in features], feature_weights=[float(w) for w in weights],
        top_k=int(top_k), density_threshold=density_threshold,
        density_source="given" if density is not None else "prompts",
        dropped_dense=int((dense & (v_diff > 0)).sum()),
        dropped_bos=int((bos & (v_diff > 0)).sum()), bos_prompts=stats.n_bos,
        n_positive=n, n_negative=len(neg), n_tokens=stats.n_tokens,
        chat_template=bool(chat_template), system_prompt=system_prompt, mapping=mapping,
        retained_fraction=float(retained),
        resid_norm={str(layer): float(np.median(stats.token_norms.numpy()))},
        **extra,
    )
    return SteeringVector({layer: vector}, site=site, metadata=meta)
