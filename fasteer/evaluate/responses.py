"""Greedy chat responses for blocks of prompts, each block steered its own way, in few generates.

Instruction following is judged on what a chat model answers, so prompts go through the chat
template and decoding is greedy (Stolfo et al. decode greedily too: one answer per prompt, no
sampling noise in a compliance rate). A *block* is a list of prompts and the interventions
for all of them (None: unsteered). Every block's rows are laid out in one batch and cut into
generates of at most ``batch_rows`` rows; fasteer's per-row slots give each row its block's
steering, so a layer search over twelve layers is a handful of generates, not twelve runs.

For each response it keeps the generated ids up to and including the first end-of-sequence
token, the decoded text, and two fluency measurements (as in `fasteer.evaluate.fluency`):

* ``nll``: mean per-token negative log-likelihood of the response under the *unsteered*
  model given its own prompt (the end-of-sequence token counts when the model stopped);
* ``repetition``: share of the response's token 4-grams that already occurred in it
  (a looping response scores near 1, while its nll may be *low*).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .fluency import repetition_rate


@dataclass
class Responses:
    """One block's responses, in prompt order."""
    texts: list[str]
    ids: list[torch.Tensor]          # generated ids per response (eos included when emitted)
    nll: torch.Tensor                # float64 [n]
    repetition: torch.Tensor         # float64 [n]
    truncated: torch.Tensor          # bool [n]: stopped by max_new_tokens, not by the model


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _as_list(interventions) -> list:
    if interventions is None:
        return []
    return list(interventions) if isinstance(interventions, (list, tuple)) else [interventions]


def _check_blocks(blocks) -> list[tuple[list[str], list]]:
    if not isinstance(blocks, Sequence) or isinstance(blocks, (str, bytes)) or not blocks:
        raise ValueError("blocks: expected a non-empty list of (prompts, interventions) pairs")
    out = []
    for i, block in enumerate(blocks):
        if not isinstance(block, (tuple, list)) or len(block) != 2:
            raise ValueError(f"blocks[{i}]: expected a (prompts, interventions) pair")
        prompts, ivs = block
        if (not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ValueError(f"blocks[{i}]: prompts must be a non-empty list of non-empty strings")
        out.append((list(prompts), _as_list(ivs)))
    return out


@torch.inference_mode()
def _response_nll(model, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                  lengths: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``ids[b, prompt_len : prompt_len + lengths[b]]`` under ``model``."""
    import inspect
    n_new = ids.shape[1] - prompt_len
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=n_new + 1).logits[:, :-1]
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_len - 1:-1]
    target = ids[:, prompt_len:]
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target[..., None])[..., 0]
    valid = (torch.arange(n_new, device=ids.device)[None] < lengths[:, None].to(ids.device))
    return (-(logp * valid).sum(1) / valid.sum(1)).cpu()


def generate_responses(model, tokenizer, blocks, *, max_new_tokens: int = 96,
                       chat_template: bool = True, system_prompt: str | None = None,
                       batch_rows: int = 64, progress: bool = True,
                       desc: str = "responses") -> list[Responses]:
    """Greedy responses for every ``(prompts, interventions)`` block (see module docstring).

    ``interventions``: None, one intervention or a list of them (applied together, in
    order, to every row of the block). Returns one `Responses` per block, in order.
    """
    from transformers import LogitsProcessorList

    import fasteer as fs
    from fasteer.extract.activations import _pad_id, encode_prompts, pad_batch
    from .sweep import _StepProgress

    blocks = _check_blocks(blocks)
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    rows = [(b, p) for b, (prompts, _) in enumerate(blocks) for p in prompts]
    encoded = encode_prompts(tokenizer, [p for _, p in rows], chat_template=chat_template,
                             system_prompt=system_prompt, name="prompts")
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    per_row: list[tuple] = [None] * len(rows)
    chunks = [range(i, min(i + batch_rows, len(rows))) for i in range(0, len(rows), batch_rows)]
    with tqdm(total=len(chunks) * max_new_tokens, desc=desc, unit="token", disable=not progress,
              leave=False) as bar:
        for chunk in chunks:
            ids, mask = pad_batch([encoded[i] for i in chunk], pad, "left")
            ids, mask = ids.to(device), mask.to(device)
            by_block: dict[int, list[int]] = {}
            for j, i in enumerate(chunk):
                by_block.setdefault(rows[i][0], []).append(j)
            assignments = [(blocks[b][1], r) for b, r in by_block.items() if blocks[b][1]]
            st = fs.patch(model)
            try:
                if assignments:
                    st.set_many(assignments)
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     logits_processor=LogitsProcessorList([_StepProgress(bar)]))
            finally:
                st.unpatch()
            bar.update(max_new_tokens - (out.shape[1] - ids.shape[1]))   # stopped early
            prompt_len = ids.shape[1]
            new = out[:, prompt_len:]
            lengths, stopped = [], []
            for row in new.tolist():
                at = next((t for t, x in enumerate(row) if x in eos), None)
                lengths.append(len(row) if at is None else at + 1)
                stopped.append(at is not None)
            lengths_t = torch.tensor(lengths)
            full_mask = torch.cat([mask, (torch.arange(new.shape[1], device=device)[None]
                                          < lengths_t[:, None].to(device)).to(mask.dtype)], 1)
            nll = _response_nll(model, out, full_mask, prompt_len, lengths_t)
            for j, i in enumerate(chunk):
                gen = new[j, :lengths[j]].cpu()
                text = tokenizer.decode(gen, skip_special_tokens=True).strip()
                content = gen[:-1] if stopped[j] else gen
                rep = float(repetition_rate(content[None])[0]) if len(content) else 0.0
                per_row[i] = (text, gen, float(nll[j]), rep, not stopped[j])
    results = []
    for b, (prompts, _) in enumerate(blocks):
        mine = [per_row[i] for i, (bb, _) in enumerate(rows) if bb == b]
        results.append(Responses(
            texts=[m[0] for m in mine], ids=[m[1] for m in mine],
            nll=torch.tensor([m[2] for m in mine], dtype=torch.float64),
            repetition=torch.tensor([m[3] for m in mine], dtype=torch.float64),
            truncated=torch.tensor([m[4] for m in mine], dtype=torch.bool)))
    return results
