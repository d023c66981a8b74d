"""Learning activation scalars (and the SteerVec baseline) by gradient descent.

`activation_scaling` freezes the model, attaches a `ScalingParams` at the component
sites (``attn_out``/``mlp_out`` of the chosen layers) through out-of-place training hooks
(`fasteer.extract.scaling.hooks`), and minimises the three-term objective of
`fasteer.extract.scaling.objective` with Adam on minibatches of the training prompts:

    1. clean last-position logits of every prompt, once (no hooks, no grad);
    2. per step: a minibatch, the intervened forward (``logits_to_keep=1``), the loss
       E_eff + lambda_faith * E_faith + lambda_min * L1, one Adam step;
    3. a progress bar showing the three terms.

Costs: one forward + backward of the model per step through every layer (the
gradient of an early layer's scalar needs the whole rest of the network); parameters
are tiny (ActivScalar: sites x layers x positions scalars).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ...sites import COMPONENT_SITES, model_sites
from .hooks import TrainingHooks, activation_norms
from .objective import effectiveness_loss, faithfulness_kl, logit_difference
from .params import METHOD_NAMES, ScalingParams, check_method
from .result import ActivationScaling

# Defaults per method: (learning rate, lambda_min), picked on SmolLM2's CCC train split
# (40 steps of 8 prompts; the trade-off is in benchmarks/results/scaling). The L1 sums
# every parameter, so a SteerVec or DynScalar (D numbers per location) pays per entry
# what ActivScalar pays per scalar. DynScalar's rate is small because one Adam step moves
# every one of w's D entries by ~lr, i.e. its scalar w.h/c by ~lr * sqrt(D).
DEFAULTS = {"activ": (0.05, 1e-2), "dyn": (2e-3, 1e-3), "steervec": (0.02, 1e-3)}


def _as_encoded(examples, tokenizer) -> dict:
    from .tasks import Task, encode
    if isinstance(examples, Task):
        examples = examples.train
    if isinstance(examples, dict):
        need = {"input_ids", "target_ids", "foil_ids"}
        if not need <= set(examples):
            raise ValueError(f"examples: an encoded batch needs keys {sorted(need)}")
        return examples
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("examples: expected a Task, a non-empty list of TaskExample, or an "
                         "encoded dict (fasteer.extract.scaling.tasks.encode)")
    return encode(list(examples), tokenizer)


def _check_number(value, name: str, *, positive: bool = False, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value!r}")
    return float(value)


@torch.no_grad()
def _last_logits(model, input_ids, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        out.append(model(input_ids=input_ids[i:i + batch_size].to(device),
                         logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


def activation_scaling(model: nn.Module, tokenizer, examples, *, method: str = "activ",
                       sites=COMPONENT_SITES, layers=None, beta: float = 1.0,
                       steps: int = 200, lr: float | None = None,
                       lambda_faith: float = 1.0, lambda_min: float | None = None,
                       batch_size: int = 16, seed: int = 0, progress: bool = True,
                       desc: str | None = None) -> ActivationScaling:
    """Learn ActivScalar (``method="activ"``), DynScalar (``"dyn"``) or the SteerVec
    baseline (``"steervec"``) on ``examples`` (a `Task` -- its train split --, a list
    of `TaskExample`, or `tasks.encode`'s dict); see the module docstrings of
    `fasteer.extract.scaling` for the math.

    ``sites``: component sites (``attn_out``, ``mlp_out``); ``layers``: default all.
    ``beta``: the strength multiplier of Eq. 5 (h~ = h (1 + beta alpha)).
    ``lr``/``lambda_min`` default per method (`DEFAULTS`). Returns an
    `ActivationScaling`; apply it with ``fs.steer(model, *result.interventions())``.
    """
    method = check_method(method)
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    bad = [s for s in sites if s not in COMPONENT_SITES]
    if not sites or bad:
        raise ValueError(f"sites: expected a non-empty list of {COMPONENT_SITES}, got {list(sites)}")
    ms = model_sites(model)
    layers = tuple(range(ms.n_layers)) if layers is None else tuple(layers)
    for site in sites:
        for layer in layers:
            ms.stream_point(layer, site)          # layer in range, site supported here
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    d_lr, d_min = DEFAULTS[method]
    lr = _check_number(d_lr if lr is None else lr, "lr", positive=True)
    lambda_min = _check_number(d_min if lambda_min is None else lambda_min, "lambda_min",
                               minimum=0.0)
    lambda_faith = _check_number(lambda_faith, "lambda_faith", minimum=0.0)
    beta = _check_number(beta, "beta")
    enc = _as_encoded(examples, tokenizer)
    ids, target, foil = enc["input_ids"], enc["target_ids"], enc["foil_ids"]
    N, T = ids.shape

    device = next(model.parameters()).device
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        clean = _last_logits(model, ids, batch_size)
        norms = activation_norms(model, ids, sites, layers, batch_size)
        params = ScalingParams(method, len(sites), len(layers), ms.hidden,
                               prompt_len=T if method != "dyn" else None, beta=beta,
                               norms=norms if method == "dyn" else None).to(device)
        opt = torch.optim.Adam(params.parameters(), lr=lr)
        # linear decay to 0: Adam's steps are ~lr per parameter whatever the gradient, so
        # without it the L1 term leaves unneeded parameters jittering around 0 by ~lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
        g = torch.Generator().manual_seed(seed)
        history = []
        started = time.perf_counter()
        label = desc or f"{METHOD_NAMES[method]} ({N} prompts)"
        with TrainingHooks(model, params, sites, layers), \
                tqdm(range(steps), desc=label, unit="step", disable=not progress) as bar:
            order = torch.randperm(N, generator=g)
            cursor = 0
            for step in bar:
                if cursor + min(batch_size, N) > N:
                    order, cursor = torch.randperm(N, generator=g), 0
                idx = order[cursor:cursor + batch_size]
                cursor += batch_size
                logits = model(input_ids=ids[idx].to(device), logits_to_keep=1).logits[:, -1]
                t, f = target[idx].to(device), foil[idx].to(device)
                ld = logit_difference(logits, t, f)
                eff = effectiveness_loss(ld)
                faith = faithfulness_kl(clean[idx].to(device), logits, t, f).mean()
                l1 = params.l1()
                loss = eff + lambda_faith * faith + lambda_min * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                row = {"step": step, "effectiveness": eff.item(), "faithfulness": faith.item(),
                       "l1": l1.item(), "flipped": (ld > 0).float().mean().item()}
                history.append(row)
                bar.set_postfix(eff=f"{row['effectiveness']:.3f}",
                                kl=f"{row['faithfulness']:.4f}", l1=f"{row['l1']:.2f}")
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    params = params.cpu().requires_grad_(False)
    info = {"steps": steps, "lr": lr, "lambda_faith": lambda_faith, "lambda_min": lambda_min,
            "batch_size": batch_size, "seed": seed, "n_train": N, "prompt_tokens": T,
            "train_seconds": round(time.perf_counter() - started, 1),
            "activation_norms": norms.tolist(), "final": history[-1],
            "history_every_10": history[::10]}
    return ActivationScaling(params, sites, layers, model_type=ms.model_type, info=info)
