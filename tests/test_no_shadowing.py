"""The repository's top-level ``kernels/`` folder must never shadow another package named
``kernels`` (Hugging Face's kernel hub, which transformers >= 5.25 imports), while
``fasteer.kernels`` still imports the Triton kernels -- from the repository root, where the
root is ``sys.path[0]``, and from elsewhere."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, extra_path: Path | None = None):
    env = dict(os.environ, TRITON_INTERPRET="1")
    if extra_path is not None:  # appended: it comes *after* the repository root
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(extra_path)]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_top_level_kernels_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "steer_norm.py").is_file()


def test_any_regular_kernels_package_wins_over_the_folder(tmp_path):
    # A stand-in for PyPI `kernels`, placed *after* the repository root on sys.path.
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'the real kernels'\n")
    res = run_python("""
        import sys, kernels
        assert sys.path[0] == '', sys.path[:2]   # `python -c` from the root: the root is first
        print(kernels.MARKER, kernels.__file__)
    """, cwd=ROOT, extra_path=tmp_path / "site")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("the real kernels"), res.stdout


def test_transformers_imports_and_fasteer_kernels_load_from_the_root():
    pytest.importorskip("transformers")
    res = run_python("""
        import importlib.util, kernels
        hub = importlib.util.find_spec("kernels")
        print("kernels:", getattr(kernels, "__file__", None))
        from transformers import GPT2LMHeadModel, LlamaForCausalLM  # imports transformers.activations
        import fasteer.kernels.steer_norm as sn, fasteer.kernels.sae_fused as sf
        assert hasattr(sn, "steer_norm_kernel") and hasattr(sf, "sae_dense_kernel")
        print("steer_norm:", sn.__file__)
    """, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    kernels_line = res.stdout.splitlines()[0]
    # Either PyPI's kernels (a regular package, with a file) or nothing regular at all:
    # never a module loaded from this repository's folder.
    assert str(ROOT / "kernels") not in kernels_line, kernels_line
    steer_line = res.stdout.splitlines()[1]
    assert steer_line.endswith("steer_norm.py"), steer_line


def test_python_m_fasteer_info_from_the_root():
    res = subprocess.run([sys.executable, "-m", "fasteer", "info"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "backends:" in res.stdout


def test_built_package_carries_the_kernels(tmp_path):
    """A wheel's build step copies kernels/*.py into fasteer/kernels/, where the package
    finds them without the checkout."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                          str(tmp_path / "lib")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    built = tmp_path / "lib" / "fasteer" / "kernels"
    assert sorted(p.name for p in built.glob("*.py")) == ["__init__.py", "sae_fused.py",
                                                           "steer_norm.py"]
    res = run_python(f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]
        sys.path[:0] = [{str(tmp_path / 'lib')!r}]
        import fasteer.kernels as k, fasteer.kernels.steer_norm as sn
        assert list(k.__path__) == [{str(built)!r}], k.__path__
        print(sn.__file__)
    """, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(built / "steer_norm.py")
