"""Result tables in the docs, generated from the results files -- never copied by hand.

    python benchmarks/tables.py            # rewrite every generated table in place
    python benchmarks/tables.py --check    # exit 1 (and name them) if any is stale

A generated table sits between two markers in README.md, docs/**/*.md or
benchmarks/README.md::

    <!-- table: peers -->
    ...generated text, with the results file and run it comes from...
    <!-- /table -->

and is the output of ``RENDERERS[name]()``, which reads only files under
benchmarks/results/. Re-running a benchmark rewrites its results; this script then carries
the new figures into every page that shows them (tests/test_result_tables.py fails while a
page is stale). Prose that interprets a table names its run, so a re-run that changes the
story shows up as a stale sentence next to a fresh table in review.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PAGES = ("README.md", "docs/**/*.md", "benchmarks/README.md")
REGION = re.compile(r"(<!-- table: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _rel(path: Path) -> str:
    """How a page names a file: results by their place in the repository."""
    if path == RESULTS or RESULTS in path.parents:
        return str(Path("benchmarks/results") / path.relative_to(RESULTS)).rstrip("/.")
    return str(path.relative_to(REPO)) if REPO in path.parents else str(path)


def peers() -> str:
    """Decode time per token vs the peers: benchmarks/results/peers_cpu.json."""
    from bench_peers import summary_table, target_lines
    from common import machine_line
    path = RESULTS / "peers_cpu.json"
    payload = json.loads(path.read_text())
    peer_line = ", ".join(f"{n} {p['version']}" for n, p in payload["peers"].items() if p["ok"])
    return (f"From `{_rel(path)}` (`{payload['command']}`): "
            f"{machine_line(payload['machine'])} · transformers "
            f"{payload['machine'].get('transformers', '?')}; peers {peer_line}; load average "
            f"before {payload['load_before']}, after {payload['load_after']}. Decode time per "
            "token, × the unsteered model of the same run; every timed method was checked to "
            "change the logits and to match plain-hook steering.\n\n"
            + summary_table(payload["results"]).rstrip("\n") + "\n" + CASES + "\n\nTarget "
            "(reported, not asserted):\n" + "\n".join(target_lines(payload["results"])))


# What the case names of bench_peers.make_case steer (the vectors' norm is the stream's).
CASES = ("Steering: `add_1` Add at the middle layer; `add_all` Add at every layer; "
         "`clamp_all` Clamp at every layer; `features` 8 SAE features edited at 4 layers; "
         "`sae_replace` SAEReplace at one layer; `mixed` 8 different Add configurations "
         "mixed per row in one batch.")


def decode() -> str:
    """Per-token decode latency, fasteer vs hooks: benchmarks/results/decode.json."""
    from common import machine_line, markdown_table
    path = RESULTS / "decode.json"
    payload = json.loads(path.read_text())
    rows = []
    for r in payload["results"]:
        t = r["seconds_per_token"]
        rows.append([f"{r['layers']}×{r['hidden']}", r["batch"], f"{t['unsteered'] * 1e3:.3f}",
                     f"{t['fasteer'] * 1e3:.3f}", f"{t['hooks'] * 1e3:.3f}",
                     f"{r['ratio_fasteer']:.3f}×", f"{r['ratio_hooks']:.3f}×"])
    return (f"From `{_rel(path)}` (`python benchmarks/bench_decode.py`): "
            f"{machine_line(payload['machine'])}.\n\n"
            + markdown_table(["model (layers×D)", "batch", "unsteered ms/token",
                              "fasteer ms/token", "hooks ms/token", "fasteer / unsteered",
                              "hooks / unsteered"], rows).rstrip("\n"))


def eval_caa() -> str:
    """CAA quality per model and concept: benchmarks/results/eval/*.json."""
    from eval_table import table
    return (f"From `{_rel(RESULTS / 'eval')}/*.json` (`bash benchmarks/run_eval.sh`).\n\n"
            + table(RESULTS / "eval"))


def scaling() -> str:
    """Activation scaling, held out: benchmarks/results/scaling/{smollm2,gemma3}.json."""
    from run_scaling import table
    paths = [RESULTS / "scaling" / f"{m}.json" for m in ("smollm2", "gemma3")]
    results = [json.loads(p.read_text()) for p in paths if p.is_file()]
    runs = "; ".join(f"{r['model']}: {r['date']}" for r in results)
    return (f"From `{_rel(RESULTS / 'scaling')}/*.json` (`python benchmarks/run_scaling.py`; "
            f"{runs}).\n\n" + table(results))


def fgaa() -> str:
    """CAA vs the SAE methods: benchmarks/results/fgaa/comparison.json."""
    from run_fgaa import comparison_table
    path = RESULTS / "fgaa" / "comparison.json"
    return (f"From `{_rel(path)}` (`python benchmarks/run_fgaa.py`).\n\n"
            + comparison_table(json.loads(path.read_text())))


def instructions() -> str:
    """Instruction compliance per condition: benchmarks/results/instructions/*.json (the
    first table of report.md)."""
    from run_instructions import report
    lines = report().splitlines()
    start = lines.index("## Compliance per condition (test requests)") + 2
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("n = "))
    meta = json.loads((RESULTS / "instructions" / "run.json").read_text())
    return (f"From `{_rel(RESULTS / 'instructions')}/*.json` (`{meta['command']}`, "
            f"{meta['date']}); {lines[end]}\n\n" + "\n".join(lines[start:end]).strip())


RENDERERS = {"peers": peers, "decode": decode, "eval_caa": eval_caa, "scaling": scaling,
             "fgaa": fgaa, "instructions": instructions}


def pages() -> list[Path]:
    out = []
    for pattern in PAGES:
        out += sorted(REPO.glob(pattern))
    return out


def render_page(text: str, cache: dict[str, str]) -> str:
    """``text`` with every generated region re-rendered (unknown names are an error)."""
    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown generated table {name!r} (known: {sorted(RENDERERS)})")
        if name not in cache:
            cache[name] = RENDERERS[name]()
        return f"{m[1]}{cache[name]}\n{m[4]}"
    return REGION.sub(fill, text)


def sync(check: bool = False) -> list[Path]:
    """Re-render every page; return the pages that changed (``check``: leave them alone)."""
    cache: dict[str, str] = {}
    stale = []
    for page in pages():
        text = page.read_text()
        new = render_page(text, cache)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="only report stale pages (exit code 1 if any)")
    args = ap.parse_args(argv)
    stale = sync(check=args.check)
    for page in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {_rel(page)}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
