"""More rows of the carrier table (`fasteer.sites.ARCHITECTURES`): the families people run
today (issue 21).

Every entry below was read off the decoder layer's ``forward`` in transformers 5.25 (the
forward is copied, abridged, into a comment next to it) and is checked against the
forward-hook reference of ``tests/hook_reference.py`` with a tiny random model
(``tests/test_patch_arch.py``, ``tests/test_patch_components.py``,
``tests/test_site_families.py``). `fasteer.sites` merges `FAMILIES` into its table.

Carrier choices, in short (see the module docstring of `fasteer.sites` for the kinds):
* a pre-norm the fused op computes (weighted RMSNorm in either cast order, torch
  LayerNorm, Cohere's mean-subtracting LayerNorm without bias) is a ``norm`` carrier;
* a point read by no such norm is an ``input`` hook on the module that reads it raw
  (OLMo-3's sublayers, like OLMo-2), or on the weightless norm that reads it (OLMo-1:
  ``OlmoLayerNorm`` has neither weight nor bias -- nothing to fuse, and it is not a
  ``torch.nn.LayerNorm``);
* component outputs are ``output`` hooks on the module whose output is added to the
  stream (after a post-sublayer norm where there is one: GLM-4, OLMo-3).
Multimodal wrappers (Gemma-3, Mistral-3) use the entry of their text model
(``config.text_config.model_type``); their layers sit at ``model.language_model.layers``.
"""
from __future__ import annotations

from typing import Callable

from . import sites as _sites
from .ops import layout as L
from .sites import (LAYER_NORM, RMS_LLAMA, ArchSpec, CarrierSpec, NormFlavour, _llama_like,
                    _norm, _outputs)

__all__ = ["FAMILIES", "RMS_F32_WEIGHT", "COHERE_LAYER_NORM"]

# GptOssRMSNorm, Olmo3RMSNorm: round(w * x * rsqrt(mean(x^2) + eps)) in float32 (the
# weight multiplies before the cast back; the same math as OLMo-2's norm).
RMS_F32_WEIGHT = NormFlavour(L.NORM_RMS, "variance_epsilon", 0.0, False, "RMSNorm")
# CohereLayerNorm / Cohere2LayerNorm: mean-subtracting, no bias, in float32:
#   round(w * (x - mean) * rsqrt(var + eps))   == NORM_LAYER with bias None.
# Llama4TextRMSNorm: Llama's math; epsilon renamed eps -> variance_epsilon in transformers 5.
RMS_LLAMA4 = NormFlavour(L.NORM_RMS, "variance_epsilon|eps", 0.0, True, "RMSNorm")
COHERE_LAYER_NORM = NormFlavour(L.NORM_LAYER, "variance_epsilon", 0.0, False, "LayerNorm")

_OLMO_NO_WEIGHT = ("OlmoLayerNorm has no weight and no bias (F.layer_norm(x, None, None)): "
                   "nothing to fuse, so the points it reads are carried by input hooks on it")


def _parallel(name: str, pre: CarrierSpec, final: CarrierSpec, attn: str, mlp: str,
              what: str) -> ArchSpec:
    return ArchSpec(name, pre, None, final,
                    f"{what} adds attention and MLP to the stream together (both read one "
                    "normalised input), so there is no point after attention",
                    **_outputs(attn, mlp))


# --------------------------------------------------------------------------- Phi 1/2

def _phi(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h)                    (nn.LayerNorm)
    # attn = resid_dropout(self_attn(h)); ff = resid_dropout(mlp(h))
    # h = attn + ff + residual                                (dropout: identity at inference)
    # final: model.final_layernorm (nn.LayerNorm)
    return _parallel("phi (parallel attention)", _norm("input_layernorm", LAYER_NORM),
                     _norm("final_layernorm", LAYER_NORM), "self_attn", "mlp", "Phi-1/2")


# --------------------------------------------------------------------------- StableLM

