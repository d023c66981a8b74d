"""The command line as a user runs it: demo, sweep (PNG), extract -> generate, info, and
bad input as one clear line with exit code 2 and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def fasteer(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fasteer", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def assert_usage_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout[-500:], res.stderr[-2000:])
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_demo_runs_and_shows_the_effect():
    res = fasteer("demo", "--prompts", "8", "--no-timing")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            try:
                rows[float(parts[0])] = (float(parts[1]), float(parts[2]))
            except ValueError:
                pass
    assert 0.0 in rows and len(rows) >= 4, res.stdout
    alphas = sorted(rows)
    assert rows[alphas[-1]][1] < rows[0.0][1], "the largest alpha should hurt grammaticality"
    assert rows[alphas[0]][0] < rows[0.0][0] < max(v[0] for v in rows.values())


def test_sweep_writes_png(tmp_path):
    out = tmp_path / "sweep.png"
    res = fasteer("sweep", "--alphas=-1.3,0,1.3,8", "--prompts", "6", "--max-new-tokens", "16",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_extract_then_generate(tmp_path):
    from fasteer.demo import language
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"positive": p, "negative": n})
                               for p, n in language.contrastive_pairs(32)))
    vec = tmp_path / "v.safetensors"
    res = fasteer("extract", "--pairs", str(pairs), "--layers", "2", "--out", str(vec))
    assert res.returncode == 0, res.stderr[-3000:]
    assert vec.exists()
    res = fasteer("generate", "--prompt", "the weather", "--vector", str(vec), "--alpha", "1.3",
                  "--max-new-tokens", "8", "--greedy", "--compare")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unsteered:" in res.stdout and "alpha 1.3:" in res.stdout


def test_bad_model_path():
    assert_usage_error(fasteer("demo", "--model", "./no/such/model"), "--model", "no such path")


def test_alpha_not_a_number(tmp_path):
    assert_usage_error(fasteer("sweep", "--alphas", "1,abc", "--out", str(tmp_path / "x.png")),
                       "--alphas", "number")


def test_vector_for_another_hidden_size(tmp_path):
    import torch

    import fasteer as fs
    path = tmp_path / "wide.safetensors"
    fs.SteeringVector({2: torch.randn(64)}).save(path)
    assert_usage_error(fasteer("generate", "--prompt", "hi", "--vector", str(path), "--alpha", "2"),
                       "--vector", "hidden size")


def test_generate_alpha_not_a_number(tmp_path):
    assert_usage_error(fasteer("generate", "--prompt", "hi", "--vector", str(tmp_path / "v.gguf"),
                               "--alpha", "lots"), "--alpha")


@pytest.mark.parametrize("args", [["demo", "--dtype", "float8"], ["frobnicate"]])
def test_argparse_errors_are_one_line(args):
    assert_usage_error(fasteer(*args), "error")
