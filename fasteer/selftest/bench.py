"""Short kernel benchmark for the self-test: µs per call at decode sizes (eager and
replayed inside a CUDA graph) and achieved bandwidth at prefill sizes, as a fraction
of the measured device-to-device copy bandwidth."""
from __future__ import annotations

import torch

from ..ops import layout as L
from ..ops import _steer_norm_fast_


def _tables(d, device, steered):
    if not steered:
        return (torch.zeros(0, 0, 4, dtype=torch.int32, device=device),
                torch.zeros(0, 0, 8, device=device), torch.zeros(0, d, device=device))
    meta = torch.tensor([[[L.ADD, 0, -1, -1]]], dtype=torch.int32, device=device)
    params = torch.zeros(1, 1, 8, device=device)
    params[0, 0, 0] = 0.5
    return meta, params, torch.randn(1, d, device=device)


def _time_cuda(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # µs


def copy_bandwidth(nbytes=1 << 30):
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    us = _time_cuda(lambda: b.copy_(a), 20)
    return 2 * nbytes / (us * 1e-6) / 1e9  # read + write, GB/s


def bench_steer_norm(backends, d=4096, dtype=torch.bfloat16, decode_rows=(1, 8, 64),
                     prefill_rows=(4096, 16384)):
    device = "cuda"
    copy_gbs = copy_bandwidth()
    weight = torch.ones(d, dtype=dtype, device=device)
    records = []
    for backend in backends:
        for rows in decode_rows + prefill_rows:
            h = torch.randn(rows, d, dtype=dtype, device=device)
            out = torch.empty_like(h)
            slot = torch.zeros(rows, dtype=torch.int32, device=device)
            gate = torch.ones(rows, dtype=torch.uint8, device=device)
            for steered in (False, True):
                tabs = _tables(d, device, steered)

                def call():
                    _steer_norm_fast_(h, out, slot, gate, *tabs, weight, backend=backend)

                eager_us = _time_cuda(call, 200 if rows <= 64 else 50)
                graph_us = None
                try:
                    call()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(20):
                            call()
                    graph_us = _time_cuda(g.replay, 20) / 20
                except Exception as exc:  # noqa: BLE001
                    graph_us = f"capture failed: {type(exc).__name__}: {exc}"
                moved = rows * d * h.element_size() * (3 if steered else 2)
                best = graph_us if isinstance(graph_us, float) else eager_us
                gbs = moved / (best * 1e-6) / 1e9
                records.append(dict(backend=backend, rows=rows, d=d, dtype=str(dtype).split(".")[-1],
                                    steered=steered, eager_us=eager_us, graph_us=graph_us,
                                    gbps=gbs, copy_gbps=copy_gbs, fraction_of_copy=gbs / copy_gbs))
    return records
