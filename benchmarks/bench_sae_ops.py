"""Microbenchmark of SAE feature steering on the CPU, one carrier call.

The same edit -- K features of a JumpReLU SAE set, the error term kept -- four ways, per
(rows, D, F):

* ``dense``: what a forward hook does (SAELens style): encode every feature (an
  [R, D] x [D, F] GEMM), edit, decode the change ``(z' - z) @ W_dec`` (a second GEMM);
* ``reference``: the `reference` backend of the full SAE replace op (the same dense math);
* ``cpu_replace``: `SAEReplace`'s op on the `cpu` backend, which encodes only the K edited
  features when the error term is kept on a non-TopK SAE;
* ``cpu_fused``: `FeatureEdit`'s lowering, K JOINT FEATURE edits inside the fused
  steer+norm op (the norm included: it replaces the model's own norm).

Every candidate is checked against the float64 result before it is timed. Decode sizes
(1-8 rows) are overhead-bound; what grows with F is the dense GEMMs.

    python benchmarks/bench_sae_ops.py            # full table (about a minute here)
    python benchmarks/bench_sae_ops.py --quick    # two sizes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info, machine_line, markdown_table, write_results  # noqa: E402

import fasteer as fs  # noqa: E402
import fasteer.ops as ops  # noqa: E402
from fasteer.ops import layout as L  # noqa: E402
from fasteer.plan import LoweringContext, Request, compile_plan  # noqa: E402
from fasteer.sae.carrier import SAEWeights  # noqa: E402

SET_VALUE = 3.0


def random_jumprelu_sae(d: int, f: int, seed: int) -> fs.SAE:
    g = torch.Generator().manual_seed(seed)
    return fs.SAE(torch.randn(d, f, generator=g) / d ** 0.5, torch.randn(f, generator=g) * 0.1,
                  torch.randn(f, d, generator=g) / f ** 0.5, torch.randn(d, generator=g) * 0.1,
                  activation="jumprelu", threshold=torch.rand(f, generator=g) * 0.2, layer=0,
                  site="resid_post")


class _OnePoint:
    """Just enough of `ModelSites` for `compile_plan`: every edit at one stream point."""

    def stream_point(self, layer, site):
        return ("pre", 1)


def fused_tables(sae: fs.SAE, features: list[int]):
    """The steer+norm tables `FeatureEdit` lowers to (K JOINT FEATURE edits)."""
    iv = fs.FeatureEdit(sae, features, "set", SET_VALUE)
    ctx = LoweringContext(n_layers=2, hidden=sae.d_in, model_type="bench")
    plan = compile_plan([Request((iv,), None)], _OnePoint(), ctx)
    t = plan.points[("pre", 1)]
    return t.meta, t.params, t.bank


def bench_size(rows: int, d: int, f: int, k: int, rounds: int):
    sae = random_jumprelu_sae(d, f, seed=d + f)
    features = torch.randperm(f, generator=torch.Generator().manual_seed(1))[:k].tolist()
    h = torch.randn(rows, d, generator=torch.Generator().manual_seed(2)) * 2
    slot = torch.zeros(rows, dtype=torch.int32)
    gate = torch.ones(rows, dtype=torch.uint8)
    w = SAEWeights.full(sae)
    w_enc, b_enc, w_dec, b_dec, threshold = w.on(h.device)
    edit_feat = torch.tensor([features], dtype=torch.int32)
    edit_code = torch.full((1, k), L.FEAT_SET, dtype=torch.int32)
    edit_val = torch.zeros(1, k, 2)
    edit_val[..., 0] = SET_VALUE
    keep = torch.ones(1, dtype=torch.uint8)
    meta, params, bank = fused_tables(sae, features)
    weight = torch.ones(d)
    idx = torch.tensor(features)
    work = h.clone()
    out = torch.empty_like(h)

    def dense():  # out of place, as a hook returning the new output
        z = sae.encode(h)
        z_new = z.clone()
        z_new[:, idx] = SET_VALUE
        return h + (z_new - z) @ sae.W_dec

    def replace(backend):
        def fn():
            work.copy_(h)
            ops._sae_replace_fast_(work, slot, gate, w_enc, b_enc, w_dec, b_dec, threshold,
                                   edit_feat, edit_code, edit_val, keep, activation=w.activation,
                                   apply_b_dec_to_input=w.apply_b_dec, backend=backend)
        return fn

    def fused():
        work.copy_(h)
        ops._steer_norm_fast_(work, out, slot, gate, meta, params, bank, weight, backend="cpu")

    # checked before timing: every candidate's edited rows equal the float64 result
    s64 = sae.to(dtype=torch.float64)
    z64 = s64.encode(h.double())
    z64_new = z64.clone()
    z64_new[:, idx] = SET_VALUE
    want = h.double() + (z64_new - z64) @ s64.W_dec
    results = {}
    for name, fn in (("reference", replace("reference")), ("cpu_replace", replace("cpu")),
                     ("cpu_fused", fused)):
        fn()
        results[name] = work.clone()
    results["dense"] = dense()
    for name, got in results.items():
        err = float((got.double() - want).abs().max())
        if err > 1e-4 * (float(want.abs().max()) + 1):
            raise AssertionError(f"{name}: differs from the float64 result by {err:.3g}")
    cands = {"dense": dense, "reference": replace("reference"), "cpu_replace": replace("cpu"),
             "cpu_fused": fused, "copy_only": lambda: work.copy_(h)}
    inner = max(1, int(2e6 // (rows * d * max(k, f // 64))))
    with torch.inference_mode():
        t = interleaved(cands, rounds=rounds, inner=inner)
    # the replace and fused candidates include restoring the rows (copy_only), remove it
    base = t.pop("copy_only")
    for name in ("reference", "cpu_replace", "cpu_fused"):
        t[name] = max(t[name] - base, 0.0)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--features", type=int, default=8, help="K edited features")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    sizes = [(1, 256, 2048), (8, 256, 2048), (1, 2048, 16384), (8, 2048, 16384),
             (1, 4096, 32768)] if not args.quick else [(1, 64, 512), (4, 96, 768)]
    info = machine_info()
    print(machine_line(info))
    header = ["rows", "D", "F", "dense µs", "reference µs", "cpu replace µs", "cpu fused µs",
              "dense / cpu replace", "dense / cpu fused"]
    rows_out, records = [], []
    for rows, d, f in sizes:
        t = bench_size(rows, d, f, args.features, args.rounds)
        us = {name: v * 1e6 for name, v in t.items()}
        row = [rows, d, f, f"{us['dense']:.1f}", f"{us['reference']:.1f}",
               f"{us['cpu_replace']:.1f}", f"{us['cpu_fused']:.1f}",
               f"{t['dense'] / max(t['cpu_replace'], 1e-9):.1f}×",
               f"{t['dense'] / max(t['cpu_fused'], 1e-9):.1f}×"]
        print(" | ".join(str(c) for c in row), flush=True)
        rows_out.append(row)
        records.append({"rows": rows, "d": d, "f": f, "features": args.features, "seconds": t})
    md = (f"# SAE feature steering, one carrier call, CPU (float32, 1 thread)\n\n"
          f"{machine_line(info)}\n\nCommand: `python benchmarks/bench_sae_ops.py"
          f"{' --quick' if args.quick else ''}`. {args.features} features of a JumpReLU SAE set, "
          f"error term kept; medians of {args.rounds} interleaved rounds; every candidate "
          "checked against float64 first. `dense`: encode all + decode the change (a hook's "
          "work); `reference`: the full SAE op's reference backend; `cpu replace`: "
          "SAEReplace's op on the cpu backend (sparse encode); `cpu fused`: FeatureEdit's JOINT "
          "FEATURE edits inside the fused steer+norm op (norm included).\n\n"
          + markdown_table(header, rows_out))
    print()
    print(md)
    if not args.no_write:
        stem = "sae_ops_cpu" + ("_quick" if args.quick else "")
        paths = write_results(stem, {"machine": info, "results": records}, md)
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
