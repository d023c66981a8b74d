"""Result tables in the docs are generated from the results files (benchmarks/tables.py):
every page is up to date, each renderer reads its file (change a figure in a copy of the
results and the table changes), and unknown or unclosed regions are errors."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("fasteer_bench_tables",
                                                  REPO / "benchmarks" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    for name in ("bench_peers", "common", "eval_table", "run_scaling", "run_fgaa",
                 "run_instructions"):
        sys.modules.pop(name, None)


def test_every_page_is_up_to_date(tables):
    stale = tables.sync(check=True)
    assert not stale, (f"stale generated tables in {[str(p) for p in stale]}: run "
                       "`python benchmarks/tables.py`")


def test_every_table_is_shown_somewhere(tables):
    shown = set()
    for page in tables.pages():
        shown |= {m["name"] for m in tables.REGION.finditer(page.read_text())}
    assert shown == set(tables.RENDERERS)


def test_no_figures_copied_next_to_a_generated_table(tables):
    """The old hand-copied peers table (its 21:56 run) is gone from benchmarks/README.md."""
    text = (REPO / "benchmarks" / "README.md").read_text()
    assert "21:56" not in text and "23:13" in text


def test_renderers_read_the_results(tables, tmp_path, monkeypatch):
    """Each renderer's output follows its results file: a changed figure in a copy of the
    results shows up in the table (and the original's does not)."""
    copy = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", copy)
    monkeypatch.setattr(tables, "RESULTS", copy)

    peers = json.loads((copy / "peers_cpu.json").read_text())
    rec = next(r for r in peers["results"][0]["records"] if r["status"] == "timed")
    rec["decode_ratio"] = 7.77
    (copy / "peers_cpu.json").write_text(json.dumps(peers))
    assert "7.77×" in tables.peers() and "7.77×" not in (REPO / "README.md").read_text()

    decode = json.loads((copy / "decode.json").read_text())
    decode["results"][0]["ratio_fasteer"] = 4.321
    (copy / "decode.json").write_text(json.dumps(decode))
    assert "4.321×" in tables.decode()

    comp = json.loads((copy / "fgaa" / "comparison.json").read_text())
    first = next(iter(comp["concepts"].values()))["methods"]["caa"]
    first["best_alpha"] = 99
    (copy / "fgaa" / "comparison.json").write_text(json.dumps(comp))
    assert "| 99 |" in tables.fgaa()

    scaling = json.loads((copy / "scaling" / "smollm2.json").read_text())
    scaling["date"] = "1999-01-01"
    (copy / "scaling" / "smollm2.json").write_text(json.dumps(scaling))
    assert "1999-01-01" in tables.scaling()


def test_render_page_fills_and_checks_regions(tables):
    cache = {"peers": "NEW TABLE"}
    text = "a\n<!-- table: peers -->\nold\n<!-- /table -->\nb\n"
    assert tables.render_page(text, cache) == "a\n<!-- table: peers -->\nNEW TABLE\n<!-- /table -->\nb\n"
    with pytest.raises(KeyError, match="unknown generated table 'nope'"):
        tables.render_page("<!-- table: nope -->\nx\n<!-- /table -->\n", {})


def test_check_mode_reports_a_stale_page(tables, tmp_path, monkeypatch, capsys):
    page = tmp_path / "README.md"
    page.write_text("<!-- table: decode -->\nstale figures\n<!-- /table -->\n")
    monkeypatch.setattr(tables, "pages", lambda: [page])
    assert tables.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert page.read_text().count("stale figures") == 1          # --check leaves it alone
    assert tables.main([]) == 0
    assert "stale figures" not in page.read_text() and "ms/token" in page.read_text()
