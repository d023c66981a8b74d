"""The reference the patch layer is tested against: plain forward hooks, plain math.

Written independently of fasteer's carriers, tables and metadata: edits are applied by
hooks on the decoder layers (``resid_pre`` / ``resid_post``), on the module whose
output is added to the stream after attention (``resid_mid``) and on the modules whose
outputs are the attention / MLP sublayer outputs added to the stream (``attn_out`` /
``mlp_out``, `COMPONENTS`), in float32 with the formulas of DESIGN.md, to the tokens
a test names row by row. Which tokens are prompt tokens is told by the test (the
prompt's attention mask); the first forward after `HookReference.begin` is the prompt,
later forwards are generated tokens.

Also here: tiny random-weight models of every architecture in fasteer's table, built
from the real transformers config classes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP barriers stall badly on a busy
    shared CPU; restored afterwards so other test files keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# --------------------------------------------------------------------------- tiny models

_COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               vocab_size=97, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
               eos_token_id=None)


def _cfg(cls, **kw):
    args = dict(_COMMON)
    args.update(kw)
    return cls(**args)


# name -> (config factory, path of the module whose output is the attention branch that
#          is added to the stream to form resid_mid, None when resid_mid does not exist)
ARCHS = {
    "llama": (lambda: _cfg(tf.LlamaConfig, num_key_value_heads=2), "self_attn"),
    "mistral": (lambda: _cfg(tf.MistralConfig, num_key_value_heads=2), "self_attn"),
    "mixtral": (lambda: _cfg(tf.MixtralConfig, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2), "self_attn"),
    "qwen2": (lambda: _cfg(tf.Qwen2Config, num_key_value_heads=2), "self_attn"),
    "qwen3": (lambda: _cfg(tf.Qwen3Config, num_key_value_heads=2, head_dim=8), "self_attn"),
    "qwen3_moe": (lambda: _cfg(tf.Qwen3MoeConfig, num_key_value_heads=2, head_dim=8,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                               decoder_sparse_step=1), "self_attn"),
    "phi3": (lambda: _cfg(tf.Phi3Config, num_key_value_heads=2), "self_attn"),
    "gemma": (lambda: _cfg(tf.GemmaConfig, num_key_value_heads=2, head_dim=8), "self_attn"),
    "gemma2": (lambda: _cfg(tf.Gemma2Config, num_key_value_heads=2, head_dim=8,
                            sliding_window=4), "post_attention_layernorm"),
    "gemma3_text": (lambda: _cfg(tf.Gemma3TextConfig, num_key_value_heads=2, head_dim=8,
                                 sliding_window=4), "post_attention_layernorm"),
    "olmo2": (lambda: _cfg(tf.Olmo2Config, num_key_value_heads=2), "post_attention_layernorm"),
    "gpt2": (lambda: tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=64,
                                   pad_token_id=0, bos_token_id=None, eos_token_id=None),
             "attn"),
    "gpt_neox_parallel": (lambda: _cfg(tf.GPTNeoXConfig, use_parallel_residual=True), None),
    "gpt_neox_sequential": (lambda: _cfg(tf.GPTNeoXConfig, use_parallel_residual=False),
                            "attention"),
    "falcon_sequential": (lambda: _cfg(tf.FalconConfig, parallel_attn=False,
                                       new_decoder_architecture=False, alibi=False,
                                       bias=True), "self_attention"),
    "falcon_parallel": (lambda: _cfg(tf.FalconConfig, parallel_attn=True,
                                     new_decoder_architecture=False, alibi=False), None),
    "falcon_new": (lambda: _cfg(tf.FalconConfig, new_decoder_architecture=True, num_kv_heads=2,
                                num_ln_in_parallel_attn=2, parallel_attn=True), None),
    # issue 21: the families people run today (fasteer/site_families.py)
    "qwen2_moe": (lambda: _cfg(tf.Qwen2MoeConfig, num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=24,
                               shared_expert_intermediate_size=24, decoder_sparse_step=1),
                  "self_attn"),
    "phi": (lambda: _cfg(tf.PhiConfig, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0),
            None),
    "stablelm_parallel": (lambda: _cfg(tf.StableLmConfig, num_key_value_heads=2,
                                       use_parallel_residual=True), None),
    "stablelm_sequential": (lambda: _cfg(tf.StableLmConfig, num_key_value_heads=2,
                                         use_parallel_residual=False), "self_attn"),
    "cohere": (lambda: _cfg(tf.CohereConfig, num_key_value_heads=2, logit_scale=0.5), None),
    "cohere2": (lambda: _cfg(tf.Cohere2Config, num_key_value_heads=2, sliding_window=4,
                             layer_types=["sliding_attention", "sliding_attention",
                                          "full_attention"]), None),
    # residual_multiplier != 1, so the reference's resid_mid hook must scale the branch
    # (`BRANCH_SCALE`) and a wrong meaning of attn_out / mlp_out would show
    "granite": (lambda: _cfg(tf.GraniteConfig, num_key_value_heads=2, residual_multiplier=0.5,
                             embedding_multiplier=2.0, attention_multiplier=0.3,
                             logits_scaling=2.0), "self_attn"),
    "olmo": (lambda: _cfg(tf.OlmoConfig, num_key_value_heads=2), "self_attn"),
    "olmo3": (lambda: _cfg(tf.Olmo3Config, num_key_value_heads=2, sliding_window=4,
                           layer_types=["sliding_attention", "sliding_attention",
                                        "full_attention"]), "post_attention_layernorm"),
    "smollm3": (lambda: _cfg(tf.SmolLM3Config, num_key_value_heads=2, no_rope_layer_interval=2),
                "self_attn"),
    "llama4_text": (lambda: _cfg(tf.Llama4TextConfig, num_key_value_heads=2, head_dim=8,
                                 intermediate_size_mlp=48, num_local_experts=4,
                                 num_experts_per_tok=1, interleave_moe_layer_step=2,
                                 attention_chunk_size=16), "self_attn"),
    "glm4": (lambda: _cfg(tf.Glm4Config, num_key_value_heads=2, head_dim=8),
             "post_self_attn_layernorm"),
    "deepseek_v3": (lambda: _cfg(tf.DeepseekV3Config, num_key_value_heads=4,
                                 moe_intermediate_size=24, n_shared_experts=1, n_routed_experts=4,
                                 num_experts_per_tok=2, n_group=1, topk_group=1,
                                 first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                 qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
                    "self_attn"),
    "gpt_oss": (lambda: _cfg(tf.GptOssConfig, num_key_value_heads=2, head_dim=8,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             layer_types=["sliding_attention", "full_attention",
                                          "sliding_attention"]), "self_attn"),
    "mistral3": (lambda: tf.Mistral3Config(
        text_config=_cfg(tf.MistralConfig, num_key_value_heads=2, head_dim=8),
        vision_config=tf.PixtralVisionConfig(hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=8),
        image_token_index=1000), "self_attn"),
    "gemma3": (lambda: tf.Gemma3Config(
        text_config=_cfg(tf.Gemma3TextConfig, num_key_value_heads=2, head_dim=8,
                         sliding_window=4),
        vision_config=tf.SiglipVisionConfig(hidden_size=16, intermediate_size=24,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            image_size=16, patch_size=8),
        mm_tokens_per_image=4, image_token_index=1000, boi_token_index=1001,
        eoi_token_index=1002), "post_attention_layernorm"),
}

# config.model_type -> the factor the architecture multiplies the attention branch by
# before adding it to the stream (Granite: ``residual + h * residual_multiplier``); 1 when
# absent. `HookReference` reads it off the model it hooks.
BRANCH_SCALE = {"granite": lambda config: config.residual_multiplier}

# arch -> the model class (default: AutoModelForCausalLM)
MODEL_CLASSES = {"mistral3": "Mistral3ForConditionalGeneration",
                 "gemma3": "Gemma3ForConditionalGeneration"}


# name -> (path of the module whose output is the attention sublayer output added to the
#          stream, the same for the MLP sublayer), relative to the decoder layer. Read off
#          the decoder layers' forward in transformers 5.x: Llama-likes (Llama, Mistral,
#          Mixtral, Qwen2/3(-MoE), Phi-3 (dropout = identity at inference), Gemma) add
#          self_attn / mlp outputs as they are; Gemma-2/3 and OLMo-2 add the outputs of the
#          post-sublayer norms; GPT-2 adds attn / mlp; GPT-NeoX attention / mlp (through a
#          dropout); Falcon self_attention / mlp (parallel forms: `mlp_output +=
#          attention_output`, then added to the residual).
_LLAMA_COMPONENTS = ("self_attn", "mlp")
_POST_NORM_COMPONENTS = ("post_attention_layernorm", "post_feedforward_layernorm")
COMPONENTS = {
    "llama": _LLAMA_COMPONENTS,
    "mistral": _LLAMA_COMPONENTS,
    # transformers < 5 names Mixtral's MoE block block_sparse_moe (the floor CI runs 4.57)
    "mixtral": ("self_attn", "mlp|block_sparse_moe"),
    "qwen2": _LLAMA_COMPONENTS,
    "qwen3": _LLAMA_COMPONENTS,
    "qwen3_moe": _LLAMA_COMPONENTS,
    "phi3": _LLAMA_COMPONENTS,
    "gemma": _LLAMA_COMPONENTS,
    "gemma2": _POST_NORM_COMPONENTS,
    "gemma3_text": _POST_NORM_COMPONENTS,
    "olmo2": _POST_NORM_COMPONENTS,
    "gpt2": ("attn", "mlp"),
    "gpt_neox_parallel": ("attention", "mlp"),
    "gpt_neox_sequential": ("attention", "mlp"),
    "falcon_sequential": ("self_attention", "mlp"),
    "falcon_parallel": ("self_attention", "mlp"),
    "falcon_new": ("self_attention", "mlp"),
    # issue 21. Llama-likes add self_attn / mlp as they are (Qwen2-MoE, SmolLM3, DeepSeek-V3,
    # Mistral-3's Mistral text model; GPT-OSS's mlp returns (out, router scores), Llama-4's
    # feed_forward (out [B*T, D], router logits) in MoE layers); Phi, StableLM and Cohere
    # 1/2 add self_attn + mlp (Phi/StableLM through an inference-time identity dropout);
    # Granite adds residual_multiplier * self_attn / mlp -- the components are the
    # unscaled module outputs; OLMo-1 adds self_attn / mlp; GLM-4 the sandwich norms
    # post_self_attn_layernorm / post_mlp_layernorm; OLMo-3 (like OLMo-2) and Gemma-3 the
    # post-sublayer norms.
    "qwen2_moe": _LLAMA_COMPONENTS,
    "phi": _LLAMA_COMPONENTS,
    "stablelm_parallel": _LLAMA_COMPONENTS,
    "stablelm_sequential": _LLAMA_COMPONENTS,
    "cohere": _LLAMA_COMPONENTS,
    "cohere2": _LLAMA_COMPONENTS,
    "granite": _LLAMA_COMPONENTS,
    "olmo": _LLAMA_COMPONENTS,
    "olmo3": _POST_NORM_COMPONENTS,
    "smollm3": _LLAMA_COMPONENTS,
    "llama4_text": ("self_attn", "feed_forward"),
    "glm4": ("post_self_attn_layernorm", "post_mlp_layernorm"),
    "deepseek_v3": _LLAMA_COMPONENTS,
    "gpt_oss": _LLAMA_COMPONENTS,
    "mistral3": _LLAMA_COMPONENTS,
    "gemma3": _POST_NORM_COMPONENTS,
}

# reference point keys of the component sites
_COMPONENT_POINTS = {"attn_out": "attn", "mlp_out": "mlp"}


def component_paths(arch: str) -> tuple[str, str] | None:
    return COMPONENTS.get(arch)


def component_module(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at ``path``; "a|b" names alternatives across transformers versions."""
    for p in path.split("|"):
        try:
            return layer.get_submodule(p)
        except AttributeError:
            continue
    raise AttributeError(f"{type(layer).__name__} has none of {path!r}")


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of ``arch`` in eval mode, norm weights/biases randomised."""
    make, _ = ARCHS[arch]
    config = make()
    config.initializer_range = 0.15
    text = getattr(config, "text_config", None)
    if text is not None:                # multimodal wrappers: the language model's init
        text.initializer_range = 0.15
    torch.manual_seed(seed)
    cls = getattr(tf, MODEL_CLASSES[arch]) if arch in MODEL_CLASSES else tf.AutoModelForCausalLM
    if arch in MODEL_CLASSES:
        model = cls._from_config(config, attn_implementation="eager")
    else:
        model = cls.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        # non-trivial norm weights and biases, so a carrier using the wrong flavour shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


@functools.lru_cache(maxsize=None)
def cached_model(arch: str):
    """`tiny_model` built once per test session (tests always unpatch what they patch)."""
    return tiny_model(arch)


def branch_path(arch: str) -> str | None:
    return ARCHS[arch][1]


def branch_scale(model) -> float:
    """The factor the attention branch is multiplied by before the add (`BRANCH_SCALE`)."""
    config = getattr(model, "config", None)
    f = BRANCH_SCALE.get(getattr(config, "model_type", None))
    return 1.0 if f is None else float(f(config))


def prompt_batch(batch: int = 3, length: int = 7, pad: str = "left", seed: int = 1,
                 vocab: int = 97):
    """input_ids and attention_mask: row 1 has 2 pads, row 2 (if any) has 1 pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad != "none":
        for row, n in ((1, 2), (2, 1)):
            if row < batch:
                sl = slice(0, n) if pad == "left" else slice(length - n, length)
                mask[row, sl] = 0
                ids[row, sl] = 0
    return ids, mask


