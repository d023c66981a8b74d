"""The contrastive concept datasets fasteer ships, and how they are read.

Each concept is one JSON file in ``fasteer/data/concepts/`` (written for this project):
matched pairs -- ``positive[i]`` expresses the concept, ``negative[i]`` says the same
thing without it -- split into ``train`` (to extract a vector, and to fit the embedding
judge's centroids) and ``test`` (to check the judge). ``prompts.json`` holds neutral
openings in two disjoint splits: ``select`` picks the best steering strength, ``test``
reports it (AxBench's protocol: the strength is never chosen on the prompts it is scored on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "concepts"
SPLITS = ("train", "test")
PROMPT_SPLITS = ("select", "test")
JUDGE_KINDS = ("lexicon", "language", "embedding")


@dataclass(frozen=True)
class Concept:
    """One shipped concept: matched ``positive``/``negative`` texts per split, a judge spec."""
    name: str
    description: str
    judge: dict
    positive: dict      # split -> tuple of texts
    negative: dict

    def pairs(self, split: str = "train") -> tuple[list[str], list[str]]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return list(self.positive[split]), list(self.negative[split])


def names() -> list[str]:
    """The shipped concepts, by name."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json") if p.stem != "prompts")


def _texts(obj, where: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not obj or not all(isinstance(t, str) and t.strip()
                                                      for t in obj):
        raise ValueError(f"{where}: expected a non-empty list of non-empty strings")
    return tuple(obj)


def load_concept(name_or_path: str | Path) -> Concept:
    """A shipped concept by name (``fasteer.evaluate.concepts.names()``) or a JSON file of
    the same schema (see ``fasteer/data/concepts/README.md``)."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        if str(name_or_path) not in names():
            raise ValueError(f"concept: expected one of {names()} or a .json file, got "
                             f"{str(name_or_path)!r}")
        path = DATA_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"concept file not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    where = path.name
    for key in ("name", "description", "judge", "positive", "negative"):
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
    judge = data["judge"]
    if not isinstance(judge, dict) or judge.get("kind") not in JUDGE_KINDS:
        raise ValueError(f"{where}: judge.kind must be one of {JUDGE_KINDS}")
    sides = {}
    for side in ("positive", "negative"):
        sides[side] = {s: _texts(data[side].get(s), f"{where}: {side}.{s}") for s in SPLITS}
    for s in SPLITS:
        if len(sides["positive"][s]) != len(sides["negative"][s]):
            raise ValueError(f"{where}: positive.{s} and negative.{s} are matched pairs and "
                             f"must have equal length")
    return Concept(str(data["name"]), str(data["description"]), dict(judge),
                   sides["positive"], sides["negative"])


def load_prompts(split: str, n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) neutral prompts of ``split`` ('select' or 'test')."""
    if split not in PROMPT_SPLITS:
        raise ValueError(f"prompt split: expected one of {PROMPT_SPLITS}, got {split!r}")
    data = json.loads((DATA_DIR / "prompts.json").read_text(encoding="utf-8"))
    prompts = _texts(data.get(split), f"prompts.json: {split}")
    if n is not None:
        if not 1 <= n <= len(prompts):
            raise ValueError(f"prompts: expected 1..{len(prompts)} per split, got {n}")
        prompts = prompts[:n]
    return list(prompts)
