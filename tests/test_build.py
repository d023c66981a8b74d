"""The build: both modules from one `pip install -e .`, CPU-only with FASTEER_CUDA=0, and
`fasteer info` telling the two apart. Importing fasteer never touches CUDA."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_NVCC = shutil.which("nvcc") is not None


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def cpu_only_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_only")
    env = dict(os.environ, FASTEER_CUDA="0")
    res = run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
               "--build-temp", str(tmp / "temp")], cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, res


def test_cpu_only_build_has_no_cuda_module(cpu_only_build):
    tmp, res = cpu_only_build
    built = sorted(p.name.split(".")[0] for p in (tmp / "lib" / "fasteer").glob("*.so"))
    assert built == ["_C"]
    assert "CPU kernels only (FASTEER_CUDA=0)" in res.stderr


def test_info_reports_cpu_only_build(cpu_only_build):
    tmp, _ = cpu_only_build
    pkg = tmp / "pkg"
    shutil.copytree(ROOT / "fasteer", pkg / "fasteer",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "data"))
    for so in (tmp / "lib" / "fasteer").glob("*.so"):
        shutil.copy(so, pkg / "fasteer")
    # run the copy, not the installed (possibly editable) package
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
            f"sys.path.insert(0, {str(pkg)!r})\n"
            "import fasteer; assert fasteer.__file__.startswith(sys.path[0]), fasteer.__file__\n"
            "from fasteer.cli import main; sys.exit(main(['info']))\n")
    res = run([sys.executable, "-c", code], cwd=tmp)
    assert res.returncode == 0, res.stderr
    cuda_line = next(line for line in res.stdout.splitlines() if line.strip().startswith("cuda"))
    assert "not built (no nvcc at build time)" in cuda_line
    cpu_line = next(line for line in res.stdout.splitlines() if line.strip().startswith("cpu "))
    assert " yes " in cpu_line


@pytest.mark.skipif(not HAVE_NVCC, reason="this machine has no nvcc: the CUDA module is not built")
def test_installed_build_has_cuda_module_with_archs():
    res = run([sys.executable, "-m", "fasteer", "info"])
    assert res.returncode == 0, res.stderr
    cuda_line = next(line for line in res.stdout.splitlines() if line.strip().startswith("cuda"))
    assert "sm_80,89,90" in cuda_line, cuda_line


def test_import_does_not_touch_cuda():
    code = ("import sys, torch, fasteer, fasteer.ops as ops\n"
            "from fasteer.ops import layout as L\n"
            "h = torch.randn(3, 8); out = torch.empty_like(h)\n"
            "e = (torch.full((3,), -1, dtype=torch.int32), torch.ones(3, dtype=torch.uint8),\n"
            "     torch.zeros(0, 0, 4, dtype=torch.int32), torch.zeros(0, 0, 8), torch.zeros(0, 8))\n"
            "ops.steer_norm_(h, out, *e, torch.ones(8))\n"
            "assert 'fasteer._cuda' not in sys.modules, 'fasteer._cuda imported'\n"
            "assert not torch.cuda.is_initialized()\n"
            "print('ok')\n")
    res = run([sys.executable, "-c", code])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
