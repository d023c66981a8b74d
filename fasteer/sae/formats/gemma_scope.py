"""Gemma Scope format: one ``params.npz`` per SAE, in ``layer_{l}/width_{w}/average_l0_{n}/``.

What was checked (Gemma Scope tutorial code as reproduced in many repositories, and SAELens'
``gemma_2_sae_huggingface_loader`` / ``get_gemma_2_config_from_hf`` in
``sae_lens/loading/pretrained_sae_loaders.py``):

* ``params.npz`` holds ``W_enc [d_model, d_sae]``, ``W_dec [d_sae, d_model]``, ``b_enc [d_sae]``,
  ``b_dec [d_model]``, ``threshold [d_sae]`` (SAELens also accepts ``w_``-prefixed names).
* The published math is JumpReLU with *no* b_dec subtraction and no normalization::

      pre  = x @ W_enc + b_enc
      acts = (pre > threshold) * relu(pre)
      out  = acts @ W_dec + b_dec

  (SAELens: ``architecture="jumprelu"``, ``apply_b_dec_to_input=False``).
* The file says nothing about where the SAE was trained; the repository name does:
  ``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,...}``.  ``-res`` SAEs read the output
  of decoder layer l (SAELens hook ``blocks.{l}.hook_resid_post``); ``-mlp`` SAEs the MLP output
  and ``-att`` SAEs the attention ``z`` (not residual: ``site=None``).  The repository name is
  looked for in the hub id or anywhere in the local path (the Hugging Face cache keeps it as
  ``models--google--gemma-scope-2b-pt-res``); when it cannot be found the SAE is assumed to be a
  residual one, with a warning.  Embedding SAEs (``embedding/...``) get no layer and no site.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..sae import SAE
from ..._files import FileFormatError
from ._io import build_sae, read_npz

PARAMS_FILENAME = "params.npz"
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-([a-z_]+)")
_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")
_EMBEDDING = re.compile(r"(?:^|/)embedding(?:/|$)")


def _repo_kind(where: str) -> tuple[str | None, str | None]:
    """(model_name, kind) from a string naming a Gemma Scope repository, else (None, None)."""
    matches = _REPO.findall(where.replace("--", "/"))
    if not matches:
        return None, None
    size, variant, kind = matches[-1]
    model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    return model, kind.split("_")[0]


def load_gemma_scope(
    directory: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    where: str | None = None,
    source: str | None = None,
) -> SAE:
    """Read ``directory/params.npz``; ``where`` (hub id + subfolder) helps find the site."""
    path = directory / PARAMS_FILENAME
    raw = read_npz(path)
    arrays: dict[str, Any] = {}
    stored_as: dict[str, str] = {}
    for name, t in raw.items():
        canonical = "W_" + name[2:] if name.startswith("w_") else name
        if canonical in arrays:  # W_enc and w_enc: which one is meant cannot be known
            raise FileFormatError(
                path, f"array {name!r}", f"names the same tensor as array {stored_as[canonical]!r} ({canonical})"
            )
        arrays[canonical], stored_as[canonical] = t, name
    missing = [name for name in _TENSORS if name not in arrays]
    if missing:
        raise FileFormatError(path, None, f"missing arrays {missing} (found {sorted(raw)}); expected {list(_TENSORS)}")
    unknown = sorted(set(arrays) - set(_TENSORS))
    if unknown:
        raise FileFormatError(path, None, f"unexpected arrays {unknown}; a Gemma Scope SAE holds {list(_TENSORS)}")

    # The hub id (if any) and the full local path, where repository and folder names live.
    location = f"{where or ''}/{directory.resolve().as_posix()}"
    model_name, kind = _repo_kind(location)
    layers = _LAYER.findall(location)
    layer = int(layers[-1]) if layers else None
    is_embedding = _EMBEDDING.search(location) is not None

    site = None
    hook_name = None
    if is_embedding:
        layer, hook_name = None, "hook_embed"
    elif layer is not None:
        if kind in ("res", None):
            site, hook_name = "resid_post", f"blocks.{layer}.hook_resid_post"
            if kind is None:
                warnings.warn(
                    f"{path}: the path does not name a gemma-scope-*-res/-mlp/-att repository; "
                    f"assuming a residual-stream SAE at resid_post[{layer}] (the output of layer {layer})",
                    stacklevel=3,
                )
        elif kind == "mlp":
            hook_name = f"blocks.{layer}.hook_mlp_out"
        elif kind == "att":
            hook_name = f"blocks.{layer}.attn.hook_z"
        else:
            hook_name = f"layer_{layer}"

    metadata = {"gemma_scope_kind": kind} if kind else {}
    return build_sae(
        path,
        arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"],
        activation="jumprelu",
        threshold=arrays["threshold"],
        apply_b_dec_to_input=False,
        normalize_activations="none",
        model_name=model_name,
        hook_name=hook_name,
        layer=layer,
        site=site,
        source_format="gemma_scope",
        source=source,
        metadata=metadata,
        device=device,
        dtype=dtype,
    )
