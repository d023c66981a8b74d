"""What an SAE feature responds to: its top-activating contexts, for labelling by eye.

`top_contexts` runs the model over ``texts`` (batched, right padding, cut short once the
SAE's site has been read), encodes the stream there with the SAE and keeps, for every
requested feature, the ``k`` tokens with the largest activation ``z > 0`` -- ties broken
by text index, then position, so the result does not depend on batching -- together with
the token, its left context and the feature's firing rate over all counted tokens.
`format_contexts` renders the result as markdown (the activating token marked
``⟦token⟧``); `label_table` does both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .quality import _bool, _positive_int, encode_texts, model_batches, resolve_point
from .sae import SAE
from .site_reader import PointReader


@dataclass(frozen=True)
class Context:
    """One activation of a feature: ``texts[text_index]``'s token at ``position``."""
    text_index: int
    position: int
    token_id: int
    token: str          # the token, decoded
    left: str           # the ``window`` tokens before it, decoded
    left_ids: tuple[int, ...]
    value: float        # the feature's activation z there


class FeatureContexts(list):
    """A feature's top `Context` list (best first), plus its firing statistics:
    ``feature``, ``density`` (fraction of counted tokens with z > 0), ``n_active`` and
    ``n_tokens``."""

    def __init__(self, feature: int, contexts, n_active: int, n_tokens: int):
        super().__init__(contexts)
        self.feature = feature
        self.n_active = n_active
        self.n_tokens = n_tokens
        self.density = n_active / n_tokens if n_tokens else 0.0

    def __repr__(self) -> str:
        return (f"FeatureContexts(feature={self.feature}, density={self.density:.4g}, "
                f"{list.__repr__(self)})")


class _SiteRead(Exception):
    pass


def _features(features: Any, d_sae: int) -> list[int]:
    if isinstance(features, bool):
        raise TypeError(f"features: expected an int or a sequence of ints, got {features!r}")
    if isinstance(features, int):
        features = [features]
    elif isinstance(features, torch.Tensor):
        if features.dim() > 1 or features.is_floating_point() or features.dtype == torch.bool:
            raise TypeError(f"features: expected a 1-D integer tensor, got {features.dtype}")
        features = features.reshape(-1).tolist()
    elif isinstance(features, (str, bytes)) or not hasattr(features, "__iter__"):
        raise TypeError(f"features: expected an int or a sequence of ints, got "
                        f"{type(features).__name__}")
    out = []
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int) and not hasattr(f, "__index__"):
            raise TypeError(f"features: expected ints, got {f!r}")
        f = int(f)
        if not 0 <= f < d_sae:
            raise ValueError(f"features: id {f} out of range; expected 0 <= id < d_sae = {d_sae}")
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError("features: expected at least one feature id")
    return out


def _decode(tokenizer: Any, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False) if len(ids) else ""


