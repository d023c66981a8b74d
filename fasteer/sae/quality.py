"""How good is an SAE at a point of a model: reconstruction and downstream-loss metrics.

`sae_quality` runs the model on ``texts`` three times per batch -- clean, with the SAE
spliced into the residual stream at its site, and with the site zero-ablated -- and
reports

* reconstruction, on the clean stream ``h`` at the site (ĥ = ``sae(h)``, sums in float64):

  - ``fve``: fraction of variance explained, ``1 - Σ‖h - ĥ‖² / Σ‖h - mean(h)‖²`` (one
    mean vector over all counted tokens, the sums over those tokens);
  - ``mse``: ``Σ‖h - ĥ‖² / N`` (squared error per token, summed over the hidden dims);
  - ``mean_cosine``: the mean over tokens of ``cos(h, ĥ)``;
  - ``mean_l0``: the mean number of active latents per token, *active* meaning ``z > 0``
    (as in `fasteer.extract.feature_density`);
  - ``density`` (float64 [F]): the fraction of counted tokens on which each feature is
    active; ``dead_features`` / ``dead_fraction`` / ``dead_ids``: features active on none
    of them.

* downstream loss: the mean next-token cross-entropy over every predicted real token
  (position t predicts token t+1, both real) ``ce_clean``, ``ce_spliced`` (the stream at
  the site replaced by ĥ -- the error term dropped) and ``ce_zero`` (the stream replaced
  by zeros), and ``loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (1: as
  good as the model, 0: as bad as deleting the stream; NaN when ablation does not change
  the loss).

Which tokens count.  Texts are tokenized one by one (the tokenizer's special tokens
included, truncated to ``max_length``) and batched with right padding and explicit
position ids, so a real token never attends to a pad and pad positions are dropped from
every statistic.  With ``skip_first=True`` (default) position 0 of every text is left
out of the *reconstruction* statistics (FVE, MSE, cosine, L0, density, dead features):
in most models the first token is an attention sink whose residual norm is tens of times
that of the others, so one token per text would dominate ``Σ‖h - mean(h)‖²`` and the
density of "BOS features".  Splicing follows the SAELens convention and replaces *every*
position, position 0 included (``splice_first=False`` keeps the clean stream at position
0 for both the spliced and the zero-ablated runs); the cross-entropy always averages over
all predicted real tokens.

How the stream is replaced (out of place, by hooks that are removed afterwards, also when
the forward raises):

* ``resid_pre[l]``: a forward pre-hook on decoder layer ``l`` replaces its input;
* ``resid_post[l]`` (= ``resid_pre[l+1]``): a forward hook on layer ``l`` replaces its
  output;
* ``resid_mid[l]``: the stream after the attention add is ``r + a`` (``r`` the layer's
  input, ``a`` what the attention sublayer adds -- `fasteer.sites`' ``attn_out`` module);
  a forward hook on that module returns ``ĥ - r`` instead of ``a``, so the layer's own add
  yields ``ĥ`` up to one rounding of that add.

During the spliced run the stream is read back at the site exactly as fasteer reads it
(`fasteer.sae.site_reader.PointReader`) and compared with what was put there; a
mismatch beyond rounding raises ``RuntimeError`` (an architecture whose layers do not
pass the stream the way `fasteer.sites` says).
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from tqdm.auto import tqdm

from ..sites import ModelSites, model_sites
from .sae import SAE
from .site_reader import PointReader

STREAM_SITES = ("resid_pre", "resid_mid", "resid_post")


# --------------------------------------------------------------------------- validation

def _check_sae(sae: Any) -> SAE:
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected a fasteer.SAE, got {type(sae).__name__}")
    return sae


def _positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def resolve_point(model: nn.Module, sae: SAE, layer: Any, site: Any, who: str
                  ) -> tuple[ModelSites, int, str, tuple[str, int]]:
    """``(sites, layer, site, key)``: the SAE's own layer/site unless given; everything
    checked (one layer, a residual-stream site, width, layer in range)."""
    from .interventions import check_width, resolve_sae_placement

    _check_sae(sae)
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)):
        raise TypeError(f"layer: expected an int or None, got {layer!r}")
    if site is not None and site not in STREAM_SITES:
        raise ValueError(f"site: expected one of {STREAM_SITES} or None, got {site!r}")
    layers, site = resolve_sae_placement(sae, layer, site, who)
    if site not in STREAM_SITES:
        raise ValueError(f"site: {who} works on the residual stream ({', '.join(STREAM_SITES)}), "
                         f"got {site!r}")
    layer = int(layers[0])
    sites = model_sites(model)
    check_width(sae, sites.hidden)
    key = sites.stream_point(layer, site)      # layer in range, site exists here
    return sites, layer, site, key


def encode_texts(tokenizer: Any, texts: Any, max_length: int | None) -> list[list[int]]:
    """Token ids of each text (special tokens included, no padding), cut to ``max_length``."""
    from ..extract.activations import check_prompts, encode_prompts

    texts = check_prompts(texts, "texts")
    encoded = encode_prompts(tokenizer, texts, name="texts")
    if max_length is not None:
        encoded = [row[:max_length] for row in encoded]
    return encoded


def model_batches(model: nn.Module, tokenizer: Any, encoded: list[list[int]], batch_size: int):
    """Yield ``(start, ids, mask, kwargs)`` per batch: right padding, position ids counted
    over real tokens, on the model's device."""
    from ..extract.activations import _model_device, _pad_id, pad_batch

    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    accepts_positions = "position_ids" in inspect.signature(model.forward).parameters
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad_batch(encoded[start:start + batch_size], pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if accepts_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        yield start, ids, mask, kwargs


# --------------------------------------------------------------------------- splicing

def _first(output: Any) -> torch.Tensor | None:
    h = output[0] if isinstance(output, (tuple, list)) else output
    return h if isinstance(h, torch.Tensor) else None


def _with_first(output: Any, h: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (h,) + output[1:]
    if isinstance(output, list):
        return [h] + output[1:]
    return h


class StreamSplice:
    """Replace the residual stream at ``site[layer]`` by ``fn(h)`` (out of place).

    ``fn`` gets the stream ``h [B, T, D]`` and returns a tensor of the same shape and dtype.
    Use as a context manager; the hooks are removed on exit, whatever happened.
    """

    def __init__(self, sites: ModelSites, layer: int, site: str,
                 fn: Callable[[torch.Tensor], torch.Tensor]):
        if site not in STREAM_SITES:
            raise ValueError(f"site: expected one of {STREAM_SITES}, got {site!r}")
        sites.stream_point(layer, site)
        self.fn = fn
        self.handles: list[Any] = []
        self._residual: torch.Tensor | None = None
        self.residual_scale = 0.0   # largest |r| seen by the resid_mid splice (rounding bound)
        block = sites.layers[layer]
        if site == "resid_pre":
            self._hook(block.register_forward_pre_hook(self._replace_input, with_kwargs=True))
        elif site == "resid_post":
            self._hook(block.register_forward_hook(self._replace_output))
        else:
            point = sites.points.get(("attn", layer))
            if point is None:
                raise ValueError(f"site: resid_mid cannot be spliced for {sites.spec.name} "
                                 "(the module whose output the attention adds is unknown)")
            self._hook(block.register_forward_pre_hook(self._stash_input, with_kwargs=True))
            self._hook(point.module.register_forward_hook(self._replace_attention))

    def _hook(self, handle) -> None:
        self.handles.append(handle)

    def _apply(self, h: torch.Tensor) -> torch.Tensor:
        out = self.fn(h)
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            raise RuntimeError(f"splice: expected a replacement of shape {list(h.shape)}, "
                               f"got {getattr(out, 'shape', type(out).__name__)}")
        return out.to(h.dtype)

    @staticmethod
    def _input(args, kwargs) -> torch.Tensor | None:
        h = args[0] if args else kwargs.get("hidden_states")
        return h if isinstance(h, torch.Tensor) else None

    def _replace_input(self, module, args, kwargs):
        h = self._input(args, kwargs)
        if h is None:
            raise RuntimeError(f"splice: {type(module).__name__} got no hidden_states tensor")
        new = self._apply(h)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _replace_output(self, module, args, output):
        h = _first(output)
        if h is None:
            raise RuntimeError(f"splice: {type(module).__name__} returned no tensor")
        return _with_first(output, self._apply(h))

    def _stash_input(self, module, args, kwargs):
        self._residual = self._input(args, kwargs)

    def _replace_attention(self, module, args, output):
        a, r = _first(output), self._residual
        self._residual = None
        if a is None or r is None or a.shape != r.shape:
            raise RuntimeError("splice: cannot splice resid_mid here: the attention output and "
                               "the layer input do not line up")
        self.residual_scale = max(self.residual_scale, float(r.detach().abs().max()))
        return _with_first(output, (self._apply(r + a) - r).to(a.dtype))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._residual = None

    def __enter__(self) -> "StreamSplice":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------- metrics

def _token_ce(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> tuple[float, int]:
    """Sum (float64) and count of next-token cross-entropies over real tokens, row by row
    (one row's [T, V] logits in float32 at a time)."""
    total, count = 0.0, 0
    for i, n in enumerate(lengths):
        if n < 2:
            continue
        ce = Fn.cross_entropy(logits[i, :n - 1].float(), ids[i, 1:n], reduction="none")
        total += float(ce.double().sum())
        count += n - 1
    return total, count


class _Moments:
    """Running count, mean [D] and centred sum of squares (Chan et al.'s merge), float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, 0.0

    def add(self, x: torch.Tensor) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = float(((x - mb) ** 2).sum())
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + float((delta ** 2).sum()) * self.n * nb / n
        self.mean = self.mean + delta * (nb / n)
        self.n = n


def sae_quality(model: nn.Module, tokenizer: Any, sae: SAE, texts: Sequence[str], *,
                layer: int | None = None, site: str | None = None, batch_size: int = 8,
                max_length: int | None = 128, skip_first: bool = True,
                splice_first: bool = True, progress: bool = True) -> dict[str, Any]:
    """Reconstruction and downstream-loss quality of ``sae`` at ``site[layer]`` (default:
    the SAE's own) on the real tokens of ``texts``; see the module docstring for the
    exact definitions, which tokens count and how the SAE is spliced in.

    Returns a dict: ``fve``, ``mse``, ``mean_cosine``, ``mean_l0``, ``density`` (float64
    [F], on CPU), ``dead_features``, ``dead_fraction``, ``dead_ids``, ``ce_clean``,
    ``ce_spliced``, ``ce_zero``, ``loss_recovered``, ``n_tokens`` (tokens in the
    reconstruction statistics), ``n_predicted`` (tokens in the cross-entropies),
    ``n_texts``, ``layer``, ``site``, ``skip_first``, ``splice_first``,
    ``splice_max_abs_diff`` (largest difference between the stream read back during the
    spliced run and ĥ: 0 for resid_pre/post, rounding for resid_mid).

    Every argument is checked before the first forward pass.  Needs at least one token
    in the reconstruction statistics and one text of two or more tokens.
    """
    sites, layer, site, key = resolve_point(model, sae, layer, site, "sae_quality")
    batch_size = _positive_int(batch_size, "batch_size")
    max_length = _positive_int(max_length, "max_length", allow_none=True)
    skip_first = _bool(skip_first, "skip_first")
    splice_first = _bool(splice_first, "splice_first")
    progress = _bool(progress, "progress")
    encoded = encode_texts(tokenizer, texts, max_length)
    n_recon = sum(max(len(r) - int(skip_first), 0) for r in encoded)
    n_pred = sum(len(r) - 1 for r in encoded)
    if n_recon == 0:
        raise ValueError("texts: no token left for the reconstruction statistics (every text "
                         "is one token long and skip_first=True)")
    if n_pred == 0:
        raise ValueError("texts: no next-token prediction to score; give at least one text "
                         "of two or more tokens")

    from ..extract.activations import _model_device

    sae_here = sae.to(_model_device(model))
    F = sae.d_sae
    moments = _Moments()
    sse = cos_sum = 0.0
    l0_sum = 0
    active = torch.zeros(F, dtype=torch.int64)
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_scored = 0
    splice_diff = 0.0
    seen: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> None:
        seen["h"] = h

    def keep_first(h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if splice_first:
            return new
        return torch.cat([h[:, :1], new[:, 1:]], dim=1)

    def spliced(h: torch.Tensor) -> torch.Tensor:
        out = keep_first(h, sae_here(h).to(h.dtype))
        seen["put"] = out
        return out

    def zeroed(h: torch.Tensor) -> torch.Tensor:
        return keep_first(h, torch.zeros_like(h))

    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), tqdm(total=len(encoded), desc="sae quality",
                                          disable=not progress, unit="text") as bar:
            for start, ids, mask, kwargs in model_batches(model, tokenizer, encoded, batch_size):
                lengths = [len(r) for r in encoded[start:start + ids.shape[0]]]
                # -- clean: logits and the stream at the site
                seen.clear()
                with _Reading(sites, key, read):
                    logits = model(**kwargs).logits
                total, count = _token_ce(logits, ids, lengths)
                del logits
                ce["clean"] += total
                n_scored += count
                if "h" not in seen:
                    raise RuntimeError(f"the forward pass never reached {site}[{layer}]")
                h = seen.pop("h")
                real = mask.bool()
                if skip_first:
                    real = real.clone()
                    real[:, 0] = False
                x = h[real]                                          # [N, D]
                z = sae_here.encode(x)
                x64, rec64 = x.double(), sae_here.decode(z).double()
                sse += float(((x64 - rec64) ** 2).sum())
                cos_sum += float(Fn.cosine_similarity(x64, rec64, dim=-1, eps=1e-30).sum())
                fired = z > 0
                l0_sum += int(fired.sum())
                active += fired.sum(0).cpu()
                moments.add(x64)
                # -- SAE spliced in; read the stream back to check the splice reached it
                # (the reader is registered after the splice hooks: a hook on the same
                # module must see the replaced output)
                seen.clear()
                with StreamSplice(sites, layer, site, spliced) as splice, \
                        _Reading(sites, key, read):
                    ce["spliced"] += _token_ce(model(**kwargs).logits, ids, lengths)[0]
                if "put" not in seen:
                    raise RuntimeError(f"the splice hook at {site}[{layer}] never ran")
                if "h" not in seen:
                    raise RuntimeError(f"the spliced forward pass never reached {site}[{layer}]")
                splice_diff = max(splice_diff, _check_splice(
                    seen.pop("h"), seen.pop("put"), mask.bool(), site, layer,
                    splice.residual_scale))
                # -- zero ablation
                with StreamSplice(sites, layer, site, zeroed):
                    ce["zero"] += _token_ce(model(**kwargs).logits, ids, lengths)[0]
                bar.update(ids.shape[0])
    finally:
        model.train(was_training)

    density = active.double() / n_recon
    dead = (active == 0).nonzero().flatten()
    ce_clean, ce_spliced, ce_zero = (ce[k] / n_scored for k in ("clean", "spliced", "zero"))
    denom = ce_zero - ce_clean
    total_var = moments.m2
    return {
        "fve": 1.0 - sse / total_var if total_var > 0 else float("nan"),
        "mse": sse / n_recon,
        "mean_cosine": cos_sum / n_recon,
        "mean_l0": l0_sum / n_recon,
        "density": density,
        "dead_features": int(dead.numel()),
        "dead_fraction": dead.numel() / F,
        "dead_ids": [int(i) for i in dead],
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero": ce_zero,
        "loss_recovered": (ce_zero - ce_spliced) / denom if denom != 0 else float("nan"),
        "n_tokens": n_recon,
        "n_predicted": n_scored,
        "n_texts": len(encoded),
        "layer": layer,
        "site": site,
        "skip_first": skip_first,
        "splice_first": splice_first,
        "splice_max_abs_diff": splice_diff,
    }


class _Reading:
    """`PointReader` as a context manager."""

    def __init__(self, sites: ModelSites, key: tuple[str, int], callback):
        self.reader = PointReader(sites, key, callback)

    def __enter__(self) -> PointReader:
        return self.reader

    def __exit__(self, *exc) -> None:
        self.reader.remove()


def _check_splice(read: torch.Tensor, put: torch.Tensor, real: torch.Tensor, site: str,
                  layer: int, residual_scale: float = 0.0) -> float:
    """Largest |read - put| over real tokens; raises if beyond a few roundings."""
    if read.shape != put.shape:
        raise RuntimeError(f"splice check: the stream read at {site}[{layer}] has shape "
                           f"{list(read.shape)}, the replacement {list(put.shape)}")
    a, b = read[real].double(), put[real].double()
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max())
    # resid_pre/post: the very tensor put there (diff 0); resid_mid: r + (ĥ - r) rounds
    # twice, by up to a few eps times max(|r|, |ĥ|)
    scale = max(float(a.abs().max()), float(b.abs().max()), residual_scale, 1e-30)
    eps = torch.finfo(put.dtype).eps
    if not math.isfinite(diff) or diff > 16 * eps * scale:
        raise RuntimeError(f"splice check: the stream at {site}[{layer}] differs from the SAE "
                           f"reconstruction by {diff:.3g} during the spliced run; this "
                           "architecture does not pass the stream the way fasteer.sites says")
    return diff
