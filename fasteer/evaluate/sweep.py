"""One sampled generate for a whole strength sweep, keeping the generated token ids.

Row block i of the batch carries strength alphas[i] through fasteer's per-row slots, so
the sweep costs one ``generate`` (no per-alpha re-runs, no hooks). The ids are kept (not
only decoded text) so fluency is measured on exactly the tokens the model produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SweepOutput:
    sequences: torch.Tensor        # [A * P, prompt_len + T]: left-padded prompt, then T new ids
    attention_mask: torch.Tensor   # same shape
    prompt_len: int
    texts: list[str]               # decoded continuations, row order
    rows_of: dict                  # alpha -> slice of rows

    def continuation_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]


class _StepProgress:
    """A logits processor that only advances a progress bar: one tick per decode step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


@torch.inference_mode()
def sweep_ids(model, tok, make_interventions, alphas, prompts, *, max_new_tokens: int,
              seed: int, top_p: float, progress: bool = True, desc: str = "generate") \
        -> SweepOutput:
    """Sample ``max_new_tokens`` for every (alpha, prompt) in one batched generate.

    ``make_interventions(alpha)`` gives the interventions of that strength (alpha 0 rows
    are left unsteered). Every continuation has exactly ``max_new_tokens`` tokens
    (``min_new_tokens``), so per-token fluency compares like with like.
    """
    import fasteer as fs
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    batch_prompts = [p for _ in alphas for p in prompts]
    batch = tok(batch_prompts, return_tensors="pt", padding=True).to(device)
    rows_of = {a: slice(i * len(prompts), (i + 1) * len(prompts)) for i, a in enumerate(alphas)}
    st = fs.patch(model)
    try:
        assignments = []
        for a in alphas:
            if a != 0.0:
                ivs = make_interventions(a)
                ivs = ivs if isinstance(ivs, (list, tuple)) else [ivs]
                assignments.append((tuple(ivs), list(range(len(batch_prompts)))[rows_of[a]]))
        st.set_many([(ivs, rows) for ivs, rows in assignments])
        torch.manual_seed(seed)
        with tqdm(total=max_new_tokens, desc=desc, unit="token", disable=not progress,
                  leave=False) as bar:
            out = model.generate(**batch, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=top_p,
                                 pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([_StepProgress(bar)]))
    finally:
        st.unpatch()
    prompt_len = batch["input_ids"].shape[1]
    new = out.shape[1] - prompt_len
    mask = torch.cat([batch["attention_mask"],
                      torch.ones(out.shape[0], new, dtype=batch["attention_mask"].dtype,
                                 device=device)], dim=1)
    texts = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return SweepOutput(out, mask, prompt_len, texts, rows_of)
