"""The GPU self-test: exits 0 with a clear line without CUDA, and its checking machinery
(run here with the cpu backend on CPU tensors) passes on correct kernels and catches a
broken one."""
from __future__ import annotations

import subprocess
import sys

import torch

from fasteer.selftest.kernels import check_steer_norm


def test_selftest_without_cuda_says_so_and_exits_zero():
    res = subprocess.run([sys.executable, "-m", "fasteer.selftest"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no CUDA device" in res.stdout


def test_kernel_checks_pass_on_cpu_backend():
    recs = check_steer_norm(["cpu"], "cpu", [(1, 7), (5, 33), (3, 257)],
                            [torch.float32, torch.bfloat16, torch.float16], print)
    assert recs and all(r["ok"] for r in recs), [r for r in recs if not r["ok"]][:3]
    assert any(r["misaligned"] for r in recs)


def test_kernel_checks_catch_a_wrong_kernel(monkeypatch):
    import importlib
    op_mod = importlib.import_module("fasteer.ops.steer_norm")  # the module, not the op
    real_lookup = op_mod._backend_impl
    real = real_lookup("cpu")

    def broken(h, out, *args):
        real(h, out, *args)
        h.mul_(1.01)     # a wrong edit on every row

    monkeypatch.setattr(op_mod, "_backend_impl", lambda name: broken if name == "cpu" else real_lookup(name))
    recs = check_steer_norm(["cpu"], "cpu", [(5, 33)], [torch.float32], lambda m: None)
    assert not all(r["ok"] for r in recs)


def test_sae_checks_pass_on_cpu_backend():
    from fasteer.selftest.sae import check_sae
    recs = check_sae(["cpu"], "cpu", print, sizes=[(3, 33, 101), (20, 16, 50)])
    assert len(recs) == 6 and all(r["ok"] for r in recs), recs
