"""`evaluate`: concept and fluency of a steering intervention across strengths.

For a concept (a shipped one, or a JSON file of the same schema) and a model:

1. the steering: by default a CAA vector (difference of means) from the concept's
   ``train`` pairs at ``layers``, applied as ``Add(v, alpha)``; or any interventions
   ``make_interventions(alpha)`` returns;
2. for each prompt split (``select``, ``test``): every strength in ``alphas`` (α = 0, the
   unsteered model, is always added) continues every prompt, all in one batched generate;
3. each continuation gets a concept verdict from an offline judge (`judges`) and a
   fluency score (`fluency`: NLL per token under the *unsteered* model, and looping);
4. per strength: means with 95% bootstrap intervals over prompts, and the AxBench-style
   combined score, the harmonic mean of concept and fluency;
5. the best strength is the one with the highest combined score on ``select``; the report
   quotes the ``test`` split at that strength, so it is not chosen on what it is scored on.
"""
from __future__ import annotations

import platform
import time
from typing import Callable, Sequence

import torch

from .concepts import Concept, load_concept, load_prompts
from .fluency import continuation_nll, fluency_score, repetition_rate
from .judges import make_judge
from .report import AlphaScores, EvalReport
from .stats import bootstrap
from .sweep import sweep_ids

DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def caa_vector(model, tokenizer, concept: str | Concept, layers: Sequence[int], *,
               position: str = "mean", progress: bool = True):
    """The default steering of `evaluate`: CAA over the concept's ``train`` pairs."""
    import fasteer as fs
    concept = concept if isinstance(concept, Concept) else load_concept(concept)
    pos, neg = concept.pairs("train")
    return fs.extract.caa(model, tokenizer, pos, neg, layers=list(layers), position=position,
                          progress=progress)


def evaluate(model, tokenizer, concept: str | Concept, *, layers: Sequence[int] | None = None,
             alphas: Sequence[float] = DEFAULT_ALPHAS, vector=None,
             make_interventions: Callable | None = None, description: str | None = None,
             n_prompts: int = 24, max_new_tokens: int = 32, top_p: float = 0.9, seed: int = 0,
             position: str = "mean", n_boot: int = 2000, examples: int = 2,
             model_name: str | None = None, splits: Sequence[str] = ("select", "test"),
             progress: bool = True) -> EvalReport:
    """Evaluate steering towards ``concept`` at each strength in ``alphas``.

    Args:
        concept: a shipped concept name (``fasteer.evaluate.concept_names()``), a JSON
            path, or a `Concept`.
        layers: where the default CAA vector is extracted and added (default: a third of
            the depth). Ignored with ``make_interventions``.
        vector: a `SteeringVector` to use instead of extracting one (added at ``layers``,
            default its own layers).
        make_interventions: ``alpha -> intervention(s)``, for any other steering
            (``description`` names it in the report).
        n_prompts: neutral prompts per split (1..24); one continuation each per α.
        max_new_tokens, top_p, seed: sampling (temperature 1); the same seed for every α.
        position: ``"mean"`` (over tokens) or ``"last"`` for the CAA extraction.
        n_boot: bootstrap resamples for the intervals.
        splits: prompt splits to run; without ``"select"`` no best strength is picked
            (``best_alpha`` is None) -- a quick look, as in ``fasteer demo``.
    """
    import fasteer as fs

    t0 = time.perf_counter()
    concept = concept if isinstance(concept, Concept) else load_concept(concept)
    alphas = [float(a) for a in alphas]
    if len(set(alphas)) != len(alphas):
        raise ValueError("alphas: values must be distinct")
    if 0.0 not in alphas:
        alphas = [0.0] + alphas
    alphas = sorted(alphas)
    if max_new_tokens < 4:
        raise ValueError("max_new_tokens: at least 4 (looping is measured on 4-grams)")
    n_layers = model.config.num_hidden_layers
    if not splits or any(s not in ("select", "test") for s in splits):
        raise ValueError(f"splits: expected some of ('select', 'test'), got {splits!r}")
    prompts = {s: load_prompts(s, n_prompts) for s in ("select", "test") if s in splits}
    judge = make_judge(concept)        # before generating: a missing judge stops here

    if make_interventions is None:
        extracted = vector is None
        if extracted:
            layers = list(layers) if layers is not None else [max(0, n_layers // 3)]
            vector = caa_vector(model, tokenizer, concept, layers, position=position,
                                progress=progress)
        layers = list(layers) if layers is not None else list(vector.layers)
        vec = vector

        def make_interventions(a):
            return fs.Add(vec, alpha=a, layers=layers)
        norms = ", ".join(f"{float(vector[l].norm()):.1f}" for l in layers)
        source = (f"difference of {position} activations over {len(concept.pairs()[0])} "
                  f"train pairs" if extracted else
                  f"a given vector ({vector.metadata.get('method', 'method not recorded')})")
        description = description or (f"Add({'CAA ' if extracted else ''}vector, α) — "
                                       f"{source}, |v| = {norms}")
    else:
        layers = list(layers) if layers is not None else []
        description = description or "custom interventions"

    results = {}
    for split, split_prompts in prompts.items():
        out = sweep_ids(model, tokenizer, make_interventions, alphas, split_prompts,
                        max_new_tokens=max_new_tokens, seed=seed, top_p=top_p,
                        progress=progress, desc=f"{concept.name}/{split}: generate")
        # fluency is judged by the unsteered model (sweep_ids has unpatched it)
        nll = continuation_nll(model, out.sequences, out.attention_mask, out.prompt_len,
                               progress=progress, desc=f"{concept.name}/{split}: fluency").cpu()
        rep = repetition_rate(out.continuation_ids().cpu())
        verdicts = judge.verdicts(out.texts)
        nll_ref = float(nll[out.rows_of[0.0]].median())
        flu = fluency_score(nll, rep, nll_ref)
        rows = []
        for i, a in enumerate(alphas):
            sl = out.rows_of[a]
            stats = bootstrap({"concept": verdicts[sl], "fluency": flu[sl], "nll": nll[sl],
                               "repetition": rep[sl]}, n_boot=n_boot, seed=seed + i)
            rows.append(AlphaScores(a, len(split_prompts), stats,
                                    [(split_prompts[j], out.texts[sl][j])
                                     for j in range(min(examples, len(split_prompts)))]))
        results[split] = rows

    best = max(results["select"], key=lambda r: (r.scores["combined"][0], -abs(r.alpha))) \
        if "select" in results else None
    settings = dict(max_new_tokens=max_new_tokens, top_p=top_p, seed=seed, n_boot=n_boot,
                    position=position, n_prompts=n_prompts,
                    machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                            f"torch {torch.__version__}",
                    seconds=time.perf_counter() - t0)
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return EvalReport(model=str(name), concept=concept.name,
                      concept_description=concept.description, judge=judge.name,
                      judge_accuracy=judge.accuracy(concept), intervention=description,
                      layers=layers, settings=settings, select=results.get("select", []),
                      test=results.get("test", []), best_alpha=best.alpha if best else None)
