"""`fasteer bench`: the CPU benchmark set of a source checkout (benchmarks/)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from ..cli import UsageError

SETS = {"ops": "bench_ops.py", "decode": "bench_decode.py", "peers": "bench_peers.py"}


def add_arguments(parser) -> None:
    parser.add_argument("set", nargs="?", default="decode", choices=sorted(SETS),
                        help="which benchmark (default: decode)")
    parser.add_argument("--quick", action="store_true")


def run(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    script = bench_dir / SETS[args.set]
    if not script.exists():
        raise UsageError(f"benchmarks are part of a source checkout; {script} not found "
                         "(clone the repository and run from it)")
    argv = [str(script)] + (["--quick"] if args.quick else [])
    old = sys.argv
    sys.argv = argv
    sys.path.insert(0, str(bench_dir))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0
