"""The training-time forward: learned parameters applied by out-of-place forward hooks.

Training needs gradients with respect to the learned scalars, so the edit must be a
differentiable function of them. fasteer's carriers read their values from slot tables
(plain buffers, no autograd), so training uses these hooks instead -- on exactly the
modules the carriers use (`fasteer.sites.model_sites`: the sublayer, or the
post-sublayer norm for Gemma-2/3 and OLMo-2) -- each returning a new output tensor
``params.edit(h)``. After training, `ActivationScaling.interventions` applies the same
values through the fused inference path, and the tests check both forwards agree.

Training batches are unpadded prompts of one length (the task builder guarantees it), so
a token's prompt index is its column.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...sites import model_sites
from .params import ScalingParams


class TrainingHooks:
    """Context manager: ``params`` applied at ``sites`` x ``layers`` of ``model``."""

    def __init__(self, model: nn.Module, params: ScalingParams, sites, layers):
        ms = model_sites(model)
        self.modules = []
        for s, site in enumerate(sites):
            for j, layer in enumerate(layers):
                point = ms.points[ms.stream_point(layer, site)]
                self.modules.append((s, j, point.module))
        self.params = params
        self.handles = []

    def __enter__(self) -> "TrainingHooks":
        for s, j, module in self.modules:
            self.handles.append(module.register_forward_hook(self._hook(s, j)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, s: int, j: int):
        params = self.params

        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            new = params.edit(s, j, h)
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            if isinstance(output, list):
                return [new] + list(output[1:])
            return new
        return hook


@torch.no_grad()
def activation_norms(model: nn.Module, input_ids: torch.Tensor, sites, layers,
                     batch_size: int = 16) -> torch.Tensor:
    """Mean |h| of each component activation over all tokens of ``input_ids``,
    [n_sites, n_layers] float32 (DynScalar's fixed normalisers)."""
    ms = model_sites(model)
    sums = torch.zeros(len(sites), len(layers), dtype=torch.float64)
    count = 0
    handles = []

    def record(s, j):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            sums[s, j] += float(h.float().norm(dim=-1).sum())
        return hook

    for s, site in enumerate(sites):
        for j, layer in enumerate(layers):
            module = ms.points[ms.stream_point(layer, site)].module
            handles.append(module.register_forward_hook(record(s, j)))
    try:
        device = next(model.parameters()).device
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(device)
            model(input_ids=ids, logits_to_keep=1)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).float().clamp_min(1e-6)
