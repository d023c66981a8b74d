"""benchmarks/bench_vllm.py, smoke run: four vLLM workers (unsteered, fasteer, fasteer-half,
hooks) start, pass the output checks, and the printed table has every configuration with
finite throughput ratios."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["unsteered", "fasteer", "fasteer-half", "hooks"]


def test_bench_vllm_quick_prints_every_config_with_finite_ratios():
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTEER_VLLM_REGISTRY", "FASTEER_BENCH_OUT")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vllm.py"),
                          "--quick", "--no-write"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "checks passed" in out, out
    lines = [l for l in out.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for name in CONFIGS:
        assert f"{name} tok/s" in header, header
    ratio_cols = [i for i, h in enumerate(header) if h.endswith("×") or h == "fasteer / hooks"]
    assert len(ratio_cols) == 4, header
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]
    assert [r[0] for r in rows] == ["1", "4"], rows
    for row in rows:
        for i, cell in enumerate(row[1:], start=1):
            value = float(cell.rstrip("×"))
            assert math.isfinite(value) and value > 0, (header[i], cell)
    assert "Target:" in out
