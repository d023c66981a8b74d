"""Confidence intervals over prompts: percentile bootstrap, and the AxBench combination.

Every score is a mean over prompts, and the prompts are the sample: a different set of
neutral openings would give a different mean. The 95% interval is the 2.5 / 97.5
percentiles of the statistic over ``n_boot`` resamples of the prompts (with replacement,
the same resampled prompts for every quantity, so a combined score's interval accounts for
the correlation between its parts). A seeded generator keeps reports reproducible.
"""
from __future__ import annotations

import torch


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b), and 0 where both are 0 (AxBench's aggregate of concept and fluency:
    high only when both are)."""
    s = a + b
    return torch.where(s > 0, 2 * a * b / s.clamp_min(1e-12), torch.zeros_like(s))


def bootstrap(columns: dict[str, torch.Tensor], *, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """{name: (mean, low, high)} for per-prompt ``columns`` (each shape [n_prompts]), plus
    ``"combined"`` = harmonic_mean(mean concept, mean fluency) when both are given."""
    n = len(next(iter(columns.values())))
    if n == 0 or any(len(c) != n for c in columns.values()):
        raise ValueError("bootstrap: columns must be non-empty and of equal length")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    cols = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in columns.items()}
    means = {k: v.mean() for k, v in cols.items()}
    boots = {k: v[idx].mean(1) for k, v in cols.items()}
    if "concept" in cols and "fluency" in cols:
        means["combined"] = harmonic_mean(means["concept"], means["fluency"])
        boots["combined"] = harmonic_mean(boots["concept"], boots["fluency"])
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for k, m in means.items():
        q = torch.quantile(boots[k], torch.tensor([lo_q, hi_q], dtype=torch.float64))
        out[k] = (float(m), float(q[0]), float(q[1]))
    return out
