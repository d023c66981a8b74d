"""`fasteer demo --model smollm2|gemma3` (or any English causal LM): the demo's story on a
real pretrained model.

1. extract a CAA sentiment vector from the shipped contrastive pairs
   (``fasteer/data/concepts/sentiment.json``, train split),
2. continue the shipped neutral test prompts at several alphas -- all alphas in ONE
   batched generate, each block of rows with its own steering (per-row slots),
3. per alpha: the concept score (share of continuations VADER calls positive), fluency
   (NLL under the unsteered model, looping) and their harmonic mean, with 95% intervals
   over prompts, and an example continuation,
4. save the plot (concept and fluency against alpha, with bands).

``fasteer eval`` is the full version: every shipped concept, a held-out split to pick the
best alpha, JSON/Markdown reports.
"""
from __future__ import annotations

from pathlib import Path

from ..cli import UsageError

# alphas for a real model: the CAA vector (difference of mean activations) is added once
# per unit. At the default layers (smollm2 8, gemma3 6) alpha 1.5-3 moves sentiment with
# most of the fluency kept, 6 costs half of it and by 12 the text falls apart
# (benchmarks/results/eval/ and tests/real_models/test_behaviour.py have the numbers).
REAL_ALPHAS = (-3.0, 0.0, 1.5, 3.0, 6.0, 12.0)


def check_real_arguments(args) -> Path:
    """What the real-model demo needs beyond the toy one, checked before loading."""
    plot = Path(args.plot) if args.plot else Path(f"fasteer-demo-{Path(args.model).name}.png")
    if plot.suffix.lower() != ".png":
        raise UsageError(f"--plot: expected a .png path, got {args.plot!r}")
    if args.prompts > 24:
        raise UsageError("--prompts: the shipped neutral prompts are 24 per split; expected 1..24")
    try:
        import matplotlib  # noqa: F401
        import vaderSentiment  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"the demo on a real model judges sentiment with VADER and plots with "
                         f"matplotlib: pip install 'fasteer[eval]' ({exc})") from None
    return plot


def run_real_demo(args, model, tok, layers, alphas, max_new, plot: Path):
    """Runs the demo; returns the steering vector (the latency measurement reuses it)."""
    from ..evaluate import evaluate
    from ..evaluate.run import caa_vector

    from . import _common as C
    progress = C.progress_enabled(args.quiet)
    vec = caa_vector(model, tok, "sentiment", layers, position="mean", progress=progress)
    norms = ", ".join(f"{float(vec[l].norm()):.1f}" for l in layers)
    report = evaluate(model, tok, "sentiment", layers=layers, alphas=alphas, vector=vec,
                      n_prompts=args.prompts, max_new_tokens=max_new, seed=args.seed,
                      model_name=args.model, splits=("test",), examples=1, progress=progress,
                      description=f"Add(CAA vector, α) — difference of mean activations over "
                                  f"the 48 shipped train pairs, |v| = {norms}")
    print(f"CAA sentiment vector at layer(s) {layers}: {report.intervention}")
    print(f"one batched generate: {len(report.test)} alphas x {report.test[0].n} prompts, "
          f"{max_new} sampled tokens each\n")
    print(f"{'alpha':>6}  {'positive':>8}  {'fluency':>7}  {'combined':>8}   example")
    for r in report.test:
        p, t = r.examples[0]
        ex = f"{p} | {' '.join(t.split())}"
        print(f"{r.alpha:>6g}  {r.scores['concept'][0]:>8.2f}  {r.scores['fluency'][0]:>7.2f}  "
              f"{r.scores['combined'][0]:>8.2f}   {ex[:100]}")
    n = report.test[0].n
    print(f"\npositive: share of continuations VADER (a sentiment lexicon) calls positive; "
          f"fluency: perplexity under the unsteered model relative to its own text, times "
          f"(1 - looping); combined: their harmonic mean. n = {n} prompts per alpha; 95% "
          f"intervals in the plot and in `fasteer eval`.")
    from ..evaluate.plot import plot_report
    plot_report(report, plot)
    print(f"wrote {plot}")
    return vec
