"""Held-out evaluation of a learned activation-scaling intervention, on the fused path.

`evaluate_scaling` applies ``result.interventions()`` with ``fasteer.patch`` -- the
path a user runs, not the training hooks -- and measures on ``examples`` (test prompts)
the paper's three criteria:

* effectiveness: ``accuracy`` before / after (share of prompts with logit(target) >
  logit(foil) at the last position), ``flipped`` (of the prompts the clean model
  answered with the foil, the share now answering with the target), and the mean
  logit difference before / after / its change;
* faithfulness: ``kl_answer`` -- KL(clean || steered) of the next-token distribution at
  the answer position over the vocabulary without the two answer tokens (what the
  objective trades off), and ``kl_prefix`` -- the mean KL over the full vocabulary at
  every *earlier* position of the prompt (predictions the intervention was never
  trained on: the other tokens);
* minimality, the same way for every method: at each location (site, layer, prompt
  position) the edit's own relative change of the activation, |h~ - h| / |h|, averaged
  over the prompts (the training-time edit applied to the activation the steered
  forward produces there); ``moved`` counts locations above 5%, ``relative_change``
  sums them (ActivScalar: sum |beta alpha|). Plus `ActivationScaling.changes`
  (parameters, L1).

Per-prompt values are bootstrapped over prompts (95% percentile intervals).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...evaluate.stats import bootstrap
from ...patch import patch
from .objective import faithfulness_kl, logit_difference
from .result import ActivationScaling


def _kl_rows(clean: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of logits [..., V] (float32)."""
    logp = F.log_softmax(clean.float(), -1)
    logq = F.log_softmax(steered.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def evaluate_scaling(model, tokenizer, result: ActivationScaling, examples, *,
                     batch_size: int = 16, n_boot: int = 2000, seed: int = 0) -> dict:
    """Effectiveness, faithfulness and minimality of ``result`` on ``examples`` (see the
    module docstring). ``examples``: a list of `TaskExample` or `tasks.encode`'s dict."""
    from .tasks import encode
    enc = examples if isinstance(examples, dict) else encode(list(examples), tokenizer)
    ids, target, foil = enc["input_ids"], enc["target_ids"], enc["foil_ids"]
    N, T = ids.shape
    if result.prompt_len is not None and T != result.prompt_len:
        raise ValueError(f"examples: {result.name} was learned for prompts of {result.prompt_len} "
                         f"tokens (one parameter per position), these have {T}")
    device = next(model.parameters()).device
    cols = {k: [] for k in ("ld_before", "ld_after", "kl_answer", "kl_prefix")}
    steering = result.interventions()
    st = patch(model)
    try:
        for i in range(0, N, batch_size):
            x = ids[i:i + batch_size].to(device)
            t, f = target[i:i + batch_size].to(device), foil[i:i + batch_size].to(device)
            st.clear()
            clean = model(input_ids=x).logits.float()
            st.set(*steering)
            steered = model(input_ids=x).logits.float()
            cols["ld_before"].append(logit_difference(clean[:, -1], t, f).cpu())
            cols["ld_after"].append(logit_difference(steered[:, -1], t, f).cpu())
            cols["kl_answer"].append(faithfulness_kl(clean[:, -1], steered[:, -1], t, f).cpu())
            kl = _kl_rows(clean[:, :-1], steered[:, :-1]) if T > 1 else torch.zeros(len(x), 1)
            cols["kl_prefix"].append(kl.mean(-1).cpu())
    finally:
        st.unpatch()
    locations = _location_changes(model, result, ids, batch_size)
    c = {k: torch.cat(v).double() for k, v in cols.items()}
    before, after = c["ld_before"] > 0, c["ld_after"] > 0
    columns = {"accuracy_before": before.double(), "accuracy_after": after.double(),
               "ld_before": c["ld_before"], "ld_after": c["ld_after"],
               "ld_change": c["ld_after"] - c["ld_before"],
               "kl_answer": c["kl_answer"], "kl_prefix": c["kl_prefix"]}
    stats = bootstrap(columns, n_boot=n_boot, seed=seed)
    wrong = ~before
    out = {"n": N, "prompt_tokens": T, "method": result.name,
           **{k: list(v) for k, v in stats.items() if k in columns},
           "n_foil_before": int(wrong.sum()),
           "flipped": (float(after[wrong].double().mean()) if bool(wrong.any()) else None),
           "minimality": {**result.changes(), "locations": int(locations.numel()),
                          "moved": int((locations > MOVED).sum()),
                          "relative_change": float(locations.sum())}}
    return out


MOVED = 0.05      # a location "moved" when its activation changes by more than 5% on average


@torch.no_grad()
def _location_changes(model, result: ActivationScaling, ids, batch_size: int) -> torch.Tensor:
    """Mean |h~ - h| / |h| per (site, layer, position) over the prompts, [S, L, T]."""
    from ...sites import model_sites
    ms = model_sites(model)
    S, L, T = len(result.sites), len(result.layers), ids.shape[1]
    sums = torch.zeros(S, L, T, dtype=torch.float64)
    params = result.params.to(next(model.parameters()).device)
    handles = []

    def hook(s, j):
        def fn(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            new = params.edit(s, j, h)
            rel = (new - h).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
            sums[s, j] += rel.sum(0).double().cpu()
            if isinstance(output, tuple):
                return (new,) + tuple(output[1:])
            return new
        return fn

    for s, site in enumerate(result.sites):
        for j, layer in enumerate(result.layers):
            module = ms.points[ms.stream_point(layer, site)].module
            handles.append(module.register_forward_hook(hook(s, j)))
    try:
        device = next(model.parameters()).device
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i:i + batch_size].to(device), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        result.params.cpu()
    return sums / ids.shape[0]
