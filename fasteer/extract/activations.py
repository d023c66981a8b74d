"""Collect residual-stream activations of a HF causal LM for a list of prompts.

Every extraction method (CAA, PCA, instruction vectors, ablation directions) reduces to "the
residual stream at layers L, at the last real token (or averaged over real tokens), for each
prompt".  This module does that once, well:

* **One forward per batch for all layers.**  Forward hooks on
  ``fasteer.sites.decoder_layers(model)[l]`` read ``resid_post[l]`` (the layer's output, first
  element when it is a tuple); forward pre-hooks read ``resid_pre[l]`` (the layer's input).  The
  hook reduces ``[B, T, D]`` to ``[B, D]`` on the spot, so memory stays at one vector per prompt
  per layer.  Once every requested layer has been read, the forward is cut short (the layers
  above and the LM head would only be thrown away).
* **Padding never leaks in.**  Prompts are tokenized one by one and padded here (the tokenizer's
  ``padding_side`` unless ``padding_side=`` says otherwise; the tokenizer is not modified, so a
  tokenizer without a pad token works).  The attention mask marks real tokens, each row's last
  real token is found from the mask (left and right padding alike), and ``position_ids`` are
  ``cumsum(mask) - 1`` as in ``generate``, so a left-padded row sees the same positions as it
  would alone (this matters for absolute position embeddings such as GPT-2's).
* **``torch.inference_mode`` and ``model.eval()``** (restored afterwards): no autograd state, no
  dropout.
* **Chat templates** (``chat_template=True``): each prompt becomes a user message (after an
  optional system message) through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``,
  so the last token is where the assistant's answer would start.
* **Bad input fails before any forward**: non-string prompts, empty lists, layers out of range,
  prompts that tokenize to nothing.
"""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fasteer.sites import decoder_layers

POSITIONS = ("last", "mean")
HOOK_SITES = ("resid_pre", "resid_post")


class _StopForward(Exception):
    """Raised from a hook once every requested layer has been read."""


# ----------------------------------------------------------------- validation
def check_prompts(prompts: Any, name: str) -> list[str]:
    """``prompts`` as a non-empty list of strings, or a clear error naming ``name``."""
    if isinstance(prompts, str) or not isinstance(prompts, (Sequence, Iterable)):
        raise TypeError(f"{name}: expected a list of prompt strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name}: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]: expected a prompt string, got {type(p).__name__}")
    return prompts


def check_pairs(positive: Any, negative: Any, names: tuple[str, str] = ("positive", "negative")) -> tuple[list[str], list[str]]:
    """Two prompt lists of equal, non-zero length (paired contrast prompts)."""
    pos = check_prompts(positive, names[0])
    neg = check_prompts(negative, names[1])
    if len(pos) != len(neg):
        raise ValueError(
            f"{names[0]}/{names[1]}: expected paired prompt lists of equal length, "
            f"got {len(pos)} and {len(neg)}"
        )
    return pos, neg


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layers(model: nn.Module, layers: Any) -> list[int]:
    """Sorted unique layer indices (negative ones count from the end); ``None`` = all layers."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected an int or an iterable of ints, got {type(layers).__name__}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layers: expected ints, got {layer!r}")
        if not -n <= layer < n:
            raise ValueError(f"layers: layer {layer} out of range for a model with {n} decoder layers (expected 0..{n - 1})")
        out.append(int(layer) % n)
    if not out:
        raise ValueError("layers: expected at least one layer, got none")
    return sorted(set(out))


def _check_options(position: str, site: str, batch_size: Any, padding_side: Any) -> None:
    if position not in POSITIONS:
        raise ValueError(f"position: expected one of {', '.join(POSITIONS)}, got {position!r}")
    if site not in HOOK_SITES:
        raise ValueError(
            f"site: activations can be collected at {', '.join(HOOK_SITES)}; got {site!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side: expected 'left', 'right' or None, got {padding_side!r}")


# ----------------------------------------------------------------- tokenizing
def encode_prompts(
    tokenizer: Any,
    prompts: list[str],
    *,
    chat_template: bool = False,
    system_prompt: str | None = None,
    name: str = "prompts",
) -> list[list[int]]:
    """Token ids of each prompt (no padding), with the chat template applied if asked."""
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt: expected a string or None, got {type(system_prompt).__name__}")
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True: the tokenizer has no chat template (tokenizer.chat_template is empty)")
        texts = []
        for p in prompts:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
            messages.append({"role": "user", "content": p})
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # The template already holds BOS and the other special tokens.
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        if system_prompt is not None:
            raise ValueError("system_prompt: only used with chat_template=True")
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    ids = [list(map(int, row)) for row in ids]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"{name}[{i}]: prompt {prompts[i]!r} tokenizes to no tokens")
    return ids


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``rows`` padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # masked out anyway


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _reduce(h: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, position: str) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, D]`` float32: the last real token, or the mean over real tokens."""
    if h.dim() != 3 or h.shape[:2] != mask.shape:
        raise RuntimeError(
            f"expected a [batch, seq, hidden] residual stream of batch/seq {tuple(mask.shape)}, got {tuple(h.shape)}"
        )
    h = h.float()
    if position == "last":
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
    # Padded positions may hold garbage (even NaN from fully-masked attention rows): select, don't multiply.
    return torch.where(m > 0, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1) / m.sum(1)


