"""Shared benchmark helpers: machine info, interleaved timing, result files.

Timing is interleaved: each round runs every candidate once, in a rotating order, so
slow drift of the machine (other processes, frequency) hits all candidates alike; the
figures are medians over rounds and ratios are ratios of medians from the same run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from fasteer import __version__
        info["fasteer"] = __version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved(candidates: dict[str, Callable[[], None]], rounds: int, inner: int = 1,
                warmup: int = 2, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved rounds."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = candidates[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(v) for n, v in samples.items()}


def results_dir() -> Path:
    """benchmarks/results/ (the committed figures), or the folder FASTEER_BENCH_OUT names
    (`fasteer bench` sets it, so a user's run never writes into the checkout)."""
    out = os.environ.get("FASTEER_BENCH_OUT")
    return Path(out).expanduser() if out else RESULTS


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{stem}.json"
    md_path = folder / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def machine_line(info: dict) -> str:
    return (f"{info['date']} · {info['device']} · {info['cpu']} ({info['cpu_count']} cores, "
            f"torch threads {info['torch_threads']}) · torch {info['torch']} · "
            f"fasteer {info.get('fasteer', '?')}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
