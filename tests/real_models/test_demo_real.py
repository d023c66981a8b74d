"""`fasteer demo --model smollm2|gemma3`: the demo's story on a real model, end to end
(subprocess, the CLI as a user runs it; small sizes)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _load import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_demo_on_a_real_model_prints_the_table_and_saves_the_plot(name, tmp_path):
    pytest.importorskip("vaderSentiment")
    load(name)                  # converted (or skipped / failed as _load decides)
    plot = tmp_path / "demo.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "fasteer", "demo", "--model", name,
                          "--prompts", "3", "--max-new-tokens", "6", "--alphas=-3,3",
                          "--timing-rounds", "2", "--plot", str(plot)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    layer = {"smollm2": 8, "gemma3": 6}[name]
    assert f"CAA sentiment vector at layer(s) [{layer}]" in out
    rows = [l.split() for l in out.splitlines() if l.strip().split(" ")[0] in ("-3", "0", "3")]
    assert [r[0] for r in rows] == ["-3", "0", "3"], out
    for r in rows:
        assert all(0.0 <= float(x) <= 1.0 for x in r[1:4]), r
    assert "decode latency, batch 4, alpha 3:" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_writes_report_json_and_plot(tmp_path):
    pytest.importorskip("vaderSentiment")
    load("smollm2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "fasteer", "eval", "--model", "smollm2",
                          "--concept", "ocean", "--prompts", "2", "--alphas", "2",
                          "--max-new-tokens", "6", "--out", str(tmp_path), "--quiet"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== ocean on smollm2: judge accuracy" in res.stdout
    import json
    data = json.loads((tmp_path / "smollm2_ocean.json").read_text())
    assert data["layers"] == [8] and [r["alpha"] for r in data["test"]] == [0.0, 2.0]
    assert data["best_alpha"] in (0.0, 2.0) and data["test"][0]["n"] == 2
    assert (tmp_path / "smollm2_ocean.md").read_text().startswith("# fasteer eval: ocean")
    assert (tmp_path / "smollm2_ocean.png").read_bytes()[:4] == b"\x89PNG"
