"""The embedded demo world, from Python: a 4-layer Llama trained on a synthetic sentiment
language, its tokenizer, contrastive pairs to extract a sentiment vector from, neutral
prompts to continue, a checker that scores continuations, and a 512-feature SAE.

Everything ships inside the package (no download), so every example in fasteer's docs
runs on it::

    import fasteer as fs
    from fasteer import demo

    model, tok = demo.load_model()
    positive, negative = demo.pairs()                  # 128 mirrored prompt pairs
    vec = fs.extract.caa(model, tok, positive, negative, layers=[demo.LAYER])
    with fs.steer(model, fs.Add(vec, alpha=demo.ALPHA)):
        prompts = demo.neutral_prompts(8)
        texts = demo.continue_prompts(model, tok, prompts)
    demo.score(prompts, texts)                         # {'attribute': ..., 'grammaticality': ...}

The same pairs are a file, `demo.PAIRS_FILE` (JSON lines of ``{"positive", "negative"}``),
the format ``fasteer extract --pairs`` reads::

    fasteer extract --pairs "$(python -c 'import fasteer.demo as d; print(d.PAIRS_FILE)')" \\
        --layers 2 --out happy.safetensors

Why a toy: a model every test and docs example can load in a second, whose text a
grammar and a lexicon judge exactly. Real pretrained models are `fasteer.models`.
"""
from __future__ import annotations

from pathlib import Path

from .language import contrastive_pairs as _contrastive_pairs
from .language import neutral_prompts as _neutral_prompts
from .world import (DEMO_ALPHA, DEMO_ALPHAS, DEMO_DIR, DEMO_LAYER, DEMO_MAX_NEW_TOKENS,
                    DEMO_PAIRS, DEMO_TOP_P, generate_continuations, load_demo_model)

__all__ = ["ALPHA", "ALPHAS", "LAYER", "MODEL_DIR", "PAIRS_FILE", "continue_prompts",
           "load_model", "load_sae", "neutral_prompts", "pairs", "sae_info", "score"]

#: The layer whose output the demo steers (resid_post[2] of 4).
LAYER = DEMO_LAYER
#: A strength that turns the demo's text positive and keeps it grammatical.
ALPHA = DEMO_ALPHA
#: The strengths `fasteer demo` shows, from negative to broken.
ALPHAS = DEMO_ALPHAS
#: The demo model's Hugging Face folder (config, safetensors weights, tokenizer).
MODEL_DIR = DEMO_DIR
#: The demo's contrastive pairs as a file, one ``{"positive": .., "negative": ..}`` per line.
PAIRS_FILE = Path(__file__).resolve().parent / "data" / "sentiment_pairs.jsonl"


def load_model(device="cpu", dtype=None):
    """``(model, tokenizer)``: the demo Llama (float32 unless ``dtype``) in eval mode and
    its word-level tokenizer, left padding, pad token set."""
    import torch
    return load_demo_model(device=device, dtype=torch.float32 if dtype is None else dtype)


def load_sae(device="cpu", dtype=None):
    """The demo SAE (512 ReLU features reading resid_post[2]) as a `fasteer.SAE`.
    Which feature reads sentiment: `sae_info()`."""
    from .sae import load_demo_sae
    sae, _ = load_demo_sae(device=device, dtype=dtype)
    return sae


def sae_info() -> dict:
    """The demo SAE's notes: ``positive_feature`` (the feature that reads positive
    sentiment), ``negative_feature``, ``density`` (every feature's firing rate on the
    training corpus, what `fs.extract.fgaa(..., density=)` takes)."""
    from .sae import load_demo_features
    return load_demo_features()


def pairs(n: int = DEMO_PAIRS, seed: int = 2) -> tuple[list[str], list[str]]:
    """``(positive, negative)``: ``n`` prompts and their mirrors (every sentiment word
    swapped for its opposite, cut at the same word). The defaults are `PAIRS_FILE`'s pairs."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a number of pairs >= 1, got {n!r}")
    made = _contrastive_pairs(n, seed=seed)
    return [p for p, _ in made], [q for _, q in made]


def neutral_prompts(n: int = 24, seed: int = 1) -> list[str]:
    """``n`` prompts with no sentiment yet, to continue."""
    return _neutral_prompts(n, seed=seed)


def continue_prompts(model, tokenizer, prompts, *, max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
                     seed: int = 0, greedy: bool = False) -> list[str]:
    """Continue ``prompts`` in one batch (nucleus sampling as `fasteer demo`, or greedy);
    the continuations' text."""
    return generate_continuations(model, tokenizer, prompts, seed=seed,
                                  max_new_tokens=max_new_tokens, do_sample=not greedy,
                                  top_p=DEMO_TOP_P)


def score(prompts, continuations) -> dict:
    """``{"attribute": share of positive sentiment words in the continuations,
    "grammaticality": share of prompt + continuation texts the grammar parses, ...}``:
    the numbers `fasteer demo` prints."""
    from .world import evaluate
    return evaluate(prompts, continuations)
