"""Prompt files in, steering vector out: the function behind ``fasteer extract``.

File formats (chosen to match what people already have):

* **one prompt per line** (``.txt`` or any other extension): every non-blank line is a prompt,
  taken literally (trailing newline and carriage return removed).  This is llama.cpp's
  ``cvector-generator`` format (``--positive-file`` / ``--negative-file``).  Multi-line prompts
  need the JSON formats.
* **``.jsonl``**: one JSON value per line, either a pair object ``{"positive": ..., "negative": ...}``
  (a pairs file) or a string (a prompt list).
* **``.json``**: a list of pair objects (repeng's ``DatasetEntry`` fields) or of strings.

Errors name the file and line, and come before the model runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from fasteer.vectors import SteeringVector

METHODS = ("caa", "pca_diff", "pca_center", "instruction", "ablation")


def _records(path: Path) -> list[tuple[int, Any]]:
    """``(line_number, value)`` for each prompt/pair record in ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"no such prompt file: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts or pair objects, got {type(data).__name__}")
        return [(i + 1, v) for i, v in enumerate(data)]  # "line" = item number here
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if suffix == ".jsonl":
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON ({exc})") from None
        else:
            records.append((number, line))
    return records


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """A list of prompts from a one-per-line text file, or a JSON/JSONL list of strings."""
    path = Path(path)
    prompts = []
    for number, value in _records(path):
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: expected a prompt string, got {type(value).__name__}")
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts


def read_pairs_file(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """``(positive, negative)`` from a JSONL/JSON file of ``{"positive": .., "negative": ..}``."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"pairs: expected a .jsonl or .json file of {{\"positive\", \"negative\"}} objects, got {str(path)!r}")
    positive, negative = [], []
    for number, value in _records(path):
        if not isinstance(value, dict) or not isinstance(value.get("positive"), str) or not isinstance(value.get("negative"), str):
            raise ValueError(f'{path}:{number}: expected {{"positive": "...", "negative": "..."}} with string values')
        positive.append(value["positive"])
        negative.append(value["negative"])
    if not positive:
        raise ValueError(f"{path}: holds no pairs")
    return positive, negative


def extract_from_files(
    model: nn.Module,
    tokenizer: Any,
    method: str = "caa",
    *,
    pairs: str | os.PathLike[str] | None = None,
    positive: str | os.PathLike[str] | None = None,
    negative: str | os.PathLike[str] | None = None,
    layers: Any = None,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> SteeringVector:
    """Read prompts from files, extract a vector with ``method``, optionally save it.

    Args:
        method: ``caa``, ``pca_diff``, ``pca_center``, ``instruction`` (positive = with the
            instruction; the Clamp targets go into the vector's ``clamp_targets`` metadata) or
            ``ablation``.
        pairs: a ``.jsonl`` / ``.json`` file of positive/negative pairs, *or*
        positive, negative: two prompt files.
        output: where to save the vector (``.safetensors`` or ``.gguf``); ``None`` = don't save.
        options: passed to the method (``position``, ``site``, ``batch_size``, ``chat_template``,
            ``system_prompt``, ``padding_side``, ``progress``).
    """
    from . import ablation_direction, caa, instruction, pca

    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if (pairs is None) == (positive is None and negative is None):
        raise ValueError("give either pairs= (one pairs file) or positive= and negative= (two prompt files)")
    if pairs is None and (positive is None or negative is None):
        raise ValueError("positive/negative: both prompt files are needed")
    if output is not None and Path(output).suffix.lower() not in (".safetensors", ".st", ".gguf"):
        raise ValueError(f"output: expected a .safetensors or .gguf file name, got {str(output)!r}")
    if output is not None and Path(output).suffix.lower() == ".gguf" and options.get("site", "resid_post") == "resid_post":
        from .activations import resolve_layers

        if 0 in resolve_layers(model, layers):
            # Caught here rather than after the forward passes: llama.cpp rejects direction.0.
            raise ValueError("layers: a .gguf output cannot hold layer 0 (llama.cpp rejects direction.0); leave layer 0 out")
    if pairs is not None:
        pos, neg = read_pairs_file(pairs)
    else:
        pos, neg = read_prompt_file(positive), read_prompt_file(negative)

    if method == "caa":
        vector = caa(model, tokenizer, pos, neg, layers, **options)
    elif method in ("pca_diff", "pca_center"):
        vector = pca(model, tokenizer, pos, neg, layers, method=method, **options)
    elif method == "instruction":
        vector = instruction(model, tokenizer, pos, neg, layers, **options).vector
    else:
        vector = ablation_direction(model, tokenizer, pos, neg, layers, **options)
    if output is not None:
        vector.save(output)
    return vector