# --------------------------------------------------------------------------- reference edits

@dataclass
class RefEdit:
    """One intervention, as the reference reads it."""
    kind: str                                  # add | clamp | ablate | scale
    layers: list[int]
    site: str = "resid_post"
    vectors: dict | None = None                # layer -> tensor [D]
    value: float = 0.0                         # alpha / clamp value / scale factor
    positions: object = "all"                  # rule name or bool mask [B, T]
    cond: tuple | None = None                  # (kind, {layer: c}, threshold, bias, below)
    preserve_norm: bool = False

    def point(self, layer: int) -> tuple[str, int]:
        if self.site == "resid_pre":
            return ("pre", layer)
        if self.site == "resid_post":
            return ("pre", layer + 1)
        if self.site in _COMPONENT_POINTS:
            return (_COMPONENT_POINTS[self.site], layer)
        return ("mid", layer)


def _apply(edit: RefEdit, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The edit of DESIGN.md on float32 rows x [T, D]."""
    if edit.kind == "scale":
        return edit.value * x
    v = edit.vectors[layer].float()
    if edit.kind == "add":
        return x + edit.value * v
    u = (v.double() / v.double().norm()).float()
    proj = (x * u).sum(-1, keepdim=True)
    if edit.kind == "clamp":
        return x + (edit.value - proj) * u
    if edit.kind == "ablate":
        return x - proj * u
    raise ValueError(edit.kind)


def _passes(cond, layer: int, x_in: torch.Tensor) -> torch.Tensor:
    kind, vecs, threshold, bias, below = cond
    c = vecs[layer].float()
    dot = (x_in * c).sum(-1)
    if kind == "cosine":
        denom = x_in.norm(dim=-1) * c.norm()
        score = torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.zeros_like(dot))
    else:
        score = dot + bias
    return score <= threshold if below else score >= threshold


@dataclass
class HookReference:
    """Forward hooks steering ``model`` with per-row lists of `RefEdit`s."""
    model: torch.nn.Module
    layers: torch.nn.ModuleList
    branch: str | None
    row_edits: list = field(default_factory=list)   # per batch row: list[RefEdit]
    prompt_mask: torch.Tensor | None = None
    forward_index: int = -1
    # (attention module path, MLP module path) relative to a layer, as in `COMPONENTS`;
    # None: component sites (attn_out / mlp_out) unavailable
    components: tuple | None = None
    # the factor the model multiplies the branch by before adding it (Granite's
    # residual_multiplier); the resid_mid hook edits h_pre + scale * branch. None: read
    # off the model (`branch_scale`)
    branch_scale: float | None = None

    def __post_init__(self):
        if self.branch_scale is None:
            self.branch_scale = branch_scale(self.model)
        self.handles = []
        self._h_pre = {}

    def begin(self, prompt_mask: torch.Tensor) -> None:
        """The next forward is a prompt with this [B, T] attention mask."""
        self.prompt_mask, self.forward_index = prompt_mask, -1

    def __enter__(self):
        n = len(self.layers)
        if self.components is None:
            used = {e.site for edits in self.row_edits for e in edits}
            if used & set(_COMPONENT_POINTS):
                raise ValueError(f"HookReference: edits at "
                                 f"{sorted(used & set(_COMPONENT_POINTS))} need "
                                 "components=(attn path, mlp path)")
        self.handles.append(self.layers[0].register_forward_pre_hook(self._count))
        for l, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(l), with_kwargs=True))
            if self.components is not None:
                # registered before the resid_mid hook: where one module carries both (the
                # attention output, or Gemma-2's post_attention_layernorm), the component
                # edit comes first and resid_mid reads the stream it produced
                for key, path in zip(("attn", "mlp"), self.components):
                    mod = component_module(layer, path)
                    self.handles.append(mod.register_forward_hook(self._component((key, l))))
            if self.branch is not None:
                mod = layer.get_submodule(self.branch)
                self.handles.append(mod.register_forward_hook(self._mid(l)))
        self.handles.append(self.layers[n - 1].register_forward_hook(self._post_last(n)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- token selection ----------------------------------------------------------------
    def _select(self, edit: RefEdit, row: int, T: int) -> torch.Tensor:
        prompt = self.forward_index == 0
        if prompt:
            real = self.prompt_mask[row, -T:].bool()
        else:
            real = torch.ones(T, dtype=torch.bool)
        rule = edit.positions
        if isinstance(rule, torch.Tensor):
            m = rule if rule.dim() == 1 else rule[row]
            sel = m.bool() if prompt else torch.zeros(T, dtype=torch.bool)
        elif rule == "all":
            sel = torch.ones(T, dtype=torch.bool)
        elif rule == "prompt":
            sel = torch.full((T,), prompt)
        elif rule == "generated":
            sel = torch.full((T,), not prompt)
        elif rule == "last_prompt":
            sel = torch.zeros(T, dtype=torch.bool)
            if prompt and bool(real.any()):
                sel[int(torch.nonzero(real).max())] = True
        else:
            raise ValueError(rule)
        return sel & real

    def _steer(self, point, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for row, edits in enumerate(self.row_edits):
            todo = [(e, l) for e in edits for l in e.layers if e.point(l) == point]
            if not todo:
                continue
            h = x[row].float()
            h_in = h.clone()
            for e, l in todo:
                sel = self._select(e, row, h.shape[0])
                if e.cond is not None:
                    sel = sel & _passes(e.cond, l, h_in)
                new = _apply(e, l, h)
                if e.preserve_norm:
                    before, after = h.norm(dim=-1, keepdim=True), new.norm(dim=-1, keepdim=True)
                    new = torch.where(after > 0, new * before / after.clamp_min(1e-30), new)
                h = torch.where(sel.unsqueeze(-1), new, h)
            out[row] = h.to(x.dtype)
        return out

    # -- hooks ----------------------------------------------------------------------------
    def _count(self, module, args):
        self.forward_index += 1

    def _pre(self, l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            new = self._steer(("pre", l), h)
            self._h_pre[l] = new
            if args:
                return (new,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = new
            return args, kwargs
        return hook

    def _mid(self, l):
        def hook(module, args, output):
            branch = output[0] if isinstance(output, tuple) else output
            h_pre = self._h_pre[l]
            if self.branch_scale == 1.0:
                mid = h_pre + branch
                new_branch = self._steer(("mid", l), mid) - h_pre
            else:
                # the model computes h_pre + branch * scale
                mid = h_pre + branch * self.branch_scale
                new_branch = (self._steer(("mid", l), mid) - h_pre) / self.branch_scale
            if isinstance(output, tuple):
                return (new_branch,) + tuple(output[1:])
            return new_branch
        return hook

    def _component(self, point):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            shape = self._h_pre[point[1]].shape
            if h.dim() == 2 and len(shape) == 3:
                # a sublayer returning flattened tokens [B*T, D] (Llama-4's MoE): rows are
                # batch rows of the layer input
                new = self._steer(point, h.view(shape)).view(h.shape)
            else:
                new = self._steer(point, h)
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            return new
        return hook

    def _post_last(self, n):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = self._steer(("pre", n), h)
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            return new
        return hook


# --------------------------------------------------------------------------- pairs

def pair(kind: str, layers, *, site="resid_post", vectors=None, value=0.0, positions="all",
         cond=None, preserve_norm=False):
    """The same intervention twice: (fasteer object, RefEdit)."""
    import fasteer as fs
    layers = list(layers)
    when = None
    if cond is not None:
        ckind, cvecs, thr, bias, below = cond
        when = (fs.Cosine(cvecs, thr, below=below) if ckind == "cosine"
                else fs.Projection(cvecs, thr, bias=bias, below=below))
    common = dict(layers=layers, site=site, positions=positions, when=when,
                  preserve_norm=preserve_norm)
    if kind == "add":
        iv = fs.Add(vectors, value, **common)
    elif kind == "clamp":
        iv = fs.Clamp(vectors, value, **common)
    elif kind == "ablate":
        iv = fs.Ablate(vectors, **common)
    elif kind == "scale":
        iv = fs.Scale(value, **common)
    else:
        raise ValueError(kind)
    return iv, RefEdit(kind, layers, site, vectors, value, positions, cond, preserve_norm)


def random_vectors(layers, hidden: int, seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(hidden, generator=g) * scale for l in layers}


# --------------------------------------------------------------------------- running both

GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def _static_cache_works(model) -> bool:
    """transformers 4.57's StaticCache gives keys and values one head size, which
    DeepSeek-V3's attention (qk_head_dim != v_head_dim) breaks -- in the unpatched model
    too; transformers 5 sizes them apart."""
    import transformers
    too_old = int(transformers.__version__.split(".")[0]) < 5
    return not (too_old and getattr(model.config, "model_type", "") == "deepseek_v3")


def supported_caches(model, caches):
    return tuple(c for c in caches if c != "static" or _static_cache_works(model))


def _generate(model, ids, mask, cache: str):
    kw = dict(GENERATE)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def fasteer_outputs(model, sets, ids, mask, caches=("dynamic", "static")):
    """Patch, ``set`` each (interventions, rows) in ``sets``, run; always unpatches.

    Returns (logits of one forward, {cache kind: generated tokens}).
    """
    import fasteer as fs
    st = fs.patch(model)
    try:
        for ivs, rows in sets:
            st.set(*ivs, rows=rows)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gens = {c: _generate(model, ids, mask, c) for c in supported_caches(model, caches)}
    finally:
        st.unpatch()
    return logits, gens


def reference_outputs(model, arch, row_edits, ids, mask, caches=("dynamic", "static")):
    """The same with `HookReference` (``row_edits``: per batch row, a list of RefEdits)."""
    from fasteer.sites import decoder_layers
    ref = HookReference(model, decoder_layers(model), branch_path(arch), row_edits,
                        components=component_paths(arch))
    with ref, torch.no_grad():
        ref.begin(mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
        gens = {}
        for c in supported_caches(model, caches):
            ref.begin(mask)
            gens[c] = _generate(model, ids, mask, c)
    return logits, gens


def plain_outputs(model, ids, mask, caches=("dynamic",)):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits, {c: _generate(model, ids, mask, c) for c in caches}


def assert_same(fs_out, ref_out, atol=1e-5):
    """Logits within ``atol`` and identical greedy tokens."""
    (lf, gf), (lr, gr) = fs_out, ref_out
    diff = float((lf - lr).abs().max())
    assert diff <= atol, f"logits differ from the hook reference by {diff:.3g}"
    for c in gr:
        assert torch.equal(gf[c], gr[c]), f"greedy tokens ({c} cache) differ:\n{gf[c]}\n{gr[c]}"