def _used_norms(h: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, position: str) -> torch.Tensor:
    """float64 L2 norms (CPU, 1-D) of ``h [B, T, D]`` at the positions `_reduce` reads."""
    if position == "last":
        rows = h[torch.arange(h.shape[0], device=h.device), last]
        return torch.linalg.vector_norm(rows.double(), dim=-1).cpu()
    return torch.linalg.vector_norm(h[mask.to(h.device) > 0].double(), dim=-1).cpu()


def median_norms(norms: dict[int, list[torch.Tensor]]) -> dict[int, float]:
    """``{layer: median}`` of the norms `collect_encoded` recorded (``norms=``); the median
    of an even count is the mean of the two middle values (``numpy.median``)."""
    return {layer: float(np.median(torch.cat(chunks).numpy()))
            for layer, chunks in sorted(norms.items())}


def resid_norm_metadata(norms: dict[int, float]) -> dict[str, float]:
    """``{layer: norm}`` as stored in a vector's metadata ``resid_norm`` (string keys: JSON)."""
    return {str(int(layer)): float(n) for layer, n in norms.items()}


# ------------------------------------------------------------------ collection
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Any = None,
    *,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
    desc: str = "collecting activations",
    name: str = "prompts",
) -> dict[int, torch.Tensor]:
    """Residual-stream activations ``{layer: Tensor[len(prompts), D]}`` (float32, CPU).

    ``site``: ``"resid_post"`` (output of layer ``l``) or ``"resid_pre"`` (its input).
    ``position``: ``"last"`` (last real token) or ``"mean"`` (mean over real tokens, BOS and
    template tokens included).  ``progress=False`` hides the progress bar."""
    prompts = check_prompts(prompts, name)
    layer_ids = resolve_layers(model, layers)
    _check_options(position, site, batch_size, padding_side)
    encoded = encode_prompts(tokenizer, prompts, chat_template=chat_template, system_prompt=system_prompt, name=name)
    return collect_encoded(
        model, tokenizer, encoded, layer_ids, site=site, position=position, batch_size=batch_size,
        padding_side=padding_side, progress=progress, desc=desc,
    )


def collect_encoded(
    model: nn.Module,
    tokenizer: Any,
    encoded: list[list[int]],
    layer_ids: list[int],
    *,
    site: str,
    position: str,
    batch_size: int,
    padding_side: str | None,
    progress: bool,
    desc: str,
    norms: dict[int, list[torch.Tensor]] | None = None,
) -> dict[int, torch.Tensor]:
    """`collect_activations` on already validated token ids and layer indices.

    ``norms`` (a dict, filled in place): ``{layer: [float64 tensors]}``, the L2 norms of
    the residual stream at the token positions the reduction used (the last real token for
    ``position="last"``, every real token for ``"mean"``), for `median_norms`."""
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"tokenizer.padding_side: expected 'left' or 'right', got {side!r}")
    pad_id = _pad_id(tokenizer)
    device = _model_device(model)
    modules = decoder_layers(model)
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters

    batch: dict[str, torch.Tensor] = {}
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layer_ids}
    seen: set[int] = set()

    def record(layer: int, h: Any) -> None:
        if isinstance(h, tuple):
            h = h[0]
        if not isinstance(h, torch.Tensor):
            raise RuntimeError(f"decoder layer {layer} produced {type(h).__name__}, expected a tensor")
        captured[layer].append(_reduce(h, batch["mask"], batch["last"], position).cpu())
        if norms is not None:
            norms.setdefault(layer, []).append(_used_norms(h, batch["mask"], batch["last"], position))
        seen.add(layer)
        if len(seen) == len(layer_ids):
            raise _StopForward

    def post_hook(layer: int):
        return lambda module, args, output: record(layer, output)

    def pre_hook(layer: int):
        def hook(module, args, kwargs):
            record(layer, args[0] if args else kwargs.get("hidden_states"))
        return hook

    handles = []
    was_training = model.training
    try:
        for layer in layer_ids:
            if site == "resid_post":
                handles.append(modules[layer].register_forward_hook(post_hook(layer)))
            else:
                handles.append(modules[layer].register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
        model.eval()
        starts = range(0, len(encoded), batch_size)
        with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, disable=not progress, unit="prompt") as bar:
            for start in starts:
                rows = encoded[start:start + batch_size]
                input_ids, mask = pad_batch(rows, pad_id, side)
                input_ids, mask = input_ids.to(device), mask.to(device)
                # Last real token of each row, whatever the padding side.
                positions = torch.arange(mask.shape[1], device=device).expand_as(mask)
                batch["mask"] = mask
                batch["last"] = torch.where(mask > 0, positions, -1).max(dim=1).values
                kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
                if accepts_positions:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                seen.clear()
                try:
                    model(**kwargs)
                except _StopForward:
                    pass
                if len(seen) != len(layer_ids):
                    missing = sorted(set(layer_ids) - seen)
                    raise RuntimeError(f"the forward pass never reached decoder layers {missing}")
                bar.update(len(rows))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {layer: torch.cat(chunks) for layer, chunks in captured.items()}