def _stablelm(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); a = self_attn(h)   (nn.LayerNorm)
    # use_parallel_residual:  h = residual + a + dropout(mlp(h))
    # else:                   residual = residual + a
    #                         h = residual + dropout(mlp(post_attention_layernorm(residual)))
    # final: model.norm (nn.LayerNorm)
    pre, final = _norm("input_layernorm", LAYER_NORM), _norm("norm", LAYER_NORM)
    if getattr(config, "use_parallel_residual", False):
        return _parallel("stablelm (parallel residual)", pre, final, "self_attn", "mlp",
                         "StableLM with use_parallel_residual=True")
    return ArchSpec("stablelm", pre, _norm("post_attention_layernorm", LAYER_NORM), final,
                    **_outputs("self_attn", "mlp"))


# --------------------------------------------------------------------------- Cohere 1/2

def _cohere(name: str) -> Callable[[object], ArchSpec]:
    # residual = h; h = input_layernorm(h)                    (CohereLayerNorm: no bias)
    # a = self_attn(h); m = mlp(h); h = residual + a + m
    # final: model.norm (CohereLayerNorm)
    spec = _parallel(f"{name} (parallel attention)", _norm("input_layernorm", COHERE_LAYER_NORM),
                     _norm("norm", COHERE_LAYER_NORM), "self_attn", "mlp",
                     "Cohere" if name == "cohere" else "Cohere-2")
    return lambda config: spec


# --------------------------------------------------------------------------- Granite

def _granite(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); h = self_attn(h)
    # h = residual + h * residual_multiplier
    # residual = h; h = post_attention_layernorm(h); h = mlp(h)
    # h = residual + h * residual_multiplier
    # attn_out / mlp_out are the sublayer modules' outputs *before* residual_multiplier
    # (no module computes the scaled product): the stream receives
    # residual_multiplier * attn_out, so Add(v, a) at attn_out moves the stream by
    # residual_multiplier * a * v, while Scale / Clamp / Ablate act on the vector that is
    # scaled (a scale or an ablation commutes with the multiplier; a clamp sets the
    # unscaled projection).
    return ArchSpec("granite", _norm("input_layernorm", RMS_LLAMA),
                    _norm("post_attention_layernorm", RMS_LLAMA), _norm("norm", RMS_LLAMA),
                    **_outputs("self_attn", "mlp"))


# --------------------------------------------------------------------------- OLMo 1 / 3

def _olmo(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); h = self_attn(h); h = residual + h
    # residual = h; h = post_attention_layernorm(h); h = mlp(h); h = residual + h
    # (OlmoLayerNorm: F.layer_norm without weight or bias.) The norms' first input is the
    # stream tensor itself (``residual`` is the same object), so an in-place pre-hook on a
    # norm edits the stream; final: model.norm (OlmoLayerNorm), likewise.
    return ArchSpec("olmo", CarrierSpec("input", "input_layernorm"),
                    CarrierSpec("input", "post_attention_layernorm"), CarrierSpec("input", "norm"),
                    **_outputs("self_attn", "mlp"))


def _olmo3(config) -> ArchSpec:
    # residual = h; h = self_attn(h); h = post_attention_layernorm(h); h = residual + h
    # residual = h; h = mlp(h); h = post_feedforward_layernorm(h); h = residual + h
    # As OLMo-2: no norm reads the stream inside a layer (input hooks on the layer and on
    # mlp, whose first input is the stream tensor); final: model.norm (Olmo3RMSNorm,
    # weight applied in float32).
    return ArchSpec("olmo3", CarrierSpec("input", ""), CarrierSpec("input", "mlp"),
                    _norm("norm", RMS_F32_WEIGHT),
                    **_outputs("post_attention_layernorm", "post_feedforward_layernorm"))


# --------------------------------------------------------------------------- GLM-4

def _glm4(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); h = self_attn(h)
    # h = post_self_attn_layernorm(h); h = residual + h          (sandwich norm)
    # residual = h; h = post_attention_layernorm(h); h = mlp(h)
    # h = post_mlp_layernorm(h); h = residual + h
    # Glm4RMSNorm is Llama's (cast before the weight). What reaches the stream is the
    # output of post_self_attn_layernorm / post_mlp_layernorm.
    return ArchSpec("glm4", _norm("input_layernorm", RMS_LLAMA),
                    _norm("post_attention_layernorm", RMS_LLAMA), _norm("norm", RMS_LLAMA),
                    **_outputs("post_self_attn_layernorm", "post_mlp_layernorm"))


