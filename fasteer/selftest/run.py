"""Entry point of the self-test (see the package docstring)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import traceback
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, flush=True)


def _environment() -> dict:
    import torch

    from .. import __version__
    from ..ops import backend_status

    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "fasteer": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "backends": {k: {"available": ok, "detail": why} for k, (ok, why) in backend_status().items()}}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasteer.selftest", description=__doc__)
    p.add_argument("--out", default=None, help="folder for the JSON and markdown results "
                   "(default: benchmarks/results when run from a checkout, else the current folder)")
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        _log("fasteer selftest: no CUDA device here; the self-test checks the GPU kernels "
             "(cuda, triton) and needs one. Nothing to do. (The CPU paths are covered by the "
             "test suite: bash tests/run.sh)")
        return 0

    from ..ops import backend_status
    from .kernels import check_steer_norm

    env = _environment()
    _log(f"fasteer selftest on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    status = backend_status()
    backends = [b for b in ("cuda", "triton") if status[b][0]]
    for b in ("cuda", "triton"):
        if not status[b][0]:
            _log(f"  {b}: unavailable ({status[b][1]})")
    report = {"environment": env, "checks": {}, "bench": None}
    failed = 0
    t0 = time.time()

    sizes = [(1, 1), (1, 7), (3, 33), (7, 4099), (64, 4096), (1, 8192), (5, 8192), (4096, 4096)]
    if args.quick:
        sizes = [(1, 7), (7, 4099), (64, 4096), (1, 8192)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    _log(f"[1] steer+norm kernels vs reference vs float64: backends {backends}, sizes {sizes}")
    recs = check_steer_norm(backends, "cuda", sizes, dtypes, _log)
    bad = [r for r in recs if not r["ok"]]
    failed += len(bad)
    report["checks"]["steer_norm"] = recs
    _log(f"    {len(recs) - len(bad)}/{len(recs)} ok")

    try:
        from .sae import check_sae  # the fused SAE kernels, where built
    except ImportError:
        check_sae = None
    if check_sae is not None:
        _log("[2] SAE kernels vs reference")
        recs = check_sae(backends, "cuda", _log, quick=args.quick)
        bad = [r for r in recs if not r["ok"]]
        failed += len(bad)
        report["checks"]["sae"] = recs
        _log(f"    {len(recs) - len(bad)}/{len(recs)} ok")

    try:
        from .model import check_model
    except ImportError:
        check_model = None
    if check_model is not None:
        _log("[3] patched model: eager vs reference, torch.compile(fullgraph=True), CUDA graph")
        try:
            recs = check_model(_log)
        except Exception as exc:  # noqa: BLE001
            recs = [{"check": "model", "ok": False, "error": traceback.format_exc()}]
            _log(f"    FAIL {exc}")
        bad = [r for r in recs if not r["ok"]]
        failed += len(bad)
        report["checks"]["model"] = recs
        _log(f"    {len(recs) - len(bad)}/{len(recs)} ok")

    if not args.skip_bench:
        from .bench import bench_steer_norm
        _log("[4] kernel benchmark (bf16, D=4096)")
        report["bench"] = bench_steer_norm(backends)
        if "triton" in backends:
            from .bench import copy_bandwidth
            from .sae import bench_sae
            copy = copy_bandwidth()
            report["bench_sae"] = [dict(r, fraction_of_copy=r["weight_gbps"] / copy)
                                   for r in bench_sae("triton")]
            for r in report["bench_sae"]:
                _log(f"    sae_replace act {r['activation']} D={r['d']} F={r['d_sae']} 1 row: "
                     f"{r['us']:.1f} µs, weights {r['weight_gbps']:.0f} GB/s "
                     f"({100 * r['fraction_of_copy']:.0f}% of copy)")
        for r in report["bench"]:
            g = r["graph_us"]
            g = f"{g:8.2f}" if isinstance(g, float) else str(g)
            _log(f"    {r['backend']:<6} rows {r['rows']:>5} {'add ' if r['steered'] else 'norm'}"
                 f"  eager {r['eager_us']:8.2f} µs  graph {g} µs  {r['gbps']:7.1f} GB/s"
                 f"  ({100 * r['fraction_of_copy']:.0f}% of copy)")

    report["failed"] = failed
    report["seconds"] = time.time() - t0
    out_dir = Path(args.out) if args.out else _default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"selftest_{(env['device'] or 'cpu').replace(' ', '_')}_{env['date'][:10]}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(_summary(report))
    _log(f"wrote {out_dir / stem}.json and .md; {failed} failure(s)")
    return 1 if failed else 0


def _default_out() -> Path:
    here = Path.cwd() / "benchmarks" / "results"
    return here if here.parent.is_dir() else Path.cwd()


def _summary(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fasteer self-test — {env['device']}", "",
             f"{env['date']} · torch {env['torch']} (CUDA {env['cuda_runtime']}) · triton "
             f"{env['triton']} · transformers {env['transformers']} · fasteer {env['fasteer']}", "",
             "Command: `python -m fasteer.selftest`", ""]
    for name, recs in report["checks"].items():
        ok = sum(r["ok"] for r in recs)
        lines.append(f"- {name}: {ok}/{len(recs)} checks ok")
        for r in recs:
            if not r["ok"]:
                lines.append(f"  - FAIL: {json.dumps(r, default=str)[:400]}")
    if report["bench"]:
        lines += ["", "| backend | rows | edit | eager µs | graph µs | GB/s | % of copy |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["bench"]:
            g = r["graph_us"]
            lines.append(f"| {r['backend']} | {r['rows']} | {'add' if r['steered'] else 'none'} | "
                         f"{r['eager_us']:.2f} | {g if not isinstance(g, float) else f'{g:.2f}'} | "
                         f"{r['gbps']:.0f} | {100 * r['fraction_of_copy']:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