def resid_norms(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Any = None,
    *,
    site: str = "resid_post",
    position: str = "all",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """``{layer: median L2 norm of the residual stream}`` at ``site`` over ``prompts``.

    The reference length of ``fs.Add(v, alpha, scale="resid")``: extractors record it
    themselves (metadata ``resid_norm``); this measures it for a vector that lacks it
    (``vec.with_resid_norm(model, tok, prompts)``). ``position``: ``"all"`` (every real
    token, BOS and template tokens included; the median is robust to a BOS outlier) or
    ``"last"`` (each prompt's last real token). ``site``: ``"resid_post"`` or
    ``"resid_pre"``. Other arguments as in `collect_activations`."""
    if position not in ("all", "last"):
        raise ValueError(f"position: expected 'all' or 'last', got {position!r}")
    prompts = check_prompts(prompts, "prompts")
    layer_ids = resolve_layers(model, layers)
    reduce = "mean" if position == "all" else "last"
    _check_options(reduce, site, batch_size, padding_side)
    encoded = encode_prompts(tokenizer, prompts, chat_template=chat_template,
                             system_prompt=system_prompt, name="prompts")
    norms: dict[int, list[torch.Tensor]] = {}
    collect_encoded(model, tokenizer, encoded, layer_ids, site=site, position=reduce,
                    batch_size=batch_size, padding_side=padding_side, progress=progress,
                    desc="residual norms", norms=norms)
    return median_norms(norms)


def model_metadata(model: nn.Module, method: str, **extras: Any) -> dict[str, Any]:
    """The metadata every extraction method stores with its vector."""
    config = getattr(model, "config", None)
    meta: dict[str, Any] = {
        "model_name": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "method": method,
    }
    meta.update({k: v for k, v in extras.items() if v is not None})
    return {k: v for k, v in meta.items() if v is not None}


def collect_contrast(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Any,
    *,
    paired: bool,
    names: tuple[str, str] = ("positive", "negative"),
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
    padding_side: str | None = None,
    progress: bool = True,
    desc: str = "collecting activations",
    resid_norm: dict[int, float] | None = None,
) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Activations of two prompt sets in one pass: ``(layers, {l: [P, D]}, {l: [N, D]})``.

    Both sets are validated (and, if ``paired``, required to have equal length) before any
    forward; they share batches and one progress bar. ``resid_norm`` (a dict, filled in
    place): ``{layer: median L2 norm}`` of the stream over the positions read, both sets
    pooled (what extractors store as metadata ``resid_norm``)."""
    if paired:
        pos, neg = check_pairs(positive, negative, names)
    else:
        pos, neg = check_prompts(positive, names[0]), check_prompts(negative, names[1])
    layer_ids = resolve_layers(model, layers)
    _check_options(position, site, batch_size, padding_side)
    enc = dict(chat_template=chat_template, system_prompt=system_prompt)
    encoded = encode_prompts(tokenizer, pos, name=names[0], **enc) + encode_prompts(tokenizer, neg, name=names[1], **enc)
    norms: dict[int, list[torch.Tensor]] | None = {} if resid_norm is not None else None
    acts = collect_encoded(
        model, tokenizer, encoded, layer_ids, site=site, position=position, batch_size=batch_size,
        padding_side=padding_side, progress=progress, desc=desc, norms=norms,
    )
    if resid_norm is not None:
        resid_norm.update(median_norms(norms))
    n = len(pos)
    return layer_ids, {l: a[:n] for l, a in acts.items()}, {l: a[n:] for l, a in acts.items()}
