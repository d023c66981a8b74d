"""Where the residual stream can be read and edited in a Hugging Face model.

A *site* names a point of the residual stream (``resid_pre[l]``, ``resid_mid[l]``,
``resid_post[l]`` == ``resid_pre[l+1]``) or a sublayer output about to be added to it
(``attn_out[l]``, ``mlp_out[l]``); a *carrier* is the module that does the work there. This module holds the one table that says, per architecture, which module reads
each point, and resolves it against a live model (`model_sites`).

Why a table keyed by ``config.model_type`` and not introspection: which norm reads which
point is a fact of each architecture's ``forward`` (Gemma-2 normalises the attention
*output* with ``post_attention_layernorm`` and reads the stream with
``pre_feedforward_layernorm``; OLMo-2 has no norm in front of its sublayers at all;
GPT-NeoX/Falcon parallel blocks read one point with two norms). Module names cannot tell
these apart, so every entry below was read off the transformers source, and the tests
check each one against a forward-hook reference.

Stream points: the carriers are keyed by *stream points* ``("pre", l)`` for
``l = 0..L`` (``("pre", L)`` is the input of the final norm, i.e. ``resid_post[L-1]``)
and ``("mid", l)``. ``resid_post[l]`` and ``resid_pre[l+1]`` are the same point, so they
share one carrier.

Carrier kinds (see `fasteer.patch`):
* ``norm``   -- the pre-norm that reads the point; its forward is replaced by the fused
  steer+norm op, which edits the incoming tensor in place (the layer's ``residual``
  variable is that same tensor) and returns the norm.
* ``input``  -- a forward pre-hook on a module whose first input *is* the stream tensor
  (the decoder layer itself, or OLMo-2's ``mlp``); edits it in place.
* ``output`` -- a forward hook editing a module's output in place: the last decoder
  layer (``resid_post`` of the last layer when the final norm is unknown) or the module
  producing a component output.
Post-norm carriers (adding to the output of OLMo-2 / Gemma-2 ``post_*_layernorm``) are
not used: Gemma-2/3 have a pre-norm reading every point, and for OLMo-2 a post-norm
carrier would cost the same one extra launch as an ``input`` hook while supporting only
h-independent edits, so the table uses ``input`` hooks there.

Component outputs: ``attn_out[l]`` and ``mlp_out[l]`` name what the attention and MLP
sublayers of layer l add to the stream (keys ``("attn", l)``, ``("mlp", l)``): the
sublayer module's output, or, where the architecture normalises that output before the
add (Gemma-2/3, OLMo-2), the post-sublayer norm's output. Their carriers are ``output``
hooks on that module -- there is no norm reading a sublayer output to fuse into -- and
every intervention is valid there (activation scaling, Stoehr et al. 2024, scales these
vectors). For parallel blocks (GPT-NeoX, Falcon) both exist although ``resid_mid`` does
not.

Layer stacks: the layer list is found at one of the known paths (``_LAYER_PATHS``) or by
a scan of the module tree for an ``nn.ModuleList`` of repeated blocks (vision towers set
aside, encoder-decoder models asked to choose), or named by the user with
``layers_path=`` (`fasteer.layer_discovery` states the rule). Encoders such as BERT work.

Unknown model types (not in `ARCHITECTURES`) are probed (`fasteer.carrier_probe`): each
distinct carrier shape of the table that resolves on the model is tried in a tiny forward,
steered at every stream point through its carriers and through plain hooks on the layers;
the first whose output matches (tolerance per dtype) gives fused carriers for
``resid_pre``/``resid_post`` -- ``resid_mid`` and the component outputs stay unavailable,
nothing outside the layer defines a reference for them. If none matches (or the model's
type is in the table but its modules do not match the entry), steering falls back to
``input``/``output`` hooks on the layers (a pre-hook on each layer, a hook on the last
layer's output, which may be a tensor or a tuple), where ``resid_mid`` and the component
outputs are unavailable (they lie inside the layer). One warning per model type says which
carriers were chosen and why; so does ``model_sites(model).verdict`` (and ``.source``:
"table", "probe" or "hooks"); ``fasteer info --model NAME`` prints both per site.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .layer_discovery import KNOWN_PATHS, find_layers, get_attr_path, stream_owner
from .ops import layout as L

STREAM_SITES = ("resid_pre", "resid_mid", "resid_post")
# Outputs of the attention and MLP sublayers, before they are added to the stream.
COMPONENT_SITES = ("attn_out", "mlp_out")
SITES = STREAM_SITES + COMPONENT_SITES
_COMPONENT_KEYS = {"attn_out": "attn", "mlp_out": "mlp"}

# Attribute paths (from the top-level CausalLM module) of the decoder-layer list,
# tried in order; other models' layer stacks are found by a scan of the module tree
# (`fasteer.layer_discovery`, which documents the rule).
_LAYER_PATHS = KNOWN_PATHS


def _get_attr_path(obj, path: str):
    return get_attr_path(obj, path)


def _find_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    return find_layers(model, layers_path)


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the layer list of a HF model (or its base model), found as
    `fasteer.layer_discovery.find_layers` says; ``layers_path`` names it explicitly."""
    return _find_layers(model, layers_path)[1]


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class NormFlavour:
    """How a norm module computes, in the terms of `fasteer.ops.layout`."""
    norm_kind: int            # L.NORM_RMS or L.NORM_LAYER
    eps_attr: str             # attribute holding epsilon ("a|b": the first that exists)
    weight_offset: float = 0.0
    cast_before_weight: bool = True
    class_hint: str = ""      # substring the module's class name must contain ("" = LayerNorm)


