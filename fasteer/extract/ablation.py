"""Directions for directional ablation (``Ablate(u)``: h <- h - (h.u)u).

Arditi et al. (2024), "Refusal in Language Models Is Mediated by a Single Direction": the refusal
direction at a layer is the difference of mean activations between harmful and harmless
instructions (at the post-instruction tokens), normalised to unit length; ablating it at every
layer and position removes refusal.  Only the direction matters for ``Ablate`` (its norm is
divided out), so the vectors are returned unit-norm, which also makes ``Add(u, alpha)`` read
``alpha`` in units of activation norm.  The two sets need not be paired or of equal size.

Scale: unit vectors, so ``fs.Add(u, alpha)`` adds ``alpha`` absolute residual units;
``fs.Add(u, alpha, scale="resid")`` reads ``alpha`` as a fraction of the median stream norm
stored in the metadata (``resid_norm``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from fasteer.vectors import SteeringVector

from .activations import collect_contrast, model_metadata, resid_norm_metadata


def ablation_direction(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Any = None,
    *,
    position: str = "last",
    site: str = "resid_post",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> SteeringVector:
    """Unit direction normalize(mean(h_positive) - mean(h_negative)) per layer.

    ``positive`` are prompts that show the behaviour to remove (e.g. harmful requests that get
    refused), ``negative`` prompts that do not (harmless requests).  The lists may differ in
    length.  Other arguments as in `fasteer.extract.caa`.  Unit vectors (metadata
    ``resid_norm`` for ``Add(..., scale="resid")``)."""
    norms: dict[int, float] = {}
    layer_ids, pos, neg = collect_contrast(
        model, tokenizer, positive, negative, layers, paired=False, site=site, position=position,
        batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
        padding_side=padding_side, progress=progress, desc="ablation direction", resid_norm=norms,
    )
    directions = {}
    for l in layer_ids:
        diff = pos[l].double().mean(0) - neg[l].double().mean(0)
        norm = diff.norm()
        if norm == 0:
            raise ValueError(
                f"positive/negative: the mean activations are identical at layer {l}; there is no direction to ablate"
            )
        directions[l] = (diff / norm).float()
    return SteeringVector(
        directions,
        site=site,
        metadata=model_metadata(
            model, "ablation", position=position, n_positive=len(pos[layer_ids[0]]),
            n_negative=len(neg[layer_ids[0]]), chat_template=bool(chat_template),
            system_prompt=system_prompt, unit_norm=True,
            resid_norm=resid_norm_metadata(norms),
        ),
    )
