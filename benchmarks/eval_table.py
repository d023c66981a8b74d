"""The README's steering-quality table, built from `fasteer eval` reports (JSON).

    python benchmarks/eval_table.py [benchmarks/results/eval]

One row per (model, concept): the judge's held-out accuracy, the unsteered concept score,
the best alpha (picked on the `select` prompts) and, on the `test` prompts at that alpha,
concept / fluency / combined with 95% intervals. Also re-draws each report's PNG from its
JSON (so a plotting change needs no re-run of the models).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fasteer.evaluate import EvalReport  # noqa: E402
from fasteer.evaluate.plot import plot_report  # noqa: E402


def cell(v) -> str:
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def table(folder: str | Path = "benchmarks/results/eval") -> str:
    """The table: one row per report in ``folder``."""
    rows = ["| model | concept | layer | judge acc. | concept at α=0 | best α | concept | "
            "fluency | combined | n |",
            "|---|---|---|---:|---:|---:|---|---|---|---:|"]
    for path in sorted(Path(folder).glob("*.json")):
        r = EvalReport.load(path)
        best, base = r.at(r.best_alpha), r.at(0.0)
        rows.append(f"| {r.model} | {r.concept} | {r.layers} | {r.judge_accuracy:.2f} | "
                    f"{base.scores['concept'][0]:.2f} | {r.best_alpha:g} | "
                    f"{cell(best.scores['concept'])} | {cell(best.scores['fluency'])} | "
                    f"{cell(best.scores['combined'])} | {best.n} |")
    return "\n".join(rows)


def main(folder: str = "benchmarks/results/eval") -> None:
    for path in sorted(Path(folder).glob("*.json")):
        plot_report(EvalReport.load(path), path.with_suffix(".png"))
    print(table(folder))


if __name__ == "__main__":
    main(*sys.argv[1:])
