"""The three learned interventions of activation scaling, as trainable modules.

Stoehr et al. 2024 ("Activation Scaling for Steering and Interpreting Language Models",
EMNLP Findings, arXiv 2410.04962) edit *activation vectors* h = h^(s)_{l,i}: the output of
component s (attention or MLP) of layer l at prompt position i, before it is added to the
residual stream (fasteer's ``attn_out[l]`` / ``mlp_out[l]`` sites). Three forms:

* ActivScalar (§3.2, Eq. 5): one scalar per (s, l, i),
      h~ = h * (1 + beta * alpha[s, l, i]),                 alpha initialised to 0
  so alpha = 0 is "no intervention" and 1 + beta*alpha may turn negative (reverse h).
* SteerVec (the paper's baseline): one vector per (s, l, i),
      h~ = h + beta * v[s, l, i],                           v initialised to 0
* DynScalar (§5): the scalar is a learned linear function of h itself, shared over
  positions, so it applies to prompts of any length:
      h~ = h * (1 + beta * (w[s, l] . h / c[s, l] + b[s, l])), w, b initialised to 0
  c[s, l] is a fixed normaliser (the mean |h| of that activation on the training
  prompts, measured once): it makes one unit of w move the scalar by about one unit
  whatever the activation's size, so a single learning rate suits every layer. It is
  folded into the exported weight (w / c), so the applied edit is exactly linear in h.

What we could not take from the paper: its text was not available to us beyond the
abstract, Eq. 5 and the §5 motivation, so the DynScalar form (a probe-like dot product,
here with a bias and the normaliser c), the SteerVec form (mirroring Eq. 5 with the
same beta) and the initialisation are our reading, stated here so users can see it.

Each module edits [B, T, D] activations out of place (autograd); ActivScalar and
SteerVec need T == the training prompt length (their parameters are tied to positions).
`fasteer.extract.scaling.result.ActivationScaling.interventions` turns the learned
values into fasteer interventions for the fused inference path.
"""
from __future__ import annotations

import torch
import torch.nn as nn

METHODS = ("activ", "dyn", "steervec")
METHOD_NAMES = {"activ": "ActivScalar", "dyn": "DynScalar", "steervec": "SteerVec"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS} (ActivScalar, DynScalar, SteerVec), "
                         f"got {method!r}")
    return method


class ScalingParams(nn.Module):
    """Learned parameters of one method over ``n_sites`` component sites x ``layers``.

    ``prompt_len`` (ActivScalar, SteerVec): the positions the parameters cover.
    ``norms`` (DynScalar): the fixed normalisers c [n_sites, n_layers].
    """

    def __init__(self, method: str, n_sites: int, n_layers: int, hidden: int, *,
                 prompt_len: int | None = None, beta: float = 1.0,
                 norms: torch.Tensor | None = None):
        super().__init__()
        self.method = check_method(method)
        self.n_sites, self.n_layers, self.hidden = n_sites, n_layers, hidden
        self.beta = float(beta)
        self.prompt_len = prompt_len
        if method in ("activ", "steervec"):
            if not isinstance(prompt_len, int) or prompt_len < 1:
                raise ValueError(f"prompt_len: {METHOD_NAMES[method]} learns one parameter per "
                                 f"prompt position and needs the prompt length, got {prompt_len!r}")
        if method == "activ":
            self.alpha = nn.Parameter(torch.zeros(n_sites, n_layers, prompt_len))
        elif method == "steervec":
            self.vec = nn.Parameter(torch.zeros(n_sites, n_layers, prompt_len, hidden))
        else:
            self.weight = nn.Parameter(torch.zeros(n_sites, n_layers, hidden))
            self.bias = nn.Parameter(torch.zeros(n_sites, n_layers))
            if norms is None:
                norms = torch.ones(n_sites, n_layers)
            if norms.shape != (n_sites, n_layers) or not bool((norms > 0).all()):
                raise ValueError(f"norms: expected positive values [{n_sites}, {n_layers}], got "
                                 f"shape {tuple(norms.shape)}")
            self.register_buffer("norms", norms.detach().float().clone())

    def edit(self, s: int, j: int, h: torch.Tensor) -> torch.Tensor:
        """The edited activation of site ``s``, layer index ``j`` (out of place)."""
        T = h.shape[-2]
        if self.method == "activ":
            self._check_length(T)
            factor = 1.0 + self.beta * self.alpha[s, j]
            return h * factor.to(h.dtype).view(T, 1)
        if self.method == "steervec":
            self._check_length(T)
            return h + (self.beta * self.vec[s, j]).to(h.dtype)
        a = (h.to(self.weight.dtype) @ self.weight[s, j]) / self.norms[s, j] + self.bias[s, j]
        return h * (1.0 + self.beta * a).to(h.dtype).unsqueeze(-1)

    def _check_length(self, T: int) -> None:
        if T != self.prompt_len:
            raise ValueError(f"prompt length: {METHOD_NAMES[self.method]} was learned for prompts "
                             f"of {self.prompt_len} tokens (one parameter per position), got "
                             f"{T}; use DynScalar (method='dyn') for prompts of other lengths")

    def l1(self) -> torch.Tensor:
        """The minimality penalty: sum of |parameters| (0 is "no intervention")."""
        if self.method == "activ":
            return self.alpha.abs().sum()
        if self.method == "steervec":
            return self.vec.abs().sum()
        return self.weight.abs().sum() + self.bias.abs().sum()

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
