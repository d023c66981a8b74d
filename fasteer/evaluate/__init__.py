"""Steering-quality evaluation: concept score, fluency and their combination per strength.

    from fasteer.evaluate import evaluate
    report = evaluate(model, tok, "sentiment", layers=[15], alphas=[0, 1, 2, 4, 8])
    print(report.markdown()); report.save("out/")

Modules, one concept each: `concepts` (the shipped contrastive datasets and prompt
splits), `judges` (offline concept judges), `fluency` (NLL under the unsteered model,
looping), `stats` (bootstrap intervals, harmonic mean), `sweep` (one generate per
strength sweep), `run` (`evaluate`), `report` and `plot`; for instruction following,
`instructions` (verifiable instructions and their request splits) and `responses` (greedy
chat answers, each block of prompts steered its own way, with their fluency).
"""
from .concepts import Concept, load_concept, load_prompts, names as concept_names
from .report import AlphaScores, EvalReport
from .run import DEFAULT_ALPHAS, evaluate

__all__ = ["AlphaScores", "Concept", "DEFAULT_ALPHAS", "EvalReport", "concept_names",
           "evaluate", "load_concept", "load_prompts"]
