"""Hook names of the SAE projects -> (layer, residual site).

Why this exists: an SAE is only correct at the point of the stream it was trained on, and
each project names that point its own way.  fasteer speaks of three residual sites
(``resid_pre[l]`` = input of decoder layer l, ``resid_mid[l]`` = after attention, before the
MLP, ``resid_post[l]`` = output of layer l); everything else (MLP outputs, attention ``z``,
embeddings, single heads) is *not* a residual site, so it maps to ``site=None`` and the
patch layer can refuse to put such an SAE on the stream.

Naming conventions handled (all checked against the projects' code):

* SAELens / TransformerLens: ``blocks.{l}.hook_resid_pre|mid|post`` (residual),
  ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.attn.hook_z``, ``blocks.{l}.ln2.hook_normalized``,
  ``hook_embed`` (not residual).
* EleutherAI sparsify: hookpoints are module names of the *base* HF model
  (``AutoModel``): ``layers.{l}`` (Llama/Gemma/NeoX ...), ``h.{l}`` (GPT-2); the hook reads the
  module's output, so a whole decoder layer = ``resid_post[l]``.  ``layers.{l}.mlp`` etc. are
  sub-module outputs, not residual.  Fully qualified variants (``model.layers.{l}``,
  ``transformer.h.{l}``, ``gpt_neox.layers.{l}``) are accepted too.
* Gemma Scope folders ``layer_{l}/width_16k/average_l0_71``: only the layer is in the name;
  whether it is a residual SAE depends on the repository (``gemma-scope-*-res``), which the
  Gemma Scope loader decides.
"""
from __future__ import annotations

import re

SITES = ("resid_pre", "resid_mid", "resid_post")

_TL_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_TL_ANY_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_HF_LAYER = re.compile(
    r"^(?:(?:model|transformer|gpt_neox|base_model|model\.language_model|model\.decoder)\.)?"
    r"(?:layers|h)\.(\d+)$"
)
_HF_SUBMODULE = re.compile(
    r"^(?:(?:model|transformer|gpt_neox|base_model|model\.language_model|model\.decoder)\.)?"
    r"(?:layers|h)\.(\d+)\..+$"
)
_GEMMA_SCOPE_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


def parse_hook_name(hook_name: str | None) -> tuple[int | None, str | None]:
    """Return ``(layer, site)`` for a hook name; ``site`` is None for non-residual points.

    Examples: ``blocks.8.hook_resid_pre`` -> (8, "resid_pre"); ``layers.6`` -> (6, "resid_post");
    ``layers.6.mlp`` -> (6, None); ``blocks.3.attn.hook_z`` -> (3, None); ``hook_embed`` ->
    (None, None); ``layer_20/width_16k/average_l0_71`` -> (20, None) (the Gemma Scope loader
    adds the site from the repository kind).
    """
    if not hook_name:
        return None, None
    name = hook_name.strip()
    m = _TL_RESID.match(name)
    if m:
        return int(m.group(1)), f"resid_{m.group(2)}"
    m = _HF_LAYER.match(name)
    if m:
        return int(m.group(1)), "resid_post"
    m = _TL_ANY_BLOCK.match(name) or _HF_SUBMODULE.match(name)
    if m:
        return int(m.group(1)), None
    m = _GEMMA_SCOPE_LAYER.search(name)
    if m:
        return int(m.group(1)), None
    return None, None


def saelens_hook_name(layer: int | None, site: str | None) -> str | None:
    """The TransformerLens hook name of a residual site (``blocks.{l}.hook_resid_post``)."""
    if layer is None or site is None:
        return None
    return f"blocks.{layer}.hook_{site}"