# LlamaRMSNorm and its copies: weight * round(x * rsqrt(mean(x^2) + eps)).
RMS_LLAMA = NormFlavour(L.NORM_RMS, "variance_epsilon", 0.0, True, "RMSNorm")
# GemmaRMSNorm (1, 2, 3): round(x * rsqrt(...) * (1 + w)) in float32.
RMS_GEMMA = NormFlavour(L.NORM_RMS, "eps", 1.0, False, "RMSNorm")
# Olmo2RMSNorm: round(w * x * rsqrt(...)) in float32.
RMS_OLMO2 = NormFlavour(L.NORM_RMS, "variance_epsilon", 0.0, False, "RMSNorm")
# torch.nn.LayerNorm (GPT-2, GPT-NeoX, Falcon).
LAYER_NORM = NormFlavour(L.NORM_LAYER, "eps")


@dataclass(frozen=True)
class CarrierSpec:
    kind: str                       # "norm" | "input" | "output"
    path: str                       # module path relative to the layer (final: to the base model)
    flavour: NormFlavour | None = None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    resid_pre: CarrierSpec          # per layer, relative to the layer
    resid_mid: CarrierSpec | None   # None: the point does not exist (parallel residual)
    final: CarrierSpec | None       # reads resid_post of the last layer; relative to the base model
    no_mid_reason: str = ""
    # the modules whose output is what the attention / MLP sublayer adds to the stream
    # (``output`` carriers, relative to the layer); None: not known for this architecture
    attn_out: CarrierSpec | None = None
    mlp_out: CarrierSpec | None = None
    no_component_reason: str = ""


def _outputs(attn: str, mlp: str) -> dict:
    """The component-output carriers: forward hooks on the modules whose output is added
    to the stream as it is (after a post-sublayer norm where the architecture has one)."""
    return {"attn_out": CarrierSpec("output", attn), "mlp_out": CarrierSpec("output", mlp)}


def _norm(path: str, flavour: NormFlavour) -> CarrierSpec:
    return CarrierSpec("norm", path, flavour)


_LAYER_INPUT = CarrierSpec("input", "")


def _llama_like(name: str, flavour: NormFlavour = RMS_LLAMA) -> Callable[[object], ArchSpec]:
    # residual = h; h = input_layernorm(h); h = self_attn(h); h = residual + h
    # residual = h; h = post_attention_layernorm(h); h = mlp(h); h = residual + h
    # (Phi-3 wraps both adds in a dropout, the identity at inference.)
    spec = ArchSpec(name, _norm("input_layernorm", flavour),
                    _norm("post_attention_layernorm", flavour), _norm("norm", flavour),
                    **_outputs("self_attn", "mlp|block_sparse_moe"))
    return lambda config: spec


