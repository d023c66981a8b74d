"""Everyday use of the command line: --help documents every option and its default, bad
arguments are reported before the heavy imports, progress bars go to stderr only when
wanted, and the sweep plot carries labels, n and intervals."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from fasteer.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    commands = _subcommands()
    assert {"demo", "info", "extract", "generate", "sweep", "bench", "eval"} <= set(commands)
    checked = 0
    for name, sp in commands.items():
        text = " ".join(sp.format_help().split())
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"fasteer {name} {flag}: no help"
            default = action.default
            if default is None or default is argparse.SUPPRESS or default is False \
                    or default == []:
                continue
            shown = sp._get_formatter()._expand_help(action)   # the text --help prints
            assert "default" in shown and str(default) in shown, \
                f"fasteer {name} {flag}: default {default!r} not in its help: {shown!r}"
            assert " ".join(shown.split()) in text
            checked += 1
    assert checked >= 25


def test_the_formatter_adds_defaults_it_was_not_told_about():
    p = _subcommands()["generate"]
    text = " ".join(p.format_help().split())
    assert "--alpha-scale {raw,resid}" in text and "(default: raw)" in text
    assert "(default: 32)" in text and "(default: None)" not in text
    assert "(default: False)" not in text


_PROBE = r"""
import contextlib, io, json, sys
from fasteer.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue(), "transformers" in sys.modules])
print(json.dumps(out))
"""


def test_bad_arguments_are_reported_before_transformers_is_imported(tmp_path):
    cases = [
        (["generate", "--vector", "nope.safetensors", "--prompt", "hi"], "no such file"),
        (["sweep", "--alphas", "1,abc", "--out", str(tmp_path / "s.png")], "--alphas"),
        (["sweep", "--layers", "9", "--out", str(tmp_path / "s.png")], "--layers"),
        (["demo", "--layer", "9"], "--layer"),
        (["demo", "--prompts", "0"], "--prompts"),
        (["extract", "--pairs", "nope.jsonl", "--out", "v.safetensors"], "--pairs"),
        (["extract", "--pairs", __file__, "--layers", "7", "--out", "v.safetensors"],
         "--layers"),
        (["eval", "--model", "./no/such/model"], "--model"),
    ]
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([a for a, _ in cases])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for (argv, word), (rc, err, tf) in zip(cases, json.loads(res.stdout.splitlines()[-1])):
        assert rc == 2 and word in err and len(err.strip().splitlines()) == 1, (argv, rc, err)
        assert not tf, f"{argv}: transformers was imported before the argument error"


# ----------------------------------------------------------------------- progress bars
def _tiny_sweep(tmp_path, *extra):
    return main(["sweep", "--alphas=0,2", "--prompts", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "s.png"), *extra])


def test_sweep_progress_on_stderr_only_when_wanted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTEER_PROGRESS", "1")
    assert _tiny_sweep(tmp_path) == 0
    cap = capsys.readouterr()
    # the bar is drawn when it opens (0/4: 4 new tokens); later redraws depend on timing
    # and on whether every row stops early, so only the opening is asserted
    assert "sweep: 2 alphas x 2 prompts" in cap.err and "| 0/4 [" in cap.err, cap.err[-2000:]
    assert "caa" in cap.err                       # the extraction's bar too
    assert "%|" not in cap.out                    # never on stdout
    assert "Loading weights" not in cap.err       # transformers' loading bar is silenced

    for env, extra in (("0", []), ("1", ["--quiet"])):
        monkeypatch.setenv("FASTEER_PROGRESS", env)
        assert _tiny_sweep(tmp_path, *extra) == 0
        cap = capsys.readouterr()
        assert "%|" not in cap.err and "it/s" not in cap.err and "token/s" not in cap.err, \
            (env, extra, cap.err[-2000:])
        assert "Loading weights" not in cap.err
        assert "wrote" in cap.out


def test_progress_defaults_to_whether_stderr_is_a_terminal(monkeypatch):
    from fasteer.commands import _common as C
    monkeypatch.delenv("FASTEER_PROGRESS", raising=False)

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert C.progress_enabled() is True and C.progress_enabled(quiet=True) is False
    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert C.progress_enabled() is False
    monkeypatch.setenv("FASTEER_PROGRESS", "1")
    assert C.progress_enabled() is True
    monkeypatch.setenv("FASTEER_PROGRESS", "off")
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert C.progress_enabled() is False


def test_quiet_weight_loading_restores_transformers_bars():
    from transformers.utils import logging as tf_logging

    from fasteer.commands import _common as C
    tf_logging.enable_progress_bar()
    with C._quiet_weight_loading():
        assert not tf_logging.is_progress_bar_enabled()
    assert tf_logging.is_progress_bar_enabled()


# ----------------------------------------------------------------------- the sweep plot
def test_sweep_figure_has_labels_n_and_intervals():
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    from fasteer.commands.sweep import sweep_figure, sweep_rows
    from fasteer.demo import language, world

    prompts = language.neutral_prompts(5)
    outs = {0.0: ["the cake was delicious .", "it was bland .", "the cafe was cozy .",
                  "he was grumpy and rude .", "we walked ."],
            3.0: ["the cake was delicious .", "it was lovely .", "wonderful wonderful",
                  "the cafe was cozy .", "delicious"]}
    rows = sweep_rows(prompts, outs, [0.0, 3.0])
    for r in rows:                       # the means are the checker's numbers
        ref = world.evaluate(prompts, outs[r["alpha"]])
        assert r["attribute"][0] == pytest.approx(ref["attribute"])
        assert r["grammaticality"][0] == pytest.approx(ref["grammaticality"])
        assert r["n"] == 5
    fig = sweep_figure(rows, "demo model, layers [2]")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "alpha (steering strength)"
    assert "score" in ax.get_ylabel() and "95%" in ax.get_ylabel()
    assert "n = 5 prompts per alpha" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("attribute") for t in legend)
    assert any(t.startswith("grammaticality") for t in legend)
    assert any("0.5" in t and "as many positive as negative" in t for t in legend)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2
    widths = []
    for c in bars:
        line, _, (cols,) = c.lines
        for (x, mean), seg in zip(line.get_xydata(), cols.get_segments()):
            (x0, lo), (x1, hi) = seg
            assert x0 == x1 == x and lo <= mean + 1e-12 and mean <= hi + 1e-12, (lo, mean, hi)
            widths.append(hi - lo)
    assert max(widths) > 0                 # real intervals, not zero-width bars
    import matplotlib.pyplot as plt
    plt.close(fig)
