"""Contrastive activation addition (CAA): the difference of mean activations.

Rimsky et al. (2024), "Steering Llama 2 via Contrastive Activation Addition": for contrast pairs
(positive, negative), the steering vector at layer l is mean(h_pos) - mean(h_neg), read at the
last token (the answer letter in their A/B prompts) or averaged over tokens.  Applied with
``Add(v, alpha)``.  The vector keeps its natural scale (its norm is the typical size of the
behaviour's shift at that layer), so ``alpha`` is a multiple of "one contrast's worth".

Scale: raw difference of means -- ``fs.Add(v, 1.0)`` adds the mean difference itself.
The metadata also records ``resid_norm`` ({layer: median L2 norm of the stream over the
positions read, both sets pooled}), so ``fs.Add(v, alpha, scale="resid")`` reads
``alpha`` as a fraction of a typical activation, the same meaning for every extractor.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from fasteer.vectors import SteeringVector

from .activations import collect_contrast, model_metadata, resid_norm_metadata


def caa(
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
    """Difference of means between paired ``positive`` and ``negative`` prompts.

    Args:
        positive, negative: equal-length lists of prompt strings (pair i contrasts positive[i]
            with negative[i]).
        layers: decoder-layer indices (negative count from the end); ``None`` = every layer.
        position: ``"last"`` real token or ``"mean"`` over real tokens.
        site: ``"resid_post"`` (output of layer l) or ``"resid_pre"`` (its input).
        batch_size, chat_template, system_prompt, padding_side, progress: see
            `fasteer.extract.activations.collect_activations`.

    Scale: the raw difference of means (``Add(v, 1.0)`` adds it once); metadata
    ``resid_norm`` holds the median stream norm per layer for ``Add(..., scale="resid")``.
    """
    norms: dict[int, float] = {}
    layer_ids, pos, neg = collect_contrast(
        model, tokenizer, positive, negative, layers, paired=True, site=site, position=position,
        batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
        padding_side=padding_side, progress=progress, desc="caa", resid_norm=norms,
    )
    # Means in float64: with thousands of prompts, float32 sums lose digits the difference needs.
    directions = {l: (pos[l].double().mean(0) - neg[l].double().mean(0)).float() for l in layer_ids}
    return SteeringVector(
        directions,
        site=site,
        metadata=model_metadata(
            model, "caa", position=position, n_pairs=len(pos[layer_ids[0]]),
            chat_template=bool(chat_template), system_prompt=system_prompt,
            resid_norm=resid_norm_metadata(norms),
        ),
    )
