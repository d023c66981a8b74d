"""Per-token decode latency of a tiny Llama: unsteered vs fasteer vs plain forward hooks.

For each model shape (24 layers D=256, 8 layers D=512) and batch (1, 8), three
candidates decode the same tokens from the same prompt with a KV cache:

* ``unsteered``  -- the model as Hugging Face runs it (never patched);
* ``fasteer``    -- ``fs.patch(model).set(fs.Add(v, alpha))`` at ``resid_post`` of every
  layer: the edit runs inside the next layer's input norm (and the final norm), one
  fused op replacing HF's multi-op RMSNorm;
* ``hooks``      -- a plain forward hook on every decoder layer returning
  ``output + alpha * v`` (alpha * v precomputed: the cheapest honest hook).

Each candidate is its own copy of the model (steering is installed once, outside the
timing). Each call prefills the prompt (untimed) and times ``steps`` decode forwards
(one token per row each); candidates are interleaved round by round in a rotating
order and the figures are medians, with ratios of medians to ``unsteered``. A forward is timed, not
``generate`` (whose own per-step Python would dilute the differences). Before timing,
the fasteer and hook candidates are checked to produce the same logits.

    python benchmarks/bench_decode.py                # about 3 minutes here
    python benchmarks/bench_decode.py --threads 1    # CPU-time clock: for a shared machine
    python benchmarks/bench_decode.py --quick
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, markdown_table, write_results  # noqa: E402

import fasteer as fs  # noqa: E402
from fasteer.ops import dispatch  # noqa: E402

SHAPES = [(24, 256), (8, 512)]
BATCHES = [1, 8]
PROMPT = 16
ALPHA = 4.0


def tiny_llama(n_layers: int, hidden: int):
    import transformers as tf
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=n_layers, num_attention_heads=max(1, hidden // 64),
                            num_key_value_heads=max(1, hidden // 128), vocab_size=1000,
                            max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def _cache_kw(model) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder(model, ids, steps: int, clock=time.perf_counter):
    """A callable: prefill (untimed), decode ``steps`` tokens; returns (seconds, logits)."""
    name = _cache_kw(model)

    def run():
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            logits = []
            t0 = clock()
            for _ in range(steps):
                out = model(input_ids=tok, use_cache=True, **{name: cache})
                tok = out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
            elapsed = clock() - t0
            return elapsed, torch.cat(logits, 1)
    return run


def interleaved_decode(candidates: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median decode seconds per call, candidates run in a rotating order every round
    (the same scheme as `common.interleaved`, timing only the decode part of a call)."""
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(candidates[n]()[0])
    return {n: statistics.median(v) for n, v in samples.items()}


def bench_case(n_layers, hidden, batch, steps, rounds, clock):
    # three copies of one model, so that no candidate pays for switching steering on/off
    base = tiny_llama(n_layers, hidden)
    steered, hooked = copy.deepcopy(base), copy.deepcopy(base)
    ids = torch.randint(1, 1000, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(2)) * 0.1
    delta = ALPHA * v

    st = fs.patch(steered)
    st.set(fs.Add(v, ALPHA, layers=range(n_layers)))
    handles = [layer.register_forward_hook(
        lambda m, a, o: (o[0] + delta,) + tuple(o[1:]) if isinstance(o, tuple) else o + delta)
        for layer in fs.sites.decoder_layers(hooked)]

    candidates = {name: decoder(model, ids, steps, clock) for name, model in
                  (("unsteered", base), ("fasteer", steered), ("hooks", hooked))}
    # same steering both ways (checked once, untimed)
    diff = float((candidates["fasteer"]()[1] - candidates["hooks"]()[1]).abs().max())
    assert diff < 1e-3, f"fasteer and hooks disagree by {diff}"
    med = interleaved_decode(candidates, rounds=rounds, warmup=2)
    st.unpatch()
    for h in handles:
        h.remove()
    per_token = {k: v / steps for k, v in med.items()}
    return per_token, diff


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="wall: perf_counter; cpu: the thread's CPU time (robust on a shared "
                         "machine, valid with one torch thread); auto: cpu iff 1 thread")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock_name = args.clock
    if clock_name == "auto":
        clock_name = "cpu" if torch.get_num_threads() == 1 else "wall"
    if clock_name == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    rounds = args.rounds or (5 if args.quick else 15)
    steps = args.steps or (8 if args.quick else 32)
    info = machine_info()
    info["backend"] = dispatch.resolve(dispatch.requested_backend(None), "cpu", 1)
    info["clock"] = clock_name
    info["load_average_start"] = _load()
    print(machine_line(info), "· fasteer backend", info["backend"], "· clock", clock_name)
    results, rows = [], []
    for n_layers, hidden in SHAPES:
        for batch in BATCHES:
            per_token, diff = bench_case(n_layers, hidden, batch, steps, rounds, clock)
            base = per_token["unsteered"]
            r_fs, r_hk = per_token["fasteer"] / base, per_token["hooks"] / base
            results.append(dict(layers=n_layers, hidden=hidden, batch=batch, steps=steps,
                                rounds=rounds, seconds_per_token=per_token,
                                ratio_fasteer=r_fs, ratio_hooks=r_hk, max_logit_diff=diff))
            rows.append([f"{n_layers}×{hidden}", batch, f"{base * 1e3:.3f}",
                         f"{per_token['fasteer'] * 1e3:.3f}", f"{per_token['hooks'] * 1e3:.3f}",
                         f"{r_fs:.3f}×", f"{r_hk:.3f}×"])
            print(f"L={n_layers:2d} D={hidden} B={batch}: unsteered {base * 1e3:.3f} ms/token, "
                  f"fasteer {r_fs:.3f}x, hooks {r_hk:.3f}x (ratio of medians)")
    header = ["model (layers×D)", "batch", "unsteered ms/token", "fasteer ms/token",
              "hooks ms/token", "fasteer / unsteered", "hooks / unsteered"]
    md = (f"# Decode latency: steering every layer of a tiny Llama\n\n{machine_line(info)} · "
          f"fasteer backend `{info['backend']}`\n\nPer-token latency of a decode forward "
          f"(KV cache, prompt {PROMPT}, {steps} steps per call, median of {rounds} interleaved "
          f"rounds, {clock_name} clock). `fasteer`: `Add` at resid_post of every layer through the fused norm "
          f"carriers; `hooks`: a forward hook per decoder layer.\n\n"
          + markdown_table(header, rows))
    info["load_average_end"] = _load()
    md += (f"\nLoad average (1 min) at start / end: {info['load_average_start']} / "
           f"{info['load_average_end']} (other jobs share this machine; ratios come from "
           "interleaved runs of one process).\n")
    stem = "decode_quick" if args.quick else "decode"
    paths = write_results(stem, {"machine": info, "results": results}, md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
