"""vLLM carriers: the norm modules that read each residual-stream point, replaced by
fasteer's fused op.

vLLM's decoder layers (Llama, Mistral, Qwen2/3, Gemma 2/3 families) call their norms in
two forms:

* ``norm(x)`` -- layer 0, where the layer has just set ``residual = x``: the stream *is*
  ``x``, so editing ``x`` in place reaches the stream, then ``norm(x)`` is returned;
* ``norm(x, residual)`` -- every later point: a fused add + RMSNorm returning
  ``(norm(x + residual), x + residual)``. The carrier computes ``h = x + residual`` into
  ``residual``, edits ``h`` in place and returns ``(norm(h), h)``.

Both are one fasteer op per call on preallocated tables and slot buffers: no Python
branch on per-step state, so vLLM's compiled graph (traced once, guards dropped) steers
whatever the tables and slots say at run time.

Points and carriers (``("pre", l)`` is resid_pre[l] = resid_post[l-1]; ``("pre", L)``
the final norm's input; ``("mid", l)`` resid_mid[l]):

=================================  ===================  ===========================
model types                        ("pre", l)           ("mid", l)
=================================  ===================  ===========================
llama, mistral, qwen2, qwen3, ...  input_layernorm      post_attention_layernorm
gemma2, gemma3_text                input_layernorm      pre_feedforward_layernorm
=================================  ===================  ===========================

and ``model.norm`` for ``("pre", L)``. Gemma's norm is ``x * (1 + w)`` in float32
(weight offset 1, weight applied before the cast); vLLM's RMSNorm casts first, like
Hugging Face's Llama. Numerics: vLLM's own fused add computes the norm from the float32
sum before rounding it; fasteer (like Hugging Face) normalises the rounded stream value.
The two agree exactly in float32 and within one rounding in 16-bit types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fasteer import ops
from fasteer.ops import layout as L

# model_type -> attribute of the norm that reads resid_mid
MID_NORM = {
    "llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm",
    "qwen3_moe": "post_attention_layernorm", "qwen2_moe": "post_attention_layernorm",
    "mixtral": "post_attention_layernorm", "granite": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm",
    "gemma3": "pre_feedforward_layernorm",
}


@dataclass
class StepBuffers:
    """Per-token slot and gate, preallocated for the largest step; rewritten in place."""
    slot: torch.Tensor      # int32 [max_tokens], -1 = untouched
    gate: torch.Tensor      # uint8 [max_tokens], always 1 (vLLM batches carry no padding)

    @classmethod
    def allocate(cls, max_tokens: int, device) -> "StepBuffers":
        return cls(torch.full((max_tokens,), -1, dtype=torch.int32, device=device),
                   torch.ones(max_tokens, dtype=torch.uint8, device=device))


def norm_numerics(module: nn.Module) -> dict:
    """weight / eps / offset / cast order of a vLLM RMSNorm or GemmaRMSNorm module."""
    name = type(module).__name__
    if getattr(module, "variance_size_override", None) is not None:
        raise ValueError(f"{name}: a partial-variance RMSNorm cannot carry steering")
    eps = float(module.variance_epsilon)
    if name == "GemmaRMSNorm":
        return dict(weight=module.weight, eps=eps, weight_offset=1.0, cast_before_weight=False)
    if name == "RMSNorm":
        weight = module.weight if getattr(module, "has_weight", True) else None
        return dict(weight=weight, eps=eps, weight_offset=0.0, cast_before_weight=True)
    raise ValueError(f"{name}: not a vLLM RMSNorm / GemmaRMSNorm")


class NormCarrier:
    """Replaces one norm module's ``forward`` (instance attribute; `remove` restores it)."""

    def __init__(self, module: nn.Module, tables, buffers: StepBuffers, backend: str | None):
        self.module, self.tables, self.buffers, self.backend = module, tables, buffers, backend
        self.numerics = norm_numerics(module)
        num = self.numerics
        self._op_kwargs = dict(norm_kind=L.NORM_RMS, eps=num["eps"],
                               weight_offset=num["weight_offset"],
                               cast_before_weight=num["cast_before_weight"], backend=backend)
        self._had_forward = "forward" in module.__dict__
        self._old_forward = module.__dict__.get("forward")

    def install(self) -> None:
        self.module.forward = self.forward

    def remove(self) -> None:
        if self._had_forward:
            self.module.forward = self._old_forward
        else:
            del self.module.forward

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        weight = self.numerics["weight"]
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        n = x.shape[0]
        slot, gate = self.buffers.slot[:n], self.buffers.gate[:n]
        t = self.tables
        out = torch.empty_like(x)
        if residual is None:
            ops._steer_norm_fast_(x, out, slot, gate, t.meta, t.params, t.bank, weight,
                                  **self._op_kwargs)
            return out
        ops._add_steer_norm_fast_(residual, x, out, slot, gate, t.meta, t.params, t.bank,
                                  weight, **self._op_kwargs)
        return out, residual


class VllmSites:
    """Stream points of a vLLM decoder model: ``stream_point(layer, site)`` as
    `fasteer.plan.compile_plan` asks for it, and the norm module at each point."""

    def __init__(self, model: nn.Module, model_type: str):
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(base, "norm"):
            raise ValueError(f"{type(model).__name__}: expected model.model.layers and "
                             "model.model.norm (a vLLM decoder-only model)")
        if getattr(base, "start_layer", 0) != 0 or getattr(base, "end_layer", len(layers)) \
                != len(layers):
            raise ValueError("pipeline parallelism: this worker holds layers "
                             f"{base.start_layer}..{base.end_layer - 1}; fasteer's vLLM host "
                             "needs every layer in one worker (tensor parallelism is fine)")
        if model_type not in MID_NORM:
            raise ValueError(f"model type {model_type!r}: fasteer's vLLM host knows "
                             f"{sorted(MID_NORM)}")
        self.model_type, self.n_layers = model_type, len(layers)
        self.modules: dict[tuple[str, int], nn.Module] = {}
        for l, layer in enumerate(layers):
            self.modules[("pre", l)] = layer.input_layernorm
            self.modules[("mid", l)] = getattr(layer, MID_NORM[model_type])
        self.modules[("pre", self.n_layers)] = base.norm
        for key, module in self.modules.items():
            norm_numerics(module)          # refuse a point this host cannot carry, up front
        self.hidden = int(base.norm.weight.shape[0])

    def stream_point(self, layer: int, site: str) -> tuple[str, int]:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layers: layer {layer!r} out of range 0..{self.n_layers - 1}")
        if site == "resid_pre":
            return ("pre", layer)
        if site == "resid_post":
            return ("pre", layer + 1)
        if site == "resid_mid":
            return ("mid", layer)
        raise ValueError(f"site: expected resid_pre, resid_mid or resid_post, got {site!r}")
