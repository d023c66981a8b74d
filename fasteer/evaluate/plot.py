"""The evaluation plot: concept and fluency against α with 95% bands, n printed."""
from __future__ import annotations

from pathlib import Path


def plot_report(report, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'fasteer[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.test
    alphas = [r.alpha for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.3), dpi=110)
    styles = {"concept": ("o-", "tab:blue", "concept score (judged share)"),
              "fluency": ("s-", "tab:orange", "fluency (vs unsteered NLL, × no-loop)"),
              "combined": ("^--", "tab:green", "combined (harmonic mean)")}
    for q, (style, color, label) in styles.items():
        mean = [r.scores[q][0] for r in rows]
        lo = [r.scores[q][1] for r in rows]
        hi = [r.scores[q][2] for r in rows]
        ax.plot(alphas, mean, style, color=color, label=label, lw=1.6, ms=4)
        ax.fill_between(alphas, lo, hi, color=color, alpha=0.18, lw=0)
    if report.best_alpha is not None:
        ax.axvline(report.best_alpha, color="grey", ls=":", lw=1)
        ax.text(report.best_alpha, 1.02, f" best α={report.best_alpha:g} (on select prompts)",
                fontsize=7, color="grey", va="bottom")
    ax.set_ylim(-0.03, 1.1)
    ax.set_xlabel("α (steering strength)")
    ax.set_ylabel("score (test prompts), 95% bootstrap band")
    n = rows[0].n if rows else 0
    short = report.intervention.split(" — ")[0]
    ax.set_title(f"fasteer eval · {report.concept} · {Path(report.model).name}\n"
                 f"{short} at layer(s) {report.layers} · n = {n} prompts per α", fontsize=9)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
