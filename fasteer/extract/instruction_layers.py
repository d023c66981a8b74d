"""Choosing where to steer an instruction: Stolfo et al.'s layer search with a degeneracy filter.

An instruction direction exists at every layer (`fasteer.extract.instruction`), but steering
works at few. The procedure of Stolfo et al. (ICLR 2025; microsoft/llm-steer-instruct,
``format/find_best_layer.py`` and ``format/precompute_ivs.py``), per instruction:

1. candidates: layers ``n_layers // 5, n_layers // 5 + 2, ...`` (every other layer after the
   first fifth), plus "no steering";
2. greedy responses to validation requests with each candidate's intervention at its layer:
   ``Clamp(u_l, c_l)`` (projection on u_l set to the with-instruction mean c_l), or, for
   length, ``Add(u_l, w)`` for each weight w of a grid;
3. compliance per candidate = share of responses the instruction's checker accepts;
4. degeneracy filter: a candidate whose responses are degenerate more often than the
   unsteered ones (plus ``degenerate_tolerance``) is disqualified;
5. the qualified candidate with the highest compliance wins (ties: fewer degenerate
   responses, then the earlier layer); if none beats no steering, the answer is "do not steer"
   (``layer=None``), as the paper's layer -1.

Degenerate, here: the response loops (``repetition > max_repetition``: more than half its
token 4-grams repeat earlier ones) or is far less likely than the unsteered model's own
answers (its perplexity under the unsteered model above ``max_perplexity_ratio`` times the
median unsteered response's). The paper scores responses with GPT-2's perplexity and flags
*low* perplexity (< 2.5, which is what loops get); no second model is available offline, so
fasteer uses the steered model's own unsteered NLL and catches loops with the repetition
rate instead. Thresholds and the tolerance are fasteer's choices, stated as such.

All candidates run in a few batched generates: each candidate is a block of rows with its
own slots (`fasteer.evaluate.responses.generate_responses`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .activations import num_layers
from .instruction import InstructionSteering

MODES = ("clamp", "add")


@dataclass(frozen=True)
class Candidate:
    """One searched setting and what it did on the validation requests."""
    layer: int | None             # None: no steering
    value: float | None           # Clamp target c_l, or Add weight; None without steering
    positions: str | None         # the position rule steered; None without steering
    compliance: float             # share of responses the checker accepts
    degenerate: float             # share flagged degenerate
    looping: float                # share with repetition > max_repetition
    repetition: float             # mean 4-gram repetition rate
    nll: float                    # median per-token NLL under the unsteered model
    words: float                  # mean words per response
    disqualified: bool


@dataclass
class LayerChoice:
    """The chosen layer (None: steering did not beat no steering) and the evidence."""
    instruction: str
    mode: str
    positions: str | None         # position rule of the chosen setting
    layer: int | None
    value: float | None
    steering: InstructionSteering
    candidates: list[Candidate]
    baseline: Candidate
    settings: dict = field(default_factory=dict)

    def intervention(self):
        """`fasteer.Clamp` / `fasteer.Add` at the chosen layer, or None (do not steer)."""
        if self.layer is None:
            return None
        return make_intervention(self.steering, self.layer, self.mode, self.value,
                                 self.positions)

    def to_dict(self) -> dict:
        return {"instruction": self.instruction, "mode": self.mode,
                "positions": self.positions, "layer": self.layer,
                "value": self.value, "settings": self.settings,
                "baseline": asdict(self.baseline),
                "candidates": [asdict(c) for c in self.candidates]}

    def table(self) -> str:
        """Markdown: one row per candidate, the chosen one marked (`choice_table`)."""
        return choice_table(self.to_dict())


def choice_table(choice: dict) -> str:
    """Markdown table of a `LayerChoice.to_dict()` (also as stored in a results JSON): one
    row per candidate, no steering first, the chosen one marked."""
    chosen = (choice["layer"], choice["value"], choice["positions"])
    lines = ["| layer | positions | value | compliance | degenerate | looping | nll | words | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in [choice["baseline"]] + choice["candidates"]:
        if c["layer"] is None:
            mark = "chosen (no steering)" if choice["layer"] is None else "no steering"
        elif (c["layer"], c["value"], c["positions"]) == chosen:
            mark = "chosen"
        else:
            mark = "disqualified" if c["disqualified"] else ""
        value = "" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(f"| {'-' if c['layer'] is None else c['layer']} | {c['positions'] or '-'} | "
                     f"{value} | {c['compliance']:.2f} | {c['degenerate']:.2f} | "
                     f"{c['looping']:.2f} | {c['nll']:.2f} | {c['words']:.0f} | {mark} |")
    return "\n".join(lines)


def make_intervention(steering: InstructionSteering, layer: int, mode: str, value: float,
                      positions: str = "all"):
    """``Clamp(u_l, c)`` or ``Add(u_l, w)`` at ``layer`` on the direction's site, at
    ``positions`` (a `fasteer` position rule)."""
    import fasteer as fs
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    u = steering.vector
    if mode == "clamp":
        return fs.Clamp(u, {layer: float(value)}, layers=[layer], site=u.site,
                        positions=positions)
    return fs.Add(u, float(value), layers=[layer], site=u.site, positions=positions)


def compose(*choices: LayerChoice) -> list:
    """The interventions of several searched instructions, to apply together:
    ``fs.steer(model, *compose(title, short))``. Choices that chose no steering are left out;
    the order is kept (two Clamps at one layer do not commute unless their directions are
    orthogonal; Adds along one direction sum)."""
    for i, c in enumerate(choices):
        if not isinstance(c, LayerChoice):
            raise TypeError(f"choices[{i}]: expected a LayerChoice (from search_layer), got "
                            f"{type(c).__name__}")
    return [iv for iv in (c.intervention() for c in choices) if iv is not None]


def stolfo_layers(n_layers: int) -> list[int]:
    """The paper's grid: every other layer from ``n_layers // 5`` on."""
    return list(range(n_layers // 5, n_layers, 2))


def _checker(check) -> tuple[str, Callable[[str], bool]]:
    if hasattr(check, "check") and callable(check.check):
        return getattr(check, "name", "instruction"), check.check
    if callable(check):
        return getattr(check, "__name__", "instruction"), check
    raise TypeError("check: expected an Instruction or a callable response -> bool, got "
                    f"{type(check).__name__}")


def _positive_float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def score_responses(responses, check: Callable[[str], bool], *, nll_reference: float,
                    max_repetition: float = 0.5, max_perplexity_ratio: float = 4.0) -> dict:
    """Per-response columns (float64 [n]): compliance, degenerate, looping, repetition, nll,
    words -- for `fasteer.evaluate.responses.Responses` ``responses``."""
    looping = responses.repetition > max_repetition
    unlikely = responses.nll > nll_reference + math.log(max_perplexity_ratio)
    return {
        "compliance": torch.tensor([float(bool(check(t))) for t in responses.texts],
                                   dtype=torch.float64),
        "degenerate": (looping | unlikely).double(),
        "looping": looping.double(),
        "repetition": responses.repetition,
        "nll": responses.nll,
        "words": torch.tensor([float(len(t.split())) for t in responses.texts],
                              dtype=torch.float64),
    }


def search_layer(model, tokenizer, steering: InstructionSteering, requests: Sequence[str],
                 check, *, layers: Any = None, mode: str = "clamp",
                 weights: Sequence[float] | None = None, positions: Any = "all",
                 max_new_tokens: int = 96,
                 chat_template: bool = True, system_prompt: str | None = None,
                 max_repetition: float = 0.5, max_perplexity_ratio: float = 4.0,
                 degenerate_tolerance: float = 0.1, batch_rows: int = 64,
                 progress: bool = True) -> LayerChoice:
    """Stolfo et al.'s layer search (module docstring) on validation ``requests``.

    ``steering``: what `fasteer.extract.instruction` returned (its vector must cover the
    searched layers). ``requests``: the prompts as the model will see them (without the
    instruction for "steering replaces the instruction", with it for "steering on top").
    ``check``: a `fasteer.evaluate.instructions.Instruction` or a callable on a response.
    ``mode="clamp"`` uses the stored with-instruction mean; ``mode="add"`` needs ``weights``
    (added norms; u is a unit vector) and searches layers x weights. ``layers``: default the
    paper's grid (`stolfo_layers`). ``positions``: a position rule or several, searched too
    (the paper steers ``"all"`` positions; ``"prompt"`` -- only the prompt's tokens, the
    answer left alone -- loops far less on SmolLM2-135M, see docs/instructions.md).
    """
    from fasteer.evaluate.responses import generate_responses

    if not isinstance(steering, InstructionSteering):
        raise TypeError("steering: expected the InstructionSteering fasteer.extract.instruction "
                        f"returns, got {type(steering).__name__}")
    name, check_fn = _checker(check)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "add":
        if weights is None or isinstance(weights, (str, bytes)) or not len(weights):
            raise ValueError("weights: mode='add' needs a non-empty list of weights")
        weights = [float(w) for w in weights]
        if any(not math.isfinite(w) or w == 0 for w in weights):
            raise ValueError(f"weights: expected finite non-zero numbers, got {weights}")
    elif weights is not None:
        raise ValueError("weights: only used with mode='add' (clamp uses the stored targets)")
    n = num_layers(model)
    layer_ids = stolfo_layers(n) if layers is None else sorted({int(l) for l in (
        [layers] if isinstance(layers, int) else layers)})
    if not layer_ids:
        raise ValueError("layers: empty")
    bad = [l for l in layer_ids if not 0 <= l < n]
    if bad:
        raise ValueError(f"layers: {bad} out of range 0..{n - 1}")
    missing = [l for l in layer_ids if l not in steering.vector.directions]
    if missing:
        raise ValueError(f"layers: the instruction vector has no direction at {missing} "
                         f"(it has {sorted(steering.vector.directions)})")
    max_repetition = _positive_float(max_repetition, "max_repetition")
    max_perplexity_ratio = _positive_float(max_perplexity_ratio, "max_perplexity_ratio")
    if isinstance(degenerate_tolerance, bool) or not isinstance(degenerate_tolerance,
                                                                (int, float)) \
            or not 0 <= degenerate_tolerance <= 1:
        raise ValueError(f"degenerate_tolerance: expected a number in [0, 1], got "
                         f"{degenerate_tolerance!r}")
    position_rules = [positions] if isinstance(positions, str) else list(positions)
    from fasteer.plan import POSITION_RULES
    if not position_rules or any(p not in POSITION_RULES for p in position_rules):
        raise ValueError(f"positions: expected rules from {POSITION_RULES}, got {positions!r}")
    requests = list(requests)

    values = [None] if mode == "clamp" else weights
    settings = [(l, steering.targets[l] if w is None else w, p)
                for p in position_rules for l in layer_ids for w in values]
    blocks = [(requests, None)] + [(requests, make_intervention(steering, l, mode, v, p))
                                   for l, v, p in settings]
    responses = generate_responses(model, tokenizer, blocks, max_new_tokens=max_new_tokens,
                                   chat_template=chat_template, system_prompt=system_prompt,
                                   batch_rows=batch_rows, progress=progress,
                                   desc=f"layer search ({name})")
    nll_ref = float(responses[0].nll.median())
    opts = dict(nll_reference=nll_ref, max_repetition=max_repetition,
                max_perplexity_ratio=max_perplexity_ratio)

    def summarise(layer, value, rule, resp, limit):
        cols = score_responses(resp, check_fn, **opts)
        degenerate = float(cols["degenerate"].mean())
        return Candidate(layer, value, rule, float(cols["compliance"].mean()), degenerate,
                         float(cols["looping"].mean()), float(cols["repetition"].mean()),
                         float(cols["nll"].median()), float(cols["words"].mean()),
                         limit is not None and degenerate > limit + 1e-12)

    baseline = summarise(None, None, None, responses[0], None)
    limit = baseline.degenerate + degenerate_tolerance
    candidates = [summarise(l, float(v), p, r, limit)
                  for (l, v, p), r in zip(settings, responses[1:])]
    qualified = [c for c in candidates if not c.disqualified]
    best = min(qualified, key=lambda c: (-c.compliance, c.degenerate, c.layer), default=None)
    chosen = best if best is not None and best.compliance > baseline.compliance else None
    return LayerChoice(
        instruction=name, mode=mode, positions=None if chosen is None else chosen.positions,
        layer=None if chosen is None else chosen.layer,
        value=None if chosen is None else chosen.value,
        steering=steering, candidates=candidates, baseline=baseline,
        settings={"n_requests": len(requests), "layers": layer_ids,
                  "weights": None if weights is None else list(weights),
                  "positions": position_rules,
                  "max_new_tokens": max_new_tokens, "decoding": "greedy",
                  "max_repetition": max_repetition,
                  "max_perplexity_ratio": max_perplexity_ratio,
                  "degenerate_tolerance": degenerate_tolerance,
                  "nll_reference": nll_ref})
