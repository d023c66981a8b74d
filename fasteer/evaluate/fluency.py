"""Fluency of continuations: how likely the *unsteered* model finds them, and looping.

Two per-continuation measurements, both on the generated token ids themselves (no
re-tokenisation of decoded text):

* ``nll`` -- mean negative log-likelihood per continuation token under the unsteered model,
  given its prompt:  nll = -(1/T) Σ_t log p_unsteered(y_t | prompt, y_<t).
  Steering that breaks the language raises it.
* ``repetition`` -- the share of the continuation's token 4-grams that already occurred
  earlier in it. Degenerate steering often *lowers* nll by looping one phrase, so nll alone
  would call a loop fluent; this catches it.

The fluency score in [0, 1] combines them relative to the unsteered model's own text:
    fluency = min(1, exp(nll_ref - nll)) * (1 - repetition)
where nll_ref is the median nll of the unsteered (α = 0) continuations of the same prompts:
1 means "as likely as what the model writes unsteered, and not looping"; exp(nll_ref - nll)
is the ratio of perplexities, so 0.5 means the steered text is twice as perplexing.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def continuation_nll(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_len: int, *, batch_size: int = 8, progress: bool = False,
                     desc: str = "fluency") -> torch.Tensor:
    """Mean per-token NLL of ``sequences[:, prompt_len:]`` under ``model`` as it is now.

    ``sequences``: [B, P + T] (left-padded prompts then generated ids); ``attention_mask``
    covers all of it. Returns float64 [B]. Batched so the [b, T, vocab] logits stay small.
    """
    import inspect
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    n_new = sequences.shape[1] - prompt_len
    out = []
    for i in tqdm(range(0, sequences.shape[0], batch_size), desc=desc, unit="batch",
                  disable=not progress, leave=False):
        ids = sequences[i:i + batch_size]
        mask = attention_mask[i:i + batch_size]
        if keep:       # logits only where they are read (a 262k vocabulary makes the rest costly)
            logits = model(input_ids=ids, attention_mask=mask,
                           logits_to_keep=n_new + 1).logits[:, :-1]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_len - 1:-1]
        target = ids[:, prompt_len:]
        logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target[..., None])[..., 0]
        out.append(-logp.mean(1))
    return torch.cat(out)


def repetition_rate(tokens: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Per row of ``tokens`` [B, T]: share of n-grams that already occurred in that row."""
    rates = []
    for row in tokens.tolist():
        grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
        seen, repeats = set(), 0
        for g in grams:
            repeats += g in seen
            seen.add(g)
        rates.append(repeats / len(grams) if grams else 0.0)
    return torch.tensor(rates, dtype=torch.float64)


def fluency_score(nll: torch.Tensor, repetition: torch.Tensor, nll_ref: float) -> torch.Tensor:
    """min(1, exp(nll_ref - nll)) * (1 - repetition), per continuation."""
    return torch.exp(nll_ref - nll).clamp(max=1.0) * (1.0 - repetition)