# --------------------------------------------------------------------------- Llama-4 text

def _llama4_text(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); h = self_attn(h); h = residual + h
    # residual = h; h = post_attention_layernorm(h); h = feed_forward(h)
    # if MoE layer: h, _ = h  (Llama4TextMoe returns (out [B*T, D], router_logits))
    # h = residual + h.view(residual.shape)
    # Llama4TextRMSNorm: round(x * rsqrt(...)) * w -- cast before the weight; its epsilon
    # is `variance_epsilon` in transformers 5, `eps` in 4.57.
    return ArchSpec("llama4_text", _norm("input_layernorm", RMS_LLAMA4),
                    _norm("post_attention_layernorm", RMS_LLAMA4), _norm("norm", RMS_LLAMA4),
                    **_outputs("self_attn", "feed_forward"))


# --------------------------------------------------------------------------- GPT-OSS

def _gpt_oss(config) -> ArchSpec:
    # residual = h; h = input_layernorm(h); h = self_attn(h); h = residual + h
    # residual = h; h = post_attention_layernorm(h); h, _ = mlp(h)  (router scores)
    # h = residual + h
    # GptOssRMSNorm: round(w * x * rsqrt(...)) in float32.
    return ArchSpec("gpt_oss", _norm("input_layernorm", RMS_F32_WEIGHT),
                    _norm("post_attention_layernorm", RMS_F32_WEIGHT),
                    _norm("norm", RMS_F32_WEIGHT), **_outputs("self_attn", "mlp"))


# --------------------------------------------------------------------------- wrappers

def _text_model(name: str) -> Callable[[object], ArchSpec]:
    """A multimodal wrapper (Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration):
    the language model is ``AutoModel.from_config(config.text_config)`` at
    ``model.language_model`` (layers at ``model.language_model.layers``, the final norm
    relative to the language model); its entry is the text model's."""
    def make(config) -> ArchSpec:
        text = getattr(config, "text_config", None)
        text_type = getattr(text, "model_type", None)
        inner = _sites.ARCHITECTURES.get(text_type) if text_type != name else None
        if inner is None:
            # a carrier no model has: resolution fails with this path in its message, and
            # `fasteer.sites.model_sites` falls back to layer hooks, with its warning
            missing = CarrierSpec("input", f"<the text model type {text_type!r} of this "
                                           f"{name} wrapper has no table entry>")
            return ArchSpec(f"{name} ({text_type})", missing, None, None,
                            f"the text model type {text_type!r} has no table entry")
        spec = inner(text)
        return ArchSpec(f"{name} ({spec.name})", spec.resid_pre, spec.resid_mid, spec.final,
                        spec.no_mid_reason, spec.attn_out, spec.mlp_out,
                        spec.no_component_reason)
    return make


# Llama-likes: residual = h; h = input_layernorm(h); h = self_attn(h); h = residual + h
#              residual = h; h = post_attention_layernorm(h); h = mlp(h); h = residual + h
# with Llama's RMSNorm (round, then weight). Read off Qwen2MoeDecoderLayer (mlp: a
# Qwen2MoeSparseMoeBlock or a dense MLP), SmolLM3DecoderLayer, DeepseekV3DecoderLayer
# (mlp: DeepseekV3MoE from first_k_dense_replace on), MinistralDecoderLayer,
# Ministral3DecoderLayer.
FAMILIES: dict[str, Callable[[object], ArchSpec]] = {
    "qwen2_moe": _llama_like("qwen2_moe"),
    "smollm3": _llama_like("smollm3"),
    "deepseek_v3": _llama_like("deepseek_v3"),
    "ministral": _llama_like("ministral"),
    "ministral3": _llama_like("ministral3"),
    "phi": _phi,
    "stablelm": _stablelm,
    "cohere": _cohere("cohere"),
    "cohere2": _cohere("cohere2"),
    "granite": _granite,
    "olmo": _olmo,
    "olmo3": _olmo3,
    "glm4": _glm4,
    "llama4_text": _llama4_text,
    "gpt_oss": _gpt_oss,
    "gemma3": _text_model("gemma3"),
    "mistral3": _text_model("mistral3"),
}
