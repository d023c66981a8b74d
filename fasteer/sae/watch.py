"""Monitoring: record a few SAE features' activations for every token while the model runs.

``w = st.watch(sae, features=[12, 40], max_tokens=64)`` then ``model.generate(...)``:
``w.values()`` is a ``[batch, n, K]`` float32 tensor, token ``t`` of row ``b`` in
``[b, t]``, in the order the tokens were fed -- for ``tokens="all"`` the same columns as
``generate``'s output sequence (its last token is never fed back, so ``n`` is one less),
padding positions included (they hold whatever the model computed there). ``tokens=
"generated"`` keeps only tokens fed after the prompt.

What it reads: the residual stream at the SAE's site as the model uses it, i.e. after
fasteer's edits there (`fasteer.sae.site_reader`), so a watched feature shows the effect of
steering at its own site and upstream.

Cost, per forward of N = batch x tokens rows, at one site:
* ReLU / JumpReLU / linear SAEs: ``pre = h @ U^T + b`` with only the K watched encoder
  columns (folded: b_dec and input scaling inside U and b, `fasteer.SAE.feature_encoder`),
  an activation and a copy of N x K floats into the buffer: O(N D K) flops, K x D floats of
  weights read -- for K = 16, D = 4096 about 0.1 MFLOP per token, nothing next to the model.
* TopK SAEs: the watched features' values depend on every feature, so the full encode runs
  (O(N D F)); exact, but priced like the SAE itself.
No host sync with ``tokens="all"``; ``tokens="generated"`` outside ``generate`` reads the
cache length once per forward (as fasteer's metadata does). The buffer is allocated once
(``batch_size=`` or at the first forward) and written in place; the recording runs outside
``torch.compile`` (a graph break) because its cursor is a host integer, and is not meant
for CUDA-graph capture.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from ..metadata import _CACHE_NAMES, _past_length
from .interventions import check_width, resolve_sae_placement
from .sae import SAE
from .site_reader import PointReader

TOKENS = ("all", "generated")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class Watch:
    """Recorded activations of some SAE features; made by `fasteer.Steerer.watch`."""

    def __init__(self, steerer, sae, features, *, max_tokens: int = 256, tokens: str = "all",
                 layer=None, site=None, batch_size: int | None = None):
        if not isinstance(sae, SAE):
            raise TypeError(f"sae: expected a fasteer.SAE, got {type(sae).__name__}")
        ids, _ = sae._feature_index(features)
        self.features = [int(i) for i in ids.tolist()]
        if not self.features:
            raise ValueError("features: expected at least one feature id, got none")
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        if tokens not in TOKENS:
            raise ValueError(f"tokens: expected one of {TOKENS}, got {tokens!r}")
        self.tokens = tokens
        if batch_size is not None:
            batch_size = _positive_int(batch_size, "batch_size")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)):
            raise TypeError(f"layer: expected an int, got {layer!r}")
        layers, self.site = resolve_sae_placement(sae, layer, site, "watch")
        self.layer = layers[0]
        sites = steerer.sites
        check_width(sae, sites.hidden)
        key = sites.stream_point(self.layer, self.site)     # raises for a layer out of range
        self.sae = sae
        point = sites.points[key]
        self.device = next((p.device for p in point.module.parameters()), None) or \
            next((p.device for p in sites.base.parameters()), torch.device("cpu"))
        K = len(self.features)
        if sae.activation == "topk":
            self._sae_here = sae.to(self.device)
            self._index = torch.tensor(self.features, device=self.device)
        else:
            enc = sae.feature_encoder(self.features, dtype=torch.float32)
            for name, t in (("W_enc/b_enc", enc.column), ("W_enc/b_enc", enc.bias)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"sae: {name} of the watched features contains NaN/inf")
            self._columns = enc.column.to(self.device).T.contiguous()       # [D, K]
            self._bias = enc.bias.to(self.device)
            self._theta = (enc.threshold.to(self.device).clamp_min(0)
                           if enc.threshold is not None else None)
        self._K = K
        self._buffer = (torch.zeros(batch_size, self.max_tokens, K, device=self.device)
                        if batch_size is not None else None)
        self._cursor = 0
        self._overflow_warned = False
        self._n_prompt: int | None = None
        self._steerer = steerer
        self._reader = PointReader(sites, key, self._record)
        self._phase_handle = None
        if tokens == "generated":
            # registered after fasteer's metadata hook, so the generation tracker is current
            self._phase_handle = sites.base.register_forward_pre_hook(self._phase,
                                                                      with_kwargs=True)
        self.removed = False

    # -- public ------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens recorded per row so far."""
        return self._cursor

    def values(self) -> torch.Tensor:
        """``[batch, n_tokens, K]`` float32 (a view into the buffer: ``.clone()`` to keep it
        across `clear`); column j is feature ``features[j]``."""
        if self._buffer is None:
            return torch.zeros(0, 0, self._K, device=self.device)
        return self._buffer[:, :self._cursor]

    def clear(self) -> "Watch":
        """Start recording from token 0 again (the buffer is kept)."""
        self._cursor = 0
        self._overflow_warned = False
        return self

    def remove(self) -> None:
        """Stop recording and take the hooks out of the model (idempotent)."""
        if self.removed:
            return
        self._reader.remove()
        if self._phase_handle is not None:
            self._phase_handle.remove()
        watches = self._steerer.__dict__.get("_watches")
        if watches is not None and self in watches:
            watches.remove(self)
        self.removed = True

    def __repr__(self):
        return (f"Watch(features={self.features}, at {self.site}[{self.layer}], "
                f"tokens={self.tokens!r}, {self._cursor}/{self.max_tokens} recorded)")

    # -- hooks -------------------------------------------------------------------------
    def _phase(self, module, args, kwargs):
        """How many of this forward's tokens belong to the prompt."""
        meta, tracker = self._steerer.metadata, self._steerer.tracker
        ids = meta._arg(args, kwargs, "input_ids")
        x = ids if isinstance(ids, torch.Tensor) else meta._arg(args, kwargs, "inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            self._n_prompt = None
            return None
        T = int(x.shape[1])
        if tracker.in_generate and tracker.prompt_len is not None:
            start = tracker.position - T
            self._n_prompt = min(max(tracker.prompt_len - start, 0), T)
        else:
            cache = None
            for name in _CACHE_NAMES:
                cache = meta._arg(args, kwargs, name)
                if cache is not None:
                    break
            self._n_prompt = T if int(_past_length(cache)) == 0 else 0
        return None

    def _activations(self, x: torch.Tensor) -> torch.Tensor:
        """Watched activations [N, K] of float rows x [N, D]."""
        if self.sae.activation == "topk":
            return self._sae_here.encode(x).index_select(-1, self._index).float()
        pre = x @ self._columns + self._bias
        if self.sae.activation == "relu":
            return pre.clamp_min(0)
        if self.sae.activation == "jumprelu":
            return torch.where(pre > self._theta, pre, torch.zeros_like(pre))
        return pre

    @torch.compiler.disable
    def _record(self, h: torch.Tensor) -> None:
        if h.dim() == 2:
            h = h.unsqueeze(0)
        B, T = int(h.shape[0]), int(h.shape[1])
        first = 0
        if self.tokens == "generated":
            if self._n_prompt is None:
                return
            first = self._n_prompt
        n = T - first
        if n <= 0:
            return
        if self._buffer is None or (self._buffer.shape[0] != B and self._cursor == 0):
            self._buffer = torch.zeros(B, self.max_tokens, self._K, device=self.device)
        elif self._buffer.shape[0] != B:
            raise RuntimeError(f"watch: recorded {self._cursor} tokens of a batch of "
                               f"{self._buffer.shape[0]} rows and now sees {B} rows; call "
                               "watch.clear() between batches of different sizes")
        room = self.max_tokens - self._cursor
        if n > room:
            if not self._overflow_warned:
                warnings.warn(f"watch: buffer full ({self.max_tokens} tokens); later tokens are "
                              "not recorded (raise max_tokens or call clear())", RuntimeWarning,
                              stacklevel=2)
                self._overflow_warned = True
            n = room
            if n <= 0:
                return
        with torch.no_grad():
            x = h[:, first:first + n].reshape(B * n, h.shape[-1]).float()
            acts = self._activations(x)
            self._buffer[:, self._cursor:self._cursor + n].copy_(acts.view(B, n, self._K))
        self._cursor += n
