"""Microbenchmark of the fused steer+norm op on the CPU.

Compares, per (rows, D): HF's own LlamaRMSNorm module (the unsteered baseline), the
`reference` backend and the fused `cpu` backend, each both unsteered (empty tables:
a plain norm) and steered (one Add per row). Decode sizes (1-8 rows) are
launch/overhead-bound; prefill sizes (512-4096 rows) are bandwidth-bound, so achieved
GB/s (read h, write h when steered, write out) is printed for the fused op.

    python benchmarks/bench_ops.py            # full table (about 2 minutes here)
    python benchmarks/bench_ops.py --quick    # a few sizes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info, machine_line, markdown_table, write_results  # noqa: E402

import fasteer.ops as ops  # noqa: E402
from fasteer.ops import layout as L  # noqa: E402


def tables(d: int, steered: bool):
    if not steered:
        return (torch.zeros(0, 0, 4, dtype=torch.int32), torch.zeros(0, 0, 8), torch.zeros(0, d))
    meta = torch.tensor([[[L.ADD, 0, -1, -1]]], dtype=torch.int32)
    params = torch.zeros(1, 1, 8)
    params[0, 0, 0] = 0.5
    return meta, params, torch.randn(1, d)


def bench_size(rows: int, d: int, dtype, rounds: int):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    h = torch.randn(rows, d, dtype=dtype)
    out = torch.empty_like(h)
    norm = LlamaRMSNorm(d).to(dtype)
    weight = norm.weight.detach()
    slot = torch.zeros(rows, dtype=torch.int32)
    gate = torch.ones(rows, dtype=torch.uint8)
    plain, steer = tables(d, False), tables(d, True)

    def fused(backend, tabs):
        def fn():
            ops._steer_norm_fast_(h, out, slot, gate, *tabs, weight, backend=backend)
        return fn

    def hf():
        norm(h)

    def hf_steered():  # what a forward hook + HF norm would do
        norm(h + 0.5 * steer[2][0].to(dtype))

    cands = {
        "hf_norm": hf,
        "hf_hook_add+norm": hf_steered,
        "reference_plain": fused("reference", plain),
        "reference_add": fused("reference", steer),
        "cpu_plain": fused("cpu", plain),
        "cpu_add": fused("cpu", steer),
    }
    inner = max(1, int(2e5 // (rows * d)))
    with torch.inference_mode():
        t = interleaved(cands, rounds=rounds, inner=inner)
    elem = h.element_size()
    gbs = (3 * rows * d * elem) / t["cpu_add"] / 1e9
    return t, gbs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows_list = [1, 8, 512, 4096] if not args.quick else [1, 512]
    d_list = [512, 1024, 2048, 4096] if not args.quick else [512, 2048]
    info = machine_info()
    print(machine_line(info))
    header = ["rows", "D", "HF norm µs", "hook+HF µs", "reference add µs", "cpu plain µs",
              "cpu add µs", "cpu add / HF norm", "cpu add / reference", "cpu add GB/s"]
    rows_out, records = [], []
    for rows in rows_list:
        for d in d_list:
            t, gbs = bench_size(rows, d, dtype, args.rounds)
            us = {k: v * 1e6 for k, v in t.items()}
            row = [rows, d, f"{us['hf_norm']:.1f}", f"{us['hf_hook_add+norm']:.1f}",
                   f"{us['reference_add']:.1f}", f"{us['cpu_plain']:.1f}", f"{us['cpu_add']:.1f}",
                   f"{t['cpu_add'] / t['hf_norm']:.2f}×", f"{t['cpu_add'] / t['reference_add']:.2f}×",
                   f"{gbs:.1f}"]
            print(" | ".join(str(c) for c in row), flush=True)
            rows_out.append(row)
            records.append({"rows": rows, "d": d, "dtype": args.dtype, "seconds": t, "cpu_add_gbps": gbs})
    md = (f"# steer+norm op, CPU ({args.dtype})\n\n{machine_line(info)}\n\n"
          f"Command: `python benchmarks/bench_ops.py{' --quick' if args.quick else ''}"
          f"{'' if args.dtype == 'float32' else ' --dtype ' + args.dtype}`. Medians of "
          f"{args.rounds} interleaved rounds.\n\n" + markdown_table(header, rows_out))
    print()
    print(md)
    if not args.no_write:
        stem = f"ops_cpu_{args.dtype}" + ("_quick" if args.quick else "")
        paths = write_results(stem, {"machine": info, "results": records}, md)
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
