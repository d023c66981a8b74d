"""The result of a steering evaluation: per strength, concept / fluency / combined scores
with 95% intervals over prompts, for the ``select`` and ``test`` prompt splits; the best
strength (picked on ``select``), a Markdown table, JSON, and the plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUANTITIES = ("concept", "fluency", "combined", "nll", "repetition")


@dataclass
class AlphaScores:
    alpha: float
    n: int                                   # prompts (one continuation each)
    scores: dict                             # quantity -> (mean, low, high)
    examples: list = field(default_factory=list)   # [(prompt, continuation)]


@dataclass
class EvalReport:
    model: str
    concept: str
    concept_description: str
    judge: str
    judge_accuracy: float                    # on the concept's held-out labelled texts
    intervention: str
    layers: list
    settings: dict
    select: list                             # [AlphaScores], select prompts
    test: list                               # [AlphaScores], test prompts
    best_alpha: float | None                 # argmax of combined on `select` (None: not run)

    def at(self, alpha: float, split: str = "test") -> AlphaScores:
        for r in getattr(self, split):
            if r.alpha == alpha:
                return r
        raise KeyError(alpha)

    # ------------------------------------------------------------------ text
    def table(self, split: str = "test") -> str:
        """A Markdown table of ``split``: mean [95% interval] per quantity and strength."""
        def cell(v):
            m, lo, hi = v
            return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
        head = ("| α | concept | fluency | combined | NLL/token | repetition | n |\n"
                "|---:|---|---|---|---|---|---:|")
        lines = [head]
        for r in getattr(self, split):
            mark = " **(best)**" if r.alpha == self.best_alpha else ""
            lines.append(f"| {r.alpha:g}{mark} | " + " | ".join(cell(r.scores[q]) for q in QUANTITIES)
                         + f" | {r.n} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        best = self.at(self.best_alpha) if self.best_alpha is not None else None
        base = self.at(0.0) if any(r.alpha == 0.0 for r in self.test) else None
        s = self.settings
        out = [f"# fasteer eval: {self.concept} on {self.model}", "",
               f"- concept: {self.concept_description}",
               f"- intervention: {self.intervention} at layer(s) {self.layers}",
               f"- judge: {self.judge}; accuracy on the concept's held-out labelled texts: "
               f"{self.judge_accuracy:.2f}",
               f"- generation: {s['max_new_tokens']} sampled tokens (top-p {s['top_p']}, "
               f"temperature 1, seed {s['seed']}) per prompt, {self.test[0].n} prompts per α and split, "
               f"all strengths of a split in one batched generate",
               f"- intervals: 95% percentile bootstrap over prompts ({s['n_boot']} resamples)",
               (f"- best α = {self.best_alpha:g}, picked on the `select` prompts by the combined "
                f"score; on the `test` prompts: concept {best.scores['concept'][0]:.2f}, "
                f"fluency {best.scores['fluency'][0]:.2f}, combined {best.scores['combined'][0]:.2f}"
                + (f" (unsteered: concept {base.scores['concept'][0]:.2f}, combined "
                   f"{base.scores['combined'][0]:.2f})" if base else "")) if best else
               "- no best α picked (the `select` prompts were not run)",
               f"- command: `{s.get('command', '')}`" if s.get("command") else "",
               f"- machine: {s.get('machine', '')}, {s.get('seconds', 0):.0f} s" if s.get("machine") else "",
               "", "## test prompts", "", self.table("test"), "",
               *(["## select prompts", "", self.table("select"), ""] if self.select else []),
               "## examples (test prompts)", ""]
        for r in self.test:
            for p, t in r.examples:
                out.append(f"- α={r.alpha:g}: *{p}* → {t.strip()[:160]!r}")
        return "\n".join(line for line in out if line is not None) + "\n"

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d, allow_nan=False, default=float))

    @classmethod
    def from_dict(cls, data: dict) -> "EvalReport":
        """The inverse of `to_dict` (a saved ``.json`` report, e.g. to re-plot it)."""
        data = dict(data)
        for split in ("select", "test"):
            data[split] = [AlphaScores(r["alpha"], r["n"],
                                       {k: tuple(v) for k, v in r["scores"].items()},
                                       [tuple(e) for e in r["examples"]])
                           for r in data[split]]
        return cls(**data)

    @classmethod
    def load(cls, path) -> "EvalReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save(self, directory, stem: str | None = None) -> dict:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (the plot needs
        matplotlib) into ``directory``; returns {kind: path}."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or f"{_slug(self.model)}_{self.concept}"
        paths = {"json": directory / f"{stem}.json", "md": directory / f"{stem}.md",
                 "png": directory / f"{stem}.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        paths["md"].write_text(self.markdown())
        from .plot import plot_report
        plot_report(self, paths["png"])
        return paths


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in Path(text).name)
    return keep.strip("-") or "model"


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