def _gemma2_like(name: str) -> Callable[[object], ArchSpec]:
    # post_attention_layernorm normalises the attention *output*; the stream after the
    # attention add is read by pre_feedforward_layernorm.
    # What reaches the stream is the post-sublayer norms' output.
    spec = ArchSpec(name, _norm("input_layernorm", RMS_GEMMA),
                    _norm("pre_feedforward_layernorm", RMS_GEMMA), _norm("norm", RMS_GEMMA),
                    **_outputs("post_attention_layernorm", "post_feedforward_layernorm"))
    return lambda config: spec


def _olmo2(config) -> ArchSpec:
    # No norm reads the stream inside a layer: self_attn(h) and mlp(h) read it raw, and
    # `residual = h` is the same tensor, so an in-place pre-hook edit reaches the stream.
    # The sublayer outputs reach the stream through post_attention_layernorm and
    # post_feedforward_layernorm.
    return ArchSpec("olmo2", _LAYER_INPUT, CarrierSpec("input", "mlp"), _norm("norm", RMS_OLMO2),
                    **_outputs("post_attention_layernorm", "post_feedforward_layernorm"))


def _gpt2(config) -> ArchSpec:
    return ArchSpec("gpt2", _norm("ln_1", LAYER_NORM), _norm("ln_2", LAYER_NORM),
                    _norm("ln_f", LAYER_NORM), **_outputs("attn", "mlp"))


def _gpt_neox(config) -> ArchSpec:
    # attention(input_layernorm(h)) runs first; a parallel block then reads the same
    # (already edited) h with post_attention_layernorm, so only the first norm edits.
    # attention and mlp outputs pass a dropout (the identity at inference) before the add
    outputs = _outputs("attention", "mlp")
    if getattr(config, "use_parallel_residual", True):
        return ArchSpec("gpt_neox (parallel residual)", _norm("input_layernorm", LAYER_NORM), None,
                        _norm("final_layer_norm", LAYER_NORM),
                        "GPT-NeoX with use_parallel_residual=True adds attention and MLP "
                        "to the stream together, so there is no point after attention",
                        **outputs)
    return ArchSpec("gpt_neox", _norm("input_layernorm", LAYER_NORM),
                    _norm("post_attention_layernorm", LAYER_NORM),
                    _norm("final_layer_norm", LAYER_NORM), **outputs)


def _falcon(config) -> ArchSpec:
    new_arch = bool(getattr(config, "new_decoder_architecture", False))
    parallel = new_arch or bool(getattr(config, "parallel_attn", True))
    n_ln = getattr(config, "num_ln_in_parallel_attn", None)
    if new_arch and n_ln in (None, 2):
        # ln_attn(h) is called before ln_mlp(h): ln_attn edits, ln_mlp reads the edit.
        pre = _norm("ln_attn", LAYER_NORM)
    else:
        pre = _norm("input_layernorm", LAYER_NORM)
    final = _norm("ln_f", LAYER_NORM)
    outputs = _outputs("self_attention", "mlp")
    if parallel:
        return ArchSpec("falcon (parallel attention)", pre, None, final,
                        "Falcon with parallel attention adds attention and MLP to the "
                        "stream together, so there is no point after attention", **outputs)
    return ArchSpec("falcon", pre, _norm("post_attention_layernorm", LAYER_NORM), final,
                    **outputs)


ARCHITECTURES: dict[str, Callable[[object], ArchSpec]] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "mixtral": _llama_like("mixtral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "qwen3_moe": _llama_like("qwen3_moe"),
    "phi3": _llama_like("phi3"),
    "gemma": _llama_like("gemma", RMS_GEMMA),
    "gemma2": _gemma2_like("gemma2"),
    "gemma3_text": _gemma2_like("gemma3_text"),
    "olmo2": _olmo2,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
}

_FALLBACK = ArchSpec("hooks (unknown architecture)", _LAYER_INPUT, None, None,
                     "resid_mid lies inside the decoder layer, which fasteer can only reach "
                     "for architectures in fasteer.sites.ARCHITECTURES",
                     no_component_reason="which module's output an unknown architecture adds "
                     "to the stream (a sublayer, or a norm after it) is known only for "
                     "architectures in fasteer.sites.ARCHITECTURES")