def top_contexts(model: nn.Module, tokenizer: Any, sae: SAE, texts: Sequence[str], features: Any,
                 *, k: int = 10, window: int = 8, layer: int | None = None,
                 site: str | None = None, batch_size: int = 8, max_length: int | None = 128,
                 skip_first: bool = False, progress: bool = True) -> dict[int, FeatureContexts]:
    """The ``k`` largest activations of each of ``features`` over the real tokens of ``texts``.

    Returns ``{feature: FeatureContexts}`` in the order the features were given; each list
    holds at most ``k`` `Context` (fewer when the feature fires on fewer tokens; only
    ``z > 0`` counts), sorted by value, ties by text index then position.  ``window``
    (>= 0) tokens of left context are kept.  Texts are tokenized like `sae_quality`
    (special tokens included, cut to ``max_length``); ``skip_first`` leaves position 0 of
    every text out (the BOS / attention-sink token, which some features fire on hugely).
    ``density`` counts the same tokens.  Activations are the SAE's exact ``encode`` (every
    feature, so TopK SAEs are right) on the stream at ``site[layer]`` (default: the SAE's).
    """
    sites, layer, site, key = resolve_point(model, sae, layer, site, "top_contexts")
    ids_f = _features(features, sae.d_sae)
    k = _positive_int(k, "k")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected a non-negative int, got {window!r}")
    batch_size = _positive_int(batch_size, "batch_size")
    max_length = _positive_int(max_length, "max_length", allow_none=True)
    skip_first = _bool(skip_first, "skip_first")
    progress = _bool(progress, "progress")
    encoded = encode_texts(tokenizer, texts, max_length)

    from ..extract.activations import _model_device

    sae_here = sae.to(_model_device(model))
    cols = torch.tensor(ids_f, dtype=torch.long, device=sae_here.device)
    stride = max(len(r) for r in encoded) + 1
    # per feature: best values (float64) and global ids text * stride + position
    best_v = [torch.empty(0, dtype=torch.float64) for _ in ids_f]
    best_g = [torch.empty(0, dtype=torch.long) for _ in ids_f]
    n_active = torch.zeros(len(ids_f), dtype=torch.int64)
    n_tokens = 0
    seen: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> None:
        seen["h"] = h
        raise _SiteRead

    reader = PointReader(sites, key, read)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), tqdm(total=len(encoded), desc="top contexts",
                                          disable=not progress, unit="text") as bar:
            for start, ids, mask, kwargs in model_batches(model, tokenizer, encoded, batch_size):
                seen.clear()
                try:
                    model(**kwargs)
                except _SiteRead:
                    pass
                if "h" not in seen:
                    raise RuntimeError(f"the forward pass never reached {site}[{layer}]")
                real = mask.bool()
                if skip_first:
                    real[:, 0] = False
                rows, pos = real.nonzero(as_tuple=True)              # row-major: text, position
                z = sae_here.encode(seen.pop("h")[rows, pos]).index_select(-1, cols).double().cpu()
                gid = ((rows + start) * stride + pos).cpu()
                n_tokens += int(rows.numel())
                n_active += (z > 0).sum(0)
                for j in range(len(ids_f)):
                    col = z[:, j]
                    keep = col > 0
                    if int(keep.sum()) > k:                            # cheap pre-filter, ties kept
                        keep &= col >= torch.topk(col, k).values[-1]
                    v = torch.cat([best_v[j], col[keep]])
                    g = torch.cat([best_g[j], gid[keep]])
                    order = torch.argsort(g, stable=True)              # ties: text, then position
                    order = order[torch.argsort(v[order], descending=True, stable=True)][:k]
                    best_v[j], best_g[j] = v[order], g[order]
                bar.update(ids.shape[0])
    finally:
        reader.remove()
        model.train(was_training)

    out: dict[int, FeatureContexts] = {}
    for j, f in enumerate(ids_f):
        contexts = []
        for value, g in zip(best_v[j].tolist(), best_g[j].tolist()):
            t, p = divmod(int(g), stride)
            row = encoded[t]
            left_ids = tuple(row[max(0, p - window):p])
            contexts.append(Context(t, p, row[p], _decode(tokenizer, [row[p]]),
                                    _decode(tokenizer, left_ids), left_ids, float(value)))
        out[f] = FeatureContexts(f, contexts, int(n_active[j]), n_tokens)
    return out


def _cell(text: str) -> str:
    """Markdown-table-safe text: pipes escaped, newlines shown as ⏎."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎")


def format_contexts(contexts: dict[int, Sequence[Context]]) -> str:
    """Markdown: per feature a heading with its density and a table of its top contexts,
    each ``left⟦token⟧`` with the activation."""
    parts = []
    for f, items in contexts.items():
        density = getattr(items, "density", None)
        head = f"### feature {f}"
        if density is not None:
            head += (f" — density {density:.4g} "
                     f"({getattr(items, 'n_active', '?')}/{getattr(items, 'n_tokens', '?')} tokens)")
        lines = [head, ""]
        if not items:
            lines.append("_never active on these texts_")
        else:
            lines += ["| # | value | text:pos | context |", "|---:|---:|---:|:---|"]
            for i, c in enumerate(items, 1):
                lines.append(f"| {i} | {c.value:.4g} | {c.text_index}:{c.position} | "
                             f"{_cell(c.left)}⟦{_cell(c.token)}⟧ |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def label_table(model: nn.Module, tokenizer: Any, sae: SAE, texts: Sequence[str], features: Any,
                **kwargs: Any) -> str:
    """`top_contexts` rendered with `format_contexts` (same keyword arguments)."""
    return format_contexts(top_contexts(model, tokenizer, sae, texts, features, **kwargs))
