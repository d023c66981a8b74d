"""The three-term objective of activation scaling (Stoehr et al. 2024, §3).

For a prompt with a *target* answer token t (the one the intervention should make the
model prefer) and a *foil* f (the one it should stop preferring), at the last prompt
position, with clean logits z and intervened logits z~:

1. effectiveness -- the logit difference LD = z~[t] - z~[f] should turn positive. We
   minimise  E_eff = mean softplus(-LD) = mean -log sigmoid(LD),  the cross-entropy of
   the two-way choice {t, f}: smooth, and it stops pushing once LD is large, so the
   other terms decide how far an intervention goes.
2. faithfulness -- the other tokens' predictions should not move. We take the
   next-token distributions over the vocabulary *without* t and f (renormalised),
   clean p and intervened q, and minimise  E_faith = mean KL(p || q).
3. minimality -- few parameters should move from "no intervention": the L1 norm of the
   parameters (`ScalingParams.l1`; 0 is the identity for every method).

    loss = E_eff + lambda_faith * E_faith + lambda_min * L1

The paper optimises effectiveness (a logit difference), faithfulness and an L1 penalty;
the exact forms above (softplus, the renormalised KL) are our reading, as its full text
was not available to us. The same three quantities are what `fasteer.extract.scaling.
evaluate` reports on held-out prompts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64: the gradient tests use it)."""
    return x if x.dtype == torch.float64 else x.float()


def logit_difference(logits: torch.Tensor, target: torch.Tensor, foil: torch.Tensor):
    """z[t] - z[f] per row of ``logits`` [B, V] (float32, or float64 if given)."""
    z = _wide(logits)
    return z.gather(1, target.view(-1, 1)).squeeze(1) - z.gather(1, foil.view(-1, 1)).squeeze(1)


def effectiveness_loss(ld: torch.Tensor) -> torch.Tensor:
    """mean softplus(-LD) (see the module docstring)."""
    return F.softplus(-ld).mean()


def other_token_logprobs(logits: torch.Tensor, target: torch.Tensor,
                         foil: torch.Tensor) -> torch.Tensor:
    """log-probabilities [B, V] over the vocabulary without t and f (those get -inf)."""
    z = _wide(logits).clone()
    z.scatter_(1, target.view(-1, 1), float("-inf"))
    z.scatter_(1, foil.view(-1, 1), float("-inf"))
    return torch.log_softmax(z, dim=-1)


def faithfulness_kl(clean_logits: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                    foil: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the non-answer tokens, p clean and q intervened [B]."""
    logp = other_token_logprobs(clean_logits, target, foil)
    logq = other_token_logprobs(logits, target, foil)
    keep = torch.isfinite(logp)
    zero = torch.zeros_like(logp)
    diff = torch.where(keep, logp, zero) - torch.where(keep, logq, zero)
    return torch.where(keep, logp.exp() * diff, zero).sum(-1)
