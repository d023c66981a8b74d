"""Verifiable instructions: IFEval-style rules a program can check, written for fasteer.

An `Instruction` is a sentence appended to a request ("Describe the moon." + " Respond in
French.") and a checker that says, from the response text alone, whether the response
follows it. No model judges, no downloads: the checkers are regular expressions, word counts
and (for languages) the Lingua language identifier fasteer's evaluation already uses.

The shipped set was picked by measurement on SmolLM2-135M-Instruct: a steering vector can
only be judged on instructions the model follows when they are in the prompt, and a 135M
model follows few ("Answer in all lowercase." and "Wrap your response in double quotation
marks" stay at 0.00 even when asked). One per kind Stolfo et al. (ICLR 2025) study:

=============  ==========  =====================================================  =========
name           kind        rule the checker applies                               steering
=============  ==========  =====================================================  =========
french         language    Lingua says French (among French, English, Spanish,    clamp
                           German, Italian)
title          format      a title wrapped in double angular brackets <<...>>     clamp
numbered_list  format      at least two lines that start "1." / "2)" ...          clamp
include_future keyword     the word "future" occurs (whole word, any case)        clamp
exclude_can    keyword     the word "can" does not occur (whole word, any case)   clamp
short          length      at most 30 words, and at least one                     add
=============  ==========  =====================================================  =========

"steering" is the paper's choice per kind: format, language and keyword instructions are
steered by setting the projection on the instruction direction (`fasteer.Clamp`), length by
adding the direction with a weight (`fasteer.Add`).

Each instruction has three phrasings; request i gets phrasing ``i % 3``, so a vector is
extracted from (and a prompt carries) more than one wording.

Requests (``fasteer/data/instructions/requests.json``): eight templates ("Describe {t}.",
"Explain {t} to a beginner.", ...) filled with topics, in three splits with disjoint topics:
``train`` (64, extraction), ``validation`` (32, layer and weight selection) and ``test``
(64, reported numbers).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "instructions" / "requests.json"
SPLITS = ("train", "validation", "test")
KINDS = ("language", "format", "keyword", "length")
MODES = ("clamp", "add")


@dataclass(frozen=True)
class Instruction:
    """A verifiable instruction: ``phrasings`` to append, ``check(response) -> bool``."""
    name: str
    kind: str
    rule: str                            # what ``check`` verifies, in words
    phrasings: tuple[str, ...]
    check: Callable[[str], bool]
    mode: str = "clamp"                  # how Stolfo et al. steer this kind: "clamp" | "add"

    def apply(self, request: str, index: int = 0) -> str:
        """``request`` followed by phrasing ``index % len(phrasings)``."""
        return f"{request.rstrip()} {self.phrasings[index % len(self.phrasings)]}"

    def apply_all(self, requests: Sequence[str]) -> list[str]:
        """Every request with its phrasing (request i gets phrasing i mod 3)."""
        return [self.apply(r, i) for i, r in enumerate(requests)]

    def verdicts(self, responses: Sequence[str]) -> torch.Tensor:
        """1.0 where a response follows the instruction, else 0.0 (float64 [n])."""
        return torch.tensor([float(bool(self.check(r))) for r in responses],
                            dtype=torch.float64)


# --- checkers -------------------------------------------------------------------------

def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", re.IGNORECASE)


def contains_word(text: str, word: str) -> bool:
    """``word`` occurs as a whole word (any case): "Future" and "future," count,
    "futures" and "futuristic" do not."""
    return _word_pattern(word).search(text) is not None


def word_count(text: str) -> int:
    """Whitespace-separated words (IFEval counts words the same way)."""
    return len(text.split())


def at_most_words(text: str, n: int) -> bool:
    """Between 1 and ``n`` words: an empty response follows no instruction."""
    return 1 <= word_count(text) <= n


_TITLE = re.compile(r"<<[^<>\n]*[^<>\s][^<>\n]*>>")
_LIST_ITEM = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)


def has_title(text: str) -> bool:
    """A title wrapped in double angular brackets: ``<<poem of joy>>`` (IFEval's rule)."""
    return _TITLE.search(text) is not None


def numbered_items(text: str) -> int:
    """Lines that start with a number and "." or ")" followed by text."""
    return len(_LIST_ITEM.findall(text))


@functools.lru_cache(maxsize=None)
def _language_detector():
    try:
        from lingua import Language, LanguageDetectorBuilder
    except ImportError:
        from .judges import INSTALL
        raise ImportError(f"the language checker needs lingua-language-detector: {INSTALL}") \
            from None
    langs = [Language.FRENCH, Language.ENGLISH, Language.SPANISH, Language.GERMAN,
             Language.ITALIAN]
    return LanguageDetectorBuilder.from_languages(*langs).build(), Language


def in_language(text: str, language: str) -> bool:
    """Lingua's most likely language of ``text`` (among five European ones) is
    ``language`` (e.g. "french"); empty text is in no language."""
    if not text.strip():
        return False
    detector, Language = _language_detector()
    return detector.detect_language_of(text) == Language.from_str(language)


# --- the shipped set ------------------------------------------------------------------

def _make() -> dict[str, Instruction]:
    items = [
        Instruction("french", "language", "the response is in French (Lingua)",
                    ("Respond in French.", "Your entire answer must be in French.",
                     "Answer only in French, no other language is allowed."),
                    lambda r: in_language(r, "french")),
        Instruction("title", "format", "a title wrapped in double angular brackets, <<...>>",
                    ("Your answer must contain a title, wrapped in double angular brackets, "
                     "such as <<poem of joy>>.",
                     "Give your answer a title in double angular brackets, like <<my title>>.",
                     "Start with a title wrapped in double angular brackets, e.g. "
                     "<<a short title>>."),
                    has_title),
        Instruction("numbered_list", "format", "at least two numbered lines (1. / 2) ...)",
                    ("Answer with a numbered list.", "Format your answer as a numbered list.",
                     "Give your answer as a numbered list (1., 2., 3., ...)."),
                    lambda r: numbered_items(r) >= 2),
        Instruction("include_future", "keyword", 'the word "future" occurs',
                    ('Make sure to include the word "future".',
                     'Please include the word "future".',
                     'The output must contain the word "future".'),
                    lambda r: contains_word(r, "future")),
        Instruction("exclude_can", "keyword", 'the word "can" does not occur',
                    ('Do not use the word "can".', 'Make sure not to include the word "can".',
                     'The output should not contain the word "can".'),
                    lambda r: bool(r.strip()) and not contains_word(r, "can")),
        Instruction("short", "length", "at most 30 words (and at least one)",
                    ("Answer in one sentence.", "Keep your answer to a single sentence.",
                     "Respond with one short sentence."),
                    lambda r: at_most_words(r, 30), mode="add"),
    ]
    return {i.name: i for i in items}


INSTRUCTIONS: dict[str, Instruction] = _make()


def names() -> list[str]:
    """The shipped instructions, in table order."""
    return list(INSTRUCTIONS)


def get_instruction(name: str) -> Instruction:
    if name not in INSTRUCTIONS:
        raise ValueError(f"instruction: expected one of {names()}, got {name!r}")
    return INSTRUCTIONS[name]


def load_requests(split: str, n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) base requests of ``split``
    ('train', 'validation' or 'test'); the splits have disjoint topics."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected a positive int or None, got {n!r}")
    data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    requests = data[split]
    if n is not None and n > len(requests):
        raise ValueError(f"n: split {split!r} has {len(requests)} requests, asked for {n}")
    return list(requests if n is None else requests[:n])
