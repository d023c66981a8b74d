"""Host time of one vLLM carrier call at decode size (1 row), on the CPU.

Where the microseconds of one norm call go when fasteer replaces vLLM's fused
add + RMSNorm: the whole carrier (`fasteer.hosts.vllm.carriers.NormCarrier.forward`), the
carriers' op entry point (`ops._add_steer_norm_fast_`: layout checks + dispatch + kernel),
the bare dispatch to the kernel (`fasteer.ops.steer_norm._run`), and vLLM's own native
formula written in plain torch (`vllm/ir/ops/layernorm.py: fused_add_rms_norm`). No vLLM
needed. Median of ``--repeats`` timings of ``--calls`` calls each, one torch thread.

    python benchmarks/bench_carrier_call.py [--hidden 576] [--rows 1]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """The attributes of vLLM's RMSNorm that the carrier reads."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    from fasteer import ops
    from fasteer.hosts.vllm.carriers import NormCarrier, StepBuffers
    from fasteer.ops import layout as L
    from fasteer.plan import SlotTables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, n = args.hidden, args.rows
    norm = RMSNorm(d)
    tables = SlotTables(d, torch.device("cpu"), 48, 16, 128)
    buffers = StepBuffers.allocate(4096, "cpu")
    carrier = NormCarrier(norm, tables, buffers, None)
    carrier.install()
    x, res = torch.randn(n, d), torch.randn(n, d)
    out, w = torch.empty_like(x), norm.weight.detach()
    slot, gate = buffers.slot[:n], buffers.gate[:n]
    run = importlib.import_module("fasteer.ops.steer_norm")._run

    def native():   # vLLM's fused_add_rms_norm (native), as a plain torch reference point
        h = x.float() + res.float()
        residual = h.to(x.dtype)
        var = h.pow(2).mean(-1, keepdim=True)
        return (h * torch.rsqrt(var + 1e-6)).to(w.dtype) * w, residual

    rows = [
        ("vLLM carrier call (NormCarrier.forward)", lambda: norm(x, res)),
        ("ops._add_steer_norm_fast_ (checks + dispatch + kernel)",
         lambda: ops._add_steer_norm_fast_(res, x, out, slot, gate, tables.meta, tables.params,
                                           tables.bank, w, norm_kind=L.NORM_RMS, eps=1e-6)),
        ("dispatch + kernel only (fasteer.ops.steer_norm._run)",
         lambda: run(res, out, slot, gate, tables.meta, tables.params, tables.bank, w, None,
                     L.NORM_RMS, 1e-6, 0.0, True, "auto", x)),
        ("vLLM's native fused add + RMSNorm, plain torch", native),
    ]
    print(f"one call, {n} row(s), D={d}, float32, 1 torch thread, torch {torch.__version__}")
    for name, fn in rows:
        print(f"  {per_call_us(fn, args.calls, args.repeats):7.1f} us  {name}")


if __name__ == "__main__":
    main()
