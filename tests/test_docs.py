"""Every code block of the docs runs: docs/**/*.md and README.md.

The rules (also in docs/index.md, "Contributing to the docs"):

* A ```python block runs. The python blocks of one page run in order, in one shared
  namespace, in a fresh temporary working directory, after ``torch.manual_seed(0)``; each
  page is one test (``test_page[docs/x.md]``), and a failure names the page and the
  markdown line (tracebacks point at the page's own line numbers). Examples use the
  embedded demo model (``from fasteer import demo``), so a page runs anywhere in seconds.
* A ```bash / ```console block: every line starting with ``fasteer `` (after an optional
  ``$ `` prompt and ``NAME=value`` environment assignments; ``\\`` continues a line) runs
  in-process as ``fasteer.cli.main(shlex.split(line)[1:])`` and must exit 0. A line naming
  ``--model NAME`` with a packaged real model (``smollm2``, ``gemma3``) follows the
  real-model rule below; ``--model`` with anything else (a path, a hub id) is an error:
  such a command cannot run here, so show it as a ```text block. Other lines (pip,
  python, curl, ...) are not run: tests/run.sh installs the environment.
* Other fences (json, text, cuda, cpp, no language, ...) are not run.
* Exactly two exemptions, as an HTML comment on the line(s) right before a fence:
  ``<!-- docs-test: gpu -->`` runs the block only when CUDA is available, and
  ``<!-- docs-test: real-model -->`` only when the packaged SmolLM2 is installed
  (``fasteer.models.available()``; with ``FASTEER_REQUIRE_REAL_MODELS=1``, as tests/run.sh
  sets, a missing model fails instead). A skipped block does not stop the page: the
  blocks after it still run, so an unmarked block must not need a marked one. Any other
  ``docs-test`` marker, or a marker not followed by a fence, fails `test_markers`.

Also here: ``mkdocs build --strict`` succeeds (skipped only where mkdocs is not installed;
tests/run.sh installs it), and docs/architectures.md is what scripts/gen_architectures.py
writes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKERS = ("gpu", "real-model")
MARKER_RE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`{]*)")
PYTHON_LANGS = ("python", "py", "python3")
SHELL_LANGS = ("bash", "console", "sh", "shell")
PACKAGED_MODELS = ("smollm2", "gemma3")


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    page: str
    line: int        # 1-based line of the block's first code line
    lang: str
    code: str
    marker: str | None


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown file and the marker errors found on the way."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, errors = [], []
    page = _rel(path)
    marker, marker_line = None, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE_RE.match(line)
        if m is None:
            visible = re.sub(r"(`+).*?\1", "", line)      # markers quoted in code do not count
            found = MARKER_RE.search(visible)
            if found:
                if visible.strip() != found.group(0):
                    errors.append(f"{page}:{i + 1}: a docs-test marker must be alone on its line")
                elif found.group(1) not in MARKERS:
                    errors.append(f"{page}:{i + 1}: unknown marker {found.group(0)!r} "
                                  f"(allowed: {', '.join(MARKERS)})")
                elif marker is not None:
                    errors.append(f"{page}:{i + 1}: two markers before one block")
                else:
                    marker, marker_line = found.group(1), i + 1
            elif "docs-test" in visible:
                errors.append(f"{page}:{i + 1}: malformed docs-test marker: {line.strip()!r}")
            elif line.strip() and marker is not None:
                errors.append(f"{page}:{marker_line}: marker not followed by a code block")
                marker = None
            i += 1
            continue
        indent, fence, lang = len(m.group("indent")), m.group("fence"), m.group("lang").lower()
        close = re.compile(r"^\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not close.match(lines[j]):
            text = lines[j]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            j += 1
        blocks.append(Block(page, i + 2, lang, "\n".join(body) + "\n", marker))
        marker = None
        i = j + 1
    if marker is not None:
        errors.append(f"{page}:{marker_line}: marker not followed by a code block")
    return blocks, errors


# --------------------------------------------------------------------------- requirements

def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _real_model_missing(name: str = "smollm2") -> str | None:
    from fasteer.models import PACKAGED, available
    if available().get(name):
        return None
    return f"packaged model {name} not installed (`{PACKAGED[name].install}`)"


def _unavailable(marker: str | None, model: str = "smollm2") -> str | None:
    """Why a block with this marker cannot run here (None: it runs); fails instead of
    skipping a real-model block under FASTEER_REQUIRE_REAL_MODELS=1."""
    if marker == "gpu":
        return None if _cuda() else "needs CUDA"
    if marker == "real-model":
        why = _real_model_missing(model)
        if why and os.environ.get("FASTEER_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(f"real model required (FASTEER_REQUIRE_REAL_MODELS=1): {why}")
        return why
    return None


# --------------------------------------------------------------------------- shell lines

def shell_commands(block: Block) -> list[tuple[int, dict, list[str]]]:
    """``(line, env, argv)`` of each ``fasteer`` command in a shell block."""
    out, pending, start = [], "", 0
    for k, raw in enumerate(block.code.splitlines()):
        if not pending:
            start = block.line + k
        text = raw.rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        text = text.strip()
        if text.startswith("$ "):
            text = text[2:].lstrip()
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            continue            # not a command line (a heredoc body, output, ...)
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[:1] == ["fasteer"]:
            out.append((start, env, words))
    return out


def _model_of(argv: list[str]) -> str | None:
    for k, word in enumerate(argv):
        if word == "--model" and k + 1 < len(argv):
            return argv[k + 1]
        if word.startswith("--model="):
            return word.partition("=")[2]
    return None


def run_shell(block: Block, monkeypatch, skipped: list[str]) -> int:
    from fasteer.cli import main
    ran = 0
    for line, env, argv in shell_commands(block):
        where = f"{block.page}:{line}"
        bad = [w for w in argv if w in ("|", "||", "&&", ";", ">", ">>", "<", "&")]
        if bad:
            pytest.fail(f"{where}: shell operators {bad} in a fasteer line; one command a line")
        model = _model_of(argv)
        marker = block.marker
        if model not in (None, "demo"):
            if model not in PACKAGED_MODELS:
                pytest.fail(f"{where}: --model {model!r} cannot run in the docs test; use a "
                            f"packaged model ({', '.join(PACKAGED_MODELS)}) or a ```text block")
            marker = "real-model"
        why = _unavailable(marker, model if model in PACKAGED_MODELS else "smollm2")
        if why:
            skipped.append(f"{where} ({why})")
            continue
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            try:
                rc = main(argv[1:])
            except SystemExit as exc:       # argparse errors
                rc = exc.code
        if rc not in (0, None):
            pytest.fail(f"{where}: `{shlex.join(argv)}` exited {rc}")
        ran += 1
    return ran


# --------------------------------------------------------------------------- the tests

PAGES = _pages()


def _has_runnable(path: Path) -> bool:
    blocks, _ = parse(path)
    return any(b.lang in PYTHON_LANGS or (b.lang in SHELL_LANGS and shell_commands(b))
               for b in blocks)


def test_markers():
    """Only the two exemptions exist, each right before a code block."""
    errors = [e for page in PAGES for e in parse(page)[1]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", [p for p in PAGES if _has_runnable(p)], ids=_rel)
def test_page(page: Path, tmp_path, monkeypatch, request):
    import torch
    blocks, errors = parse(page)
    assert not errors, "\n".join(errors)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # one torch thread, as tests/real_models: on a 2-core machine shared with other jobs
    # more threads make these small models several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    skipped: list[str] = []
    ran = 0
    for block in blocks:
        if block.lang in SHELL_LANGS:
            ran += run_shell(block, monkeypatch, skipped)
            continue
        if block.lang not in PYTHON_LANGS:
            continue
        where = f"{block.page}:{block.line}"
        why = _unavailable(block.marker)
        if why:
            skipped.append(f"{where} ({why})")
            continue
        # pad so that tracebacks show the page's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, block.page, "exec")
        start = time.perf_counter()
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(f"the python block at {where} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                import matplotlib.pyplot as plt
                plt.close("all")
        ran += 1
        if os.environ.get("FASTEER_DOCS_TIMES"):
            print(f"{where}: {time.perf_counter() - start:.1f} s")
    if skipped and not ran:
        pytest.skip("; ".join(skipped))
    if skipped:
        warnings.warn(f"{_rel(page)}: ran {ran} blocks, skipped " + "; ".join(skipped))


def test_architectures_page_is_generated():
    spec = importlib.util.spec_from_file_location("gen_architectures",
                                                  ROOT / "scripts" / "gen_architectures.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (DOCS / "architectures.md").read_text() == gen.render(), \
        "docs/architectures.md is stale: run python scripts/gen_architectures.py"


def test_mkdocs_build_strict(tmp_path):
    """The site builds with every warning an error (broken links and anchors, pages
    missing from the nav, docstrings mkdocstrings cannot read)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    log = "\n".join(l for l in (res.stdout + res.stderr).splitlines()
                    if "WARNING" in l or "ERROR" in l or "Aborted" in l)
    assert res.returncode == 0, log or res.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
