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
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line (an elapsed-time / results-so-far bar on "
                             "stderr, shown only when stderr is a terminal; FASTEER_PROGRESS=1 "
                             "forces it on, FASTEER_PROGRESS=0 off)")


class _Progress:
    """While a benchmark script runs: a bar on stderr with the elapsed time and how many
    result lines the script has printed (the scripts print one per measured case), redrawn
    every second; the script's own output passes through above it."""

    def __init__(self, desc: str):
        import threading

        from tqdm.auto import tqdm
        self.bar = tqdm(desc=desc, unit=" lines", file=sys.stderr, leave=False, total=None)
        self.stdout = sys.stdout
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self):
        while not self.stop.wait(1.0):
            self.bar.refresh()

    def write(self, text):
        with self.bar.external_write_mode(file=self.stdout):
            self.stdout.write(text)
        self.bar.update(text.count("\n"))
        return len(text)

    def flush(self):
        self.stdout.flush()

    def __getattr__(self, name):
        return getattr(self.stdout, name)

    def __enter__(self):
        sys.stdout = self
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        sys.stdout = self.stdout
        self.bar.close()
        return False


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
    from ._common import progress_enabled
    progress = _Progress(f"bench {args.set}") if progress_enabled(args.quiet) else None
    try:
        if progress is None:
            runpy.run_path(str(script), run_name="__main__")
        else:
            with progress:
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