_warned_types: set[str] = set()


# --------------------------------------------------------------------------- resolution

@dataclass
class StreamPoint:
    """One point of the residual stream and the module that carries edits there."""
    key: tuple[str, int]            # ("pre", l) for l in 0..L, ("mid", l), ("attn", l), ("mlp", l)
    kind: str                       # "norm" | "input" | "output"
    module: nn.Module
    flavour: NormFlavour | None = None


class ModelSites:
    """An architecture spec resolved against one live model.

    ``source`` says where the carriers came from -- ``"table"`` (an entry of
    `ARCHITECTURES`), ``"probe"`` (a table shape a probe forward checked against layer
    hooks on this model, `fasteer.carrier_probe`) or ``"hooks"`` (the fallback) -- and
    ``verdict`` why, in one line. ``base`` is the module whose forward takes the tokens
    (fasteer's per-forward metadata hook sits there), ``owner`` the module holding the
    layer list (the final norm is looked up there); they differ only for models whose
    layer stack lives in a submodule that does not take ``input_ids`` (BERT's encoder)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, layers_path: str, layers: nn.ModuleList,
                 base: nn.Module, hidden: int, model_type: str, *, owner: nn.Module | None = None,
                 source: str = "table", verdict: str = ""):
        self.model, self.spec, self.layers, self.base = model, spec, layers, base
        self.owner = base if owner is None else owner
        self.layers_path, self.hidden, self.model_type = layers_path, hidden, model_type
        self.source, self.verdict = source, verdict
        self.n_layers = len(layers)
        self.points: dict[tuple[str, int], StreamPoint] = {}
        for l, layer in enumerate(layers):
            self.points[("pre", l)] = _resolve(layer, spec.resid_pre, ("pre", l))
            if spec.resid_mid is not None:
                self.points[("mid", l)] = _resolve(layer, spec.resid_mid, ("mid", l))
            for site, key in _COMPONENT_KEYS.items():
                carrier = getattr(spec, site)
                if carrier is not None:
                    self.points[(key, l)] = _resolve(layer, carrier, (key, l))
        last = ("pre", self.n_layers)
        if spec.final is not None:
            self.points[last] = _resolve(self.owner, spec.final, last)
        else:
            self.points[last] = StreamPoint(last, "output", layers[-1])

    @property
    def is_fallback(self) -> bool:
        return self.spec is _FALLBACK

    def __repr__(self):
        return (f"ModelSites({self.model_type}, {self.n_layers} layers at {self.layers_path!r}, "
                f"{self.spec.name}; {self.source}: {self.verdict})")

    def stream_point(self, layer: int, site: str) -> tuple[str, int]:
        """The key of the carrier for ``site`` at ``layer``; raises if it does not exist."""
        if site not in SITES:
            raise ValueError(f"site: expected one of {SITES}, got {site!r}")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layers: layer {layer!r} out of range 0..{self.n_layers - 1} "
                             f"({self.model_type} has {self.n_layers} layers)")
        if site == "resid_pre":
            return ("pre", layer)
        if site == "resid_post":
            return ("pre", layer + 1)
        if site in _COMPONENT_KEYS:
            if getattr(self.spec, site) is None:
                raise ValueError(f"site: {site!r} is not supported for {self.spec.name} "
                                 f"({self.spec.no_component_reason})")
            return (_COMPONENT_KEYS[site], layer)
        if self.spec.resid_mid is None:
            raise ValueError(f"site: 'resid_mid' is not supported for {self.spec.name} "
                             f"({self.spec.no_mid_reason}); use 'resid_pre' or 'resid_post'")
        return ("mid", layer)


def _resolve(root: nn.Module, spec: CarrierSpec, key) -> StreamPoint:
    module = root
    if spec.path:
        # "a|b": the first attribute path that exists (a module renamed across
        # transformers versions, e.g. Mixtral's block_sparse_moe -> mlp in 5.x)
        module = next((m for m in (_get_attr_path(root, p) for p in spec.path.split("|"))
                       if m is not None), None)
    if not isinstance(module, nn.Module):
        raise _SpecMismatch(f"no module {spec.path!r} in {type(root).__name__}")
    if spec.kind == "norm":
        _check_norm(module, spec)
    return StreamPoint(key, spec.kind, module, spec.flavour)


class _SpecMismatch(Exception):
    pass


def norm_eps_attr(module: nn.Module, flavour: NormFlavour) -> str | None:
    """The attribute of ``module`` holding its epsilon: the first of ``flavour.eps_attr``'s
    ``|``-separated names that exists (a norm renamed it across transformers versions)."""
    return next((a for a in flavour.eps_attr.split("|") if hasattr(module, a)), None)


def _check_norm(module: nn.Module, spec: CarrierSpec) -> None:
    fl = spec.flavour
    name = type(module).__name__
    if fl.norm_kind == L.NORM_LAYER and not fl.class_hint:
        if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
            raise _SpecMismatch(f"{spec.path} is {name}, expected a 1-D torch.nn.LayerNorm")
    elif fl.class_hint not in name:
        raise _SpecMismatch(f"{spec.path} is {name}, expected an {fl.class_hint}")
    if norm_eps_attr(module, fl) is None:
        raise _SpecMismatch(f"{spec.path} ({name}) has no attribute {fl.eps_attr!r}")
    weight = getattr(module, "weight", None)
    # a LayerNorm named by class (Cohere's: no bias) must have its 1-D weight, like an RMSNorm
    if (fl.norm_kind == L.NORM_RMS or fl.class_hint) and (weight is None or weight.dim() != 1):
        raise _SpecMismatch(f"{spec.path} ({name}) has no 1-D weight")


def _hidden_size(model: nn.Module, layers: nn.ModuleList, base: nn.Module | None = None) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    emb = None
    if hasattr(model, "get_input_embeddings"):
        try:
            emb = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:      # a plain nn.Module: the first embedding table of the stream's entry
        emb = next((m for root in (base, model) if root is not None for m in root.modules()
                    if isinstance(m, nn.Embedding)), None)
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[-1])
    raise ValueError(f"model: cannot tell the hidden size of {type(model).__name__} "
                     "(no config.hidden_size and no input embeddings)")


def model_sites(model: nn.Module, layers_path: str | None = None) -> ModelSites:
    """Resolve the carriers of ``model``: its table entry when ``config.model_type`` is in
    `ARCHITECTURES`; else the table shape a probe forward verified on this model
    (`fasteer.carrier_probe`); else forward hooks on the layers -- with one warning per
    model type saying which and why (also in ``sites.verdict``). ``layers_path`` names the
    layer list (e.g. ``"encoder.layer"``); by default it is found as
    `fasteer.layer_discovery.find_layers` says."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a Hugging Face causal LM), "
                        f"got {type(model).__name__}")
    path, layers = _find_layers(model, layers_path)
    owner, base = stream_owner(model, path)
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", None) or type(model).__name__)
    hidden = _hidden_size(model, layers, base)
    common = dict(model=model, layers_path=path, layers=layers, base=base, hidden=hidden,
                  model_type=model_type)
    make = ARCHITECTURES.get(model_type)
    if make is not None:
        spec = make(config)
        try:
            return ModelSites(spec=spec, owner=owner, source="table",
                              verdict=f"model type {model_type!r} is in "
                                      "fasteer.sites.ARCHITECTURES", **common)
        except _SpecMismatch as exc:
            reason = f"the {model_type!r} model does not match fasteer's table ({exc})"
            sites = None
    else:
        from .carrier_probe import probe_sites
        sites, reason = probe_sites(common, owner, config)
    if sites is None:
        reason = (f"{reason}; steering through forward hooks on the layers at {path!r} "
                  "instead (same results, one extra launch per site; resid_mid, attn_out and "
                  "mlp_out unavailable)")
        sites = ModelSites(spec=_FALLBACK, owner=owner, source="hooks", verdict=reason,
                           **common)
    if model_type not in _warned_types:
        _warned_types.add(model_type)
        warnings.warn(f"fasteer: {reason}", stacklevel=3)
    return sites


from .site_families import FAMILIES as _FAMILIES  # noqa: E402
ARCHITECTURES.update(_FAMILIES)
