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


# ----------------------------------------------------------------- first-contact defects
def test_unusable_device_is_a_usage_error():
    # cuda:99 is unusable on any machine: no CUDA in a CPU torch, or too few devices
    assert_usage_error(fasteer("demo", "--device", "cuda:99"), "--device cuda:99")
    assert_usage_error(fasteer("demo", "--device", "warp-drive"), "--device")


@pytest.mark.parametrize("backend, words", [("bogus", ["FASTEER_BACKEND", "'bogus'"]),
                                            ("triton", ["FASTEER_BACKEND", "TRITON_INTERPRET"])])
def test_bad_backend_environment_is_a_usage_error(monkeypatch, backend, words):
    monkeypatch.setenv("FASTEER_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert_usage_error(fasteer("generate", "--prompt", "hi", "--vector", "v.gguf"), *words)


def test_info_names_the_active_backend_and_flags_a_bad_one(monkeypatch):
    res = fasteer("info")
    assert res.returncode == 0, res.stderr
    assert "active backend on cpu tensors: cpu  (FASTEER_BACKEND unset, so auto)" in res.stdout
    # the shipped SAE is listed from its files (cfg.json, training.json)
    assert "packaged SAEs" in res.stdout
    assert "4096 ReLU features at blocks.8.hook_resid_post (FVE 0." in res.stdout
    monkeypatch.setenv("FASTEER_BACKEND", "reference")
    assert "active backend on cpu tensors: reference" in fasteer("info").stdout
    monkeypatch.setenv("FASTEER_BACKEND", "bogus")
    res = fasteer("info")
    assert "active backend: none -- FASTEER_BACKEND='bogus'" in res.stdout
    assert "warning" in res.stderr and "'bogus'" in res.stderr


def _no_model_loading(monkeypatch):
    from fasteer.commands import _common

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(_common, "load_model", refuse)


def test_demo_layer_is_checked_by_its_own_name_before_loading(monkeypatch, capsys):
    from fasteer.cli import main
    _no_model_loading(monkeypatch)
    assert main(["demo", "--layer", "9"]) == 2
    err = capsys.readouterr().err
    assert "--layer:" in err and "--layers" not in err and "0..3" in err


def test_sweep_without_matplotlib_stops_before_any_work(monkeypatch, capsys, tmp_path):
    from fasteer.cli import main
    _no_model_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["sweep", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fasteer[plot]'" in err
    assert not (tmp_path / "s.png").exists()


def test_demo_reports_the_latency_ratio_with_its_spread():
    res = fasteer("demo", "--prompts", "2", "--alphas", "1.3", "--max-new-tokens", "4",
                  "--timing-rounds", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("decode latency"))
    assert "(median of 3 paired rounds; per-round " in line, line
    assert_usage_error(fasteer("demo", "--timing-rounds", "1"), "--timing-rounds")


def test_bench_writes_where_the_user_says_not_into_the_checkout(monkeypatch, tmp_path, capsys):
    """`fasteer bench` hands its folder to the benchmark scripts (FASTEER_BENCH_OUT), and
    their write_results honours it; the default is the user's cache, not benchmarks/."""
    import runpy

    from fasteer.cli import main
    from fasteer.commands import bench

    seen = {}

    def fake_script(path, run_name):
        sys.path.insert(0, os.path.dirname(path))
        import common
        seen["argv"] = list(sys.argv)
        seen["paths"] = common.write_results("probe", {"ok": 1}, "# probe\n")

    monkeypatch.setattr(runpy, "run_path", fake_script)
    assert main(["bench", "ops", "--quick", "--out", str(tmp_path / "mine")]) == 0
    assert [p.parent for p in seen["paths"]] == [tmp_path / "mine"] * 2
    assert (tmp_path / "mine" / "probe.json").read_text().strip() == '{\n  "ok": 1\n}'
    assert "FASTEER_BENCH_OUT" not in os.environ and seen["argv"][1:] == ["--quick"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["bench", "ops"]) == 0
    assert seen["paths"][0] == tmp_path / "cache" / "fasteer" / "bench" / "probe.json"
    assert bench.default_out() == tmp_path / "cache" / "fasteer" / "bench"
