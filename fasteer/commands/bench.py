"""`fasteer bench`: the CPU benchmark set of a source checkout (benchmarks/).

Results go to ``--out`` (default: a folder in the user's cache, ``$XDG_CACHE_HOME/fasteer/
bench`` or ``~/.cache/fasteer/bench``), never into the checkout's ``benchmarks/results/``,
which holds the committed figures (run the scripts directly to refresh those)."""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from ..cli import UsageError

SETS = {"ops": "bench_ops.py", "decode": "bench_decode.py", "peers": "bench_peers.py"}


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fasteer" / "bench"


def add_arguments(parser) -> None:
    parser.add_argument("set", nargs="?", default="decode", choices=sorted(SETS),
                        help="which benchmark (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
    parser.add_argument("--out", default=None,
                        help=f"folder for the .json / .md results (default: {default_out()})")


def run(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    script = bench_dir / SETS[args.set]
    if not script.exists():
        raise UsageError(f"benchmarks are part of a source checkout; {script} not found "
                         "(clone the repository and run from it)")
    out = Path(args.out).expanduser() if args.out else default_out()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    argv = [str(script)] + (["--quick"] if args.quick else [])
    if args.set == "peers":
        argv += ["--out", str(out)]
    old_argv, old_env = sys.argv, os.environ.get("FASTEER_BENCH_OUT")
    sys.argv = argv
    os.environ["FASTEER_BENCH_OUT"] = str(out)
    sys.path.insert(0, str(bench_dir))
    print(f"fasteer bench {args.set}: results go to {out}", flush=True)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old_argv
        if old_env is None:
            os.environ.pop("FASTEER_BENCH_OUT", None)
        else:
            os.environ["FASTEER_BENCH_OUT"] = old_env
    return 0
