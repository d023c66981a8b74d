"""repeng-style PCA control vectors (``pca_diff`` and ``pca_center``).

Same math as repeng's ``read_representations`` (``repeng/extract.py``), without sklearn:

* ``pca_diff``: the rows are the pair differences ``h_pos - h_neg``; the direction is their first
  principal component.  Like ``sklearn.decomposition.PCA`` (what repeng calls), the rows are
  centred on their mean first, so this is the top axis of *variation* of the differences, not
  their mean (that is `caa`).  It needs at least two pairs whose differences are not all equal.
* ``pca_center``: each pair is centred on its own midpoint, ``h_pos - c`` and ``h_neg - c`` with
  ``c = (h_pos + h_neg) / 2``, and the direction is the first principal component of those 2N
  rows (their mean is already zero, so this is the top singular vector of the +-half
  differences).
* The component is unit-norm.  Its sign is repeng's rule: project every prompt on it and flip it
  if, over the pairs, "positive below negative" happens more often than "positive above
  negative"; on a tie (repeng keeps sklearn's arbitrary sign) the mean projection gap decides,
  so the positive side projects higher.

Computed in float64 with ``torch.linalg.svd``.  Scale: the vectors are unit-norm, as repeng's
are, so ``fs.Add(v, alpha)`` adds ``alpha`` in absolute residual units (a length-``alpha``
vector; residual norms are often tens to hundreds, so small alphas do nothing visible).
``fs.Add(v, alpha, scale="resid")`` reads ``alpha`` as a fraction of the median stream norm
recorded in the metadata (``resid_norm``), the same meaning as for CAA vectors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from fasteer.vectors import SteeringVector

from .activations import check_pairs, collect_contrast, model_metadata, resid_norm_metadata

PCA_METHODS = ("pca_diff", "pca_center")


def principal_direction(pos: torch.Tensor, neg: torch.Tensor, method: str, layer: int | None = None) -> torch.Tensor:
    """Unit float64 direction from paired activations ``pos``, ``neg`` of shape ``[N, D]``."""
    pos, neg = pos.double(), neg.double()
    if method == "pca_diff":
        train = pos - neg
    elif method == "pca_center":
        center = (pos + neg) / 2
        train = torch.cat([pos - center, neg - center])
    else:
        raise ValueError(f"method: expected one of {', '.join(PCA_METHODS)}, got {method!r}")
    train = train - train.mean(0)  # PCA centres its input (sklearn does, so repeng does)
    _, s, vh = torch.linalg.svd(train, full_matrices=False)
    scale = max(float(pos.abs().max()), float(neg.abs().max()), 1e-300)
    where = f" at layer {layer}" if layer is not None else ""
    if s[0] <= 1e-9 * scale:
        raise ValueError(
            f"positive/negative: {method} is undefined{where}: the pair differences do not vary "
            "(identical prompts, or one pair with pca_diff); use caa for a mean difference"
        )
    direction = vh[0]
    gap = pos @ direction - neg @ direction
    above, below = int((gap > 0).sum()), int((gap < 0).sum())
    if below > above or (below == above and float(gap.mean()) < 0):
        direction = -direction
    return direction


def pca(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Any = None,
    *,
    method: str = "pca_diff",
    position: str = "last",
    site: str = "resid_post",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> SteeringVector:
    """repeng-style control vector: first principal component per layer (see module docstring).

    ``method``: ``"pca_diff"`` (repeng's default) or ``"pca_center"``.  Other arguments as in
    `fasteer.extract.caa`.  Returns unit-norm directions (``Add(v, alpha)`` adds ``alpha``
    residual units; ``scale="resid"`` uses metadata ``resid_norm``)."""
    if method not in PCA_METHODS:
        raise ValueError(f"method: expected one of {', '.join(PCA_METHODS)}, got {method!r}")
    pos_prompts, neg_prompts = check_pairs(positive, negative)
    if method == "pca_diff" and len(pos_prompts) < 2:
        raise ValueError("positive/negative: pca_diff needs at least 2 pairs (one difference has no variance); use caa or pca_center")
    norms: dict[int, float] = {}
    layer_ids, pos, neg = collect_contrast(
        model, tokenizer, pos_prompts, neg_prompts, layers, paired=True, site=site, position=position,
        batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
        padding_side=padding_side, progress=progress, desc=method, resid_norm=norms,
    )
    directions = {l: principal_direction(pos[l], neg[l], method, l).float() for l in layer_ids}
    return SteeringVector(
        directions,
        site=site,
        metadata=model_metadata(
            model, method, position=position, n_pairs=len(pos_prompts),
            chat_template=bool(chat_template), system_prompt=system_prompt, unit_norm=True,
            resid_norm=resid_norm_metadata(norms),
        ),
    )
