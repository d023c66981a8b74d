"""The GPU set: a Llama-3-8B-shaped model (random weights, bf16) decoding with and without
steering, eager, under `torch.compile` and replayed from CUDA graphs.

Scenarios (ratios always against the unsteered model of the same scenario and mode):
* batch 1 and batch 64: `Add` at all 32 layers, fasteer vs plain forward hooks (what
  steering-vectors, repeng and pyvene do underneath; the peers themselves are compared on
  the CPU set); 8 sparse SAE features at 4 layers (`FeatureEdit`, JumpReLU SAEs 16k wide,
  and 65k at batch 1); `SAEReplace` (full SAE, 16k) at 1 layer;
* batch 256 with K = 256 distinct per-row `Add` configurations (all 32 layers).

Modes:
* ``eager``: prefill + greedy decode on a DynamicCache (as in the CPU set);
* ``graph``: one decode step over a StaticCache captured in a CUDA graph (no compile),
  then replayed (the step advances the cache and feeds back its own argmax token);
* ``compile``: the same step through ``torch.compile`` (inductor, no graphs), and
  ``compile+graph``: the compiled step captured in a CUDA graph. Compiling costs about a
  minute per candidate, so by default only batch 1 runs these.

Before timing, every steered candidate is checked: its logits (first decode step after a
steered prefill, teacher-forced token) move away from the unsteered ones, and fasteer's
match the hooks' to within bf16 rounding (relative to the logits' scale).

Everything runs inside one time budget (``--budget``, default 420 s, for one 10-minute
call with the self-test): a step that would not fit is recorded as skipped, and results
are written after every scenario, so a cut-off run still leaves its figures.

    python benchmarks/bench_gpu.py                 # the GPU set (see benchmarks/run_gpu.sh)
    python benchmarks/bench_gpu.py --tiny --device cpu --modes eager   # a smoke run anywhere

Without CUDA (and no ``--device cpu``) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers as bp  # noqa: E402
from common import machine_info, machine_line, markdown_table  # noqa: E402

NO_GPU_MESSAGE = ("bench_gpu: no CUDA device here. The GPU set needs one (an H100 runs it in one "
                  "10-minute call: bash benchmarks/run_gpu.sh). Nothing to do. The CPU set is "
                  "bash benchmarks/run_cpu.sh.")

# bf16 check: fasteer vs hooks, max |Δlogits| relative to max |logits|. Both round the
# same math differently (fasteer adds in fp32 inside the fused norm, a hook adds in bf16);
# the steering itself moves the logits by far more (CHANGE_MARGIN, checked too).
BF16_MATCH_TOL = 3e-2


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


LLAMA3_8B = Shape(32, 4096, 14336, 32, 8, 128256)
TINY = Shape(4, 128, 344, 4, 2, 1000)


@dataclass(frozen=True)
class Scenario:
    name: str
    batch: int
    prompt: int
    decode: int
    cases: tuple[str, ...]
    mixed_k: int = 0

    def workload(self, s: Shape) -> bp.Workload:
        return bp.Workload(self.name, s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads,
                           s.vocab, self.batch, self.prompt, self.decode, cases=self.cases,
                           mixed_k=self.mixed_k)


SCENARIOS = (
    Scenario("b1", 1, 128, 32, ("add_all", "features", "features_65k", "sae_replace")),
    Scenario("b64", 64, 128, 32, ("add_all", "features", "sae_replace")),
    Scenario("mixed_b256_k256", 256, 64, 16, (), mixed_k=256),
)
TINY_SCENARIOS = (
    Scenario("b1", 1, 16, 6, ("add_all", "features", "sae_replace")),
    Scenario("b4", 4, 16, 6, ("add_all",)),
    Scenario("mixed_b8_k8", 8, 8, 4, (), mixed_k=8),
)

TARGETS_GPU = [
    ("b1", "add_all", "graph", 1.01, "batch 1 decode, Add at all 32 layers, inside a CUDA graph ≤ 1.01×"),
    ("b1", "add_all", "eager", 1.03, "batch 1 decode, Add at all 32 layers, eager ≤ 1.03×"),
    ("mixed_b256_k256", "mixed", "eager", 1.05, "K=256 per-row configs in a batch of 256 ≤ 1.05× (eager)"),
    ("mixed_b256_k256", "mixed", "graph", 1.05, "K=256 per-row configs in a batch of 256 ≤ 1.05× (graph)"),
    ("b1", "features", "graph", 1.02, "8 sparse SAE features at 4 layers (16k SAEs) ≤ 1.02× (graph)"),
    ("b1", "features", "eager", 1.02, "8 sparse SAE features at 4 layers (16k SAEs) ≤ 1.02× (eager)"),
    ("b1", "features_65k", "graph", 1.02, "8 sparse SAE features at 4 layers (65k SAEs) ≤ 1.02× (graph)"),
]


def build_llama(s: Shape, device, dtype, seed: int = 0, max_len: int = 1024):
    """Random-weight Llama of shape ``s`` made directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, vocab_size=s.vocab, rope_theta=500000.0,
                      max_position_embeddings=max_len, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)     # build in bf16: never materialise fp32 weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------- static cache

def static_cache(model, batch: int, max_len: int):
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older transformers
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                           device=p.device, dtype=p.dtype)


def set_cache_length(cache, n: int) -> None:
    """Move a StaticCache's write position to ``n`` (in place: graphs keep the pointer)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(l, "cumulative_length", None), torch.Tensor)
                             for l in layers):
        raise NotImplementedError("graph mode needs a StaticCache whose layers keep a device-side "
                                  "`cumulative_length` (transformers >= 5)")
    with torch.inference_mode():     # made inside inference mode by the prefill
        for l in layers:
            l.cumulative_length.fill_(n)


def decode_context(method, prompt_len: int):
    """Tell fasteer that the following forwards are decode steps after a ``prompt_len``
    prompt (``Steerer.decoding``): outside ``generate`` it would otherwise read the static
    cache's length, a host sync that is not allowed while a CUDA graph is captured."""
    st = getattr(method, "st", None)
    if st is None:
        return contextlib.nullcontext()
    return st.decoding(prompt_len)


def static_fasteer(model, cases) -> bp.Fasteer:
    """fasteer as its docs prescribe for CUDA graphs and torch.compile: carriers at
    ``resid_post`` armed ahead (``always_armed``), with fixed tables big enough for
    every case of the scenario (a plan that does not fit raises instead of reallocating
    under a captured graph)."""
    slots = max([len(c.groups) for c in cases] + [1]) + 1
    edits = 2 * max([len(g.edits) for c in cases for g in c.groups] + [1]) + 2
    return bp.Fasteer(model, always_armed=True, sites=["resid_post"], slots=slots, edits=edits,
                      vectors=2 * slots * edits)


class CapturedDecode:
    """One candidate's decode step over its own StaticCache, for the graph/compile modes.

    The step feeds ``tok`` at the cache's position, advances the cache, and writes its
    argmax back into ``tok``: N replays are N decode steps with no host work between them.
    A graph has the steering baked in, so the method is deactivated after capture; a
    compiled step without a graph runs the live module hooks, so the method stays active
    until `release` (its model must then not be shared with another candidate).
    """

    def __init__(self, model, method, case, ids, max_len, forced_tok, *, compiled: bool,
                 graph: bool, sync):
        self.batch, self.prompt = ids.shape
        self.graph = None
        self.cache = static_cache(model, self.batch, max_len)
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=ids.device)
        self.logits = None
        self.compile_s = None
        self.keepalive = None
        self.method, self.case = method, case
        keep_active = not graph
        if case is not None:
            method.activate(case, self.batch)
        try:
            with torch.inference_mode():
                method.forward(ids, self.cache, None, None)       # prefill (steered), eager
                with decode_context(method, self.prompt):
                    def step():
                        logits = method.forward(self.tok, self.cache, None, None)[:, -1]
                        self.tok.copy_(logits.argmax(-1, keepdim=True))
                        return logits

                    fn = torch.compile(step) if compiled else step
                    self.tok.copy_(forced_tok)
                    t0 = time.perf_counter()
                    self.first_logits = fn().float().clone()   # the check: step 1 after prefill
                    sync()
                    if compiled:
                        self.compile_s = time.perf_counter() - t0
                        if not graph:   # a graph freezes one compiled variant: no guards
                            _settle_compile(fn)
                    if graph:
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            for _ in range(2):
                                set_cache_length(self.cache, self.prompt)
                                fn()
                        torch.cuda.current_stream().wait_stream(side)
                        set_cache_length(self.cache, self.prompt)
                        self.graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(self.graph):
                            self.logits = fn()
                    self.fn = fn
            # what a replay reads (slot tables, hook vectors) must outlive the activation
            self.keepalive = (getattr(method, "st", None), getattr(method, "fns", None))
        finally:
            if case is not None and not keep_active:
                method.deactivate()
        self.active = case is not None and keep_active
        if graph:   # the replayed step equals the eager one it was captured from
            self.tok.copy_(forced_tok)
            set_cache_length(self.cache, self.prompt)
            self.graph.replay()
            sync()
            self.replay_logits = self.logits.float().clone()

    def run(self, n: int, sync) -> tuple[float, float]:
        """n decode steps from the end of the prompt: (0, seconds per step)."""
        set_cache_length(self.cache, self.prompt)
        sync()
        t0 = time.perf_counter()
        if self.graph is not None:
            for _ in range(n):
                self.graph.replay()
        else:
            with torch.inference_mode(), decode_context(self.method, self.prompt):
                for _ in range(n):
                    self.fn()
        sync()
        return 0.0, (time.perf_counter() - t0) / n

    def release(self):
        if getattr(self, "active", False):
            self.method.deactivate()
            self.active = False
        self.graph = None
        self.cache = None
        self.keepalive = None


# --------------------------------------------------------------------------- checks

def logits_check(a: torch.Tensor, base: torch.Tensor, ref: torch.Tensor | None, tol: float) -> dict:
    """``a`` must move away from ``base`` (else it is not timed: a no-op) and should match
    ``ref`` (the hooks) relative to its scale. A mismatch is reported with the timing
    rather than dropping it: one GPU run is precious, and in bf16 the two round the same
    math differently; the fp32 CPU set is where equality is enforced."""
    a, base = a.float(), base.float()
    scale = base.abs().max().clamp_min(1e-30)
    rec = {"change_vs_unsteered": float((a - base).abs().max() / scale)}
    if ref is not None:
        ref = ref.float()
        rec["rel_diff_vs_hooks"] = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    rec["changes_output"] = rec["change_vs_unsteered"] > bp.CHANGE_MARGIN
    rec["matches_hooks"] = ref is None or rec["rel_diff_vs_hooks"] <= tol
    rec["ok"] = rec["changes_output"]
    if not rec["changes_output"]:
        rec["error"] = f"logits moved by only {rec['change_vs_unsteered']:.2e} from unsteered"
    if not rec["matches_hooks"]:
        rec["warning"] = f"differs from the hooks by {rec['rel_diff_vs_hooks']:.2e} (relative; tol {tol})"
    return rec


# --------------------------------------------------------------------------- scenarios

class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


def _methods(models):
    """unsteered and hooks share the plain model; fasteer has its own copy, patched once
    (so its tables, and every graph captured over them, stay put while it is measured)."""
    plain, patched = models
    return {"unsteered": bp.Unsteered(plain), "hooks": bp.Hooks(plain),
            "fasteer": bp.Fasteer(patched, persistent=True)}


def _tol(model) -> float:
    return bp.MATCH_TOL if next(model.parameters()).dtype == torch.float32 else BF16_MATCH_TOL


def run_eager(methods, sc: Scenario, cases, ids, forced, rounds, sync, budget, log):
    rec_out = []
    base = bp.session(methods["unsteered"], ids, forced.shape[1], sync, forced=forced)[2]
    base = torch.stack([x.float() for x in base])
    candidates = {"unsteered": lambda warmup=False: bp.session(
        methods["unsteered"], ids, 2 if warmup else sc.decode, sync)}
    tol = _tol(methods["unsteered"].model)
    for case in cases:
        logits = {}
        for name in ("hooks", "fasteer"):
            rec = {"case": case.name, "case_label": case.label, "method": name, "mode": "eager"}
            rec_out.append(rec)
            try:
                lg = bp.run_case(methods[name], case, ids, forced.shape[1], sync, forced=forced)[2]
                logits[name] = torch.stack([x.float() for x in lg])
                chk = logits_check(logits[name], base, logits.get("hooks") if name == "fasteer" else None,
                                   tol)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                chk = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400],
                       "traceback": traceback.format_exc()[-2000:]}
            rec["check"] = chk
            if not chk["ok"]:
                rec.update(status="failed check", reason=chk["error"])
                log(f"    eager {case.name} {name}: FAILED CHECK {chk['error']}")
                continue
            rec["status"] = "timed"
            candidates[f"{case.name}/{name}"] = (
                lambda warmup=False, m=methods[name], c=case: bp.run_case(
                    m, c, ids, 2 if warmup else sc.decode, sync))
    rounds = _rounds_for(budget, rounds)
    times = bp.interleaved_sessions(candidates, rounds, warmup=1, budget_s=max(budget.left() * 0.25, 1))
    return _finish(rec_out, times, "eager")


def run_static(methods, sc: Scenario, cases, ids, forced, rounds, sync, budget, log, *,
               compiled: bool, graph: bool, max_len: int):
    """Graph / compile modes, one case at a time: a fasteer graph reads the live slot
    tables, so each case is captured and timed (interleaved with the unsteered step and
    the hooks' step of the same case) before the next case changes them."""
    mode = ("compile+graph" if graph else "compile") if compiled else "graph"
    forced_tok = forced[:, :1]
    tol = _tol(methods["unsteered"].model)
    shared, methods = methods, dict(methods)
    if not graph:
        # compiled, no graph: the hooks stay registered while timed, so they get their own
        # copy of the weights (the unsteered step must not run them)
        methods["hooks"] = bp.Hooks(copy.deepcopy(methods["unsteered"].model))
    eager_fasteer = methods["fasteer"]
    eager_fasteer.close()
    methods["fasteer"] = static_fasteer(eager_fasteer.model, cases)
    try:
        return _run_static(methods, sc, cases, ids, forced, rounds, sync, budget, log, mode=mode,
                           compiled=compiled, graph=graph, max_len=max_len, tol=tol,
                           forced_tok=forced_tok)
    finally:
        methods["fasteer"].close()
        shared["fasteer"] = bp.Fasteer(eager_fasteer.model)    # patched as eager mode uses it


def _run_static(methods, sc, cases, ids, forced, rounds, sync, budget, log, *, mode, compiled,
                graph, max_len, tol, forced_tok):

    def capture(name, case):
        model = methods[name].model
        return CapturedDecode(model, methods[name], case, ids, max_len, forced_tok,
                              compiled=compiled, graph=graph, sync=sync)

    try:
        t0 = time.time()
        unsteered = capture("unsteered", None)
        log(f"    {mode}: unsteered ready ({time.time() - t0:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        err = f"{type(exc).__name__}: {exc}"[:600]
        log(f"    {mode}: unsteered capture/compile failed: {err}")
        return [{"case": "-", "method": "unsteered", "mode": mode, "status": "failed",
                 "reason": err, "traceback": traceback.format_exc()[-2000:]}], None
    base = unsteered.replay_logits if graph else unsteered.first_logits
    rec_out, base_runs = [], []
    for case in cases:
        captured = {"unsteered": unsteered}
        ref = None
        for name in ("hooks", "fasteer"):
            rec = {"case": case.name, "case_label": case.label, "method": name, "mode": mode}
            rec_out.append(rec)
            if budget.left() < 30 + (75 if compiled else 5):
                rec.update(status="skipped", reason="time budget")
                continue
            cd = None
            try:
                t0 = time.time()
                cd = capture(name, case)
                rec["setup_s"] = time.time() - t0
                if cd.compile_s is not None:
                    rec["compile_s"] = cd.compile_s
                out = cd.replay_logits if graph else cd.first_logits
                chk = logits_check(out, base, ref if name == "fasteer" else None, tol)
                if graph:
                    chk["replay_vs_eager_step"] = float(
                        (cd.replay_logits - cd.first_logits).abs().max()
                        / cd.first_logits.abs().max().clamp_min(1e-30))
                if name == "hooks":
                    ref = out
            except Exception as exc:  # noqa: BLE001
                chk = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600],
                       "traceback": traceback.format_exc()[-2000:]}
            rec["check"] = chk
            if not chk["ok"]:
                rec.update(status="failed check" if cd is not None else "failed", reason=chk["error"])
                log(f"    {mode} {case.name} {name}: {rec['status'].upper()} {chk['error']}")
                if cd is not None:
                    cd.release()
                continue
            rec["status"] = "timed"
            captured[name] = cd
            log(f"    {mode}: {case.name}/{name} ready ({rec['setup_s']:.0f} s)")
        if len(captured) > 1:
            recompiled = {k: 0 for k in captured}

            def candidate(k, cd):
                def fn(warmup=False):
                    before = _compiled_graphs()
                    out = cd.run(2 if warmup else sc.decode, sync)
                    if not warmup:
                        recompiled[k] += _compiled_graphs() - before
                    return out
                return fn

            candidates = {k: candidate(k, cd) for k, cd in captured.items()}
            share = max(budget.left() * 0.15 / max(len(cases), 1), 1)
            times = bp.interleaved_sessions(candidates, _rounds_for(budget, rounds), warmup=1,
                                            budget_s=share)
            b = times["unsteered"]
            base_runs.append(b["decode_s"])
            for rec in rec_out:
                if rec["case"] == case.name and rec.get("status") == "timed" and rec["method"] in times:
                    t = times[rec["method"]]
                    rec.update(decode_s=t["decode_s"], decode_ratio=t["decode_s"] / b["decode_s"],
                               rounds=t["rounds"], unsteered_decode_s=b["decode_s"])
                    if compiled:   # >0: its step recompiled while timed (guards failed)
                        rec["graphs_compiled_while_timing"] = recompiled[rec["method"]]
        for name, cd in captured.items():
            if name != "unsteered":
                cd.release()
    unsteered.release()
    summary = {"decode_s": (sorted(base_runs)[len(base_runs) // 2] if base_runs else None),
               "prefill_s": None, "compile_s": unsteered.compile_s,
               "note": "each case's ratio uses the unsteered median of its own interleaved run"}
    return rec_out, summary


def _settle_compile(fn, tries: int = 3) -> None:
    """Call a freshly compiled step until a call compiles nothing new; a step that
    recompiles on every call (a guard on something that changes per step) is not timed:
    each recompile of the 8B model costs tens of seconds and the cache limit then drops
    it to eager, so its timing would mean nothing."""
    seen = _compiled_graphs()
    for _ in range(tries):
        fn()
        now = _compiled_graphs()
        if now == seen:
            return
        seen = now
    raise RuntimeError(f"torch.compile recompiled the decode step on each of {tries} "
                       "consecutive steps (run with TORCH_LOGS=recompiles to see the guard)")


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


def _rounds_for(budget: Budget, rounds: int) -> int:
    return rounds if budget.left() > 60 else max(2, rounds // 3)


def _finish(records, times, mode):
    base = times["unsteered"]
    for rec in records:
        key = f"{rec['case']}/{rec['method']}"
        if key in times and rec.get("status") == "timed":
            t = times[key]
            rec.update(decode_s=t["decode_s"], decode_ratio=t["decode_s"] / base["decode_s"],
                       rounds=t["rounds"])
            if mode == "eager":
                rec.update(prefill_s=t["prefill_s"], prefill_ratio=t["prefill_s"] / base["prefill_s"])
    return records, {"decode_s": base["decode_s"], "prefill_s": base["prefill_s"] if mode == "eager" else None,
                     "rounds": base["rounds"]}


# --------------------------------------------------------------------------- report

def render(payload: dict) -> str:
    info = payload["machine"]
    lines = [f"# GPU set: {payload['model']}\n",
             machine_line(info) + f" · transformers {info.get('transformers', '?')}"
             + (f" · CUDA {info.get('cuda')}" if info.get("cuda") else "") + "\n",
             f"Command: `{payload['command']}` ({payload['seconds']:.0f} s)\n",
             "Decode = one step of one new token per row: eager on a DynamicCache; graph / compile "
             "on a StaticCache (the step replayed from a CUDA graph, or called through "
             "torch.compile). Ratios: medians over the unsteered median of the same scenario, "
             "mode and interleaved run. Check: logits of the first decode step after a steered "
             f"prefill must move from the unsteered ones by > {bp.CHANGE_MARGIN} (relative; else "
             f"not timed), and fasteer's should be within {BF16_MATCH_TOL} (relative, bf16; "
             f"{bp.MATCH_TOL} in fp32) of the hooks' (MISMATCH marks a miss).\n",
             "Targets (reported, not asserted):\n"]
    lines += target_lines(payload) + [""]
    for sc in payload["scenarios"]:
        lines.append(f"## {sc['name']}: batch {sc['batch']}, prompt {sc['prompt']}, decode {sc['decode']}\n")
        if sc.get("skipped"):
            lines.append(f"skipped: {sc['skipped']}\n")
        header = ["mode", "steering", "method", "decode ms/step", "× unsteered", "prefill ms",
                  "prefill ×", "check / note"]
        rows = []
        for mode, res in sc["modes"].items():
            base = res.get("unsteered")
            if base and base.get("decode_s") is not None:
                rows.append([mode, "none", "unsteered", f"{base['decode_s'] * 1e3:.3f}", "1.000×",
                             "" if base.get("prefill_s") is None else f"{base['prefill_s'] * 1e3:.2f}",
                             "", "" if base.get("compile_s") is None else f"compile {base['compile_s']:.0f} s"])
            for r in res["records"]:
                chk = r.get("check", {})
                note = ""
                if "change_vs_unsteered" in chk:
                    note = f"Δ {chk['change_vs_unsteered']:.2f}"
                    if "rel_diff_vs_hooks" in chk:
                        note += f", vs hooks {chk['rel_diff_vs_hooks']:.1e}"
                    if chk.get("matches_hooks") is False:
                        note += " MISMATCH"
                if r.get("compile_s"):
                    note += f"; compile {r['compile_s']:.0f} s"
                if r.get("graphs_compiled_while_timing"):
                    note += f"; {r['graphs_compiled_while_timing']} recompiles while timed"
                if r.get("status") == "timed":
                    rows.append([mode, r["case"], r["method"], f"{r['decode_s'] * 1e3:.3f}",
                                 f"{r['decode_ratio']:.3f}×",
                                 f"{r['prefill_s'] * 1e3:.2f}" if "prefill_s" in r else "",
                                 f"{r['prefill_ratio']:.3f}×" if "prefill_ratio" in r else "", note])
                else:
                    rows.append([mode, r["case"], r["method"], "—", r.get("status", "?"), "", "",
                                 (note + "; " if note else "") + str(r.get("reason", ""))[:200]])
        lines.append(markdown_table(header, rows))
    if payload.get("notes"):
        lines += ["Notes:", *[f"- {n}" for n in payload["notes"]], ""]
    return "\n".join(lines)


def target_lines(payload: dict) -> list[str]:
    out = []
    for scen, case, mode, bar, text in TARGETS_GPU:
        val = None
        for sc in payload["scenarios"]:
            if sc["name"] != scen or mode not in sc["modes"]:
                continue
            for r in sc["modes"][mode]["records"]:
                if r["case"] == case and r["method"] == "fasteer" and r.get("status") == "timed":
                    val = r["decode_ratio"]
        out.append(f"- {text}: " + ("not measured" if val is None else
                                    f"{'met' if val <= bar else 'NOT met'} — {val:.3f}×"))
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs only)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and small scenarios (smoke run)")
    p.add_argument("--modes", default="eager,graph,compile,compile+graph")
    p.add_argument("--compile-scenarios", default="b1",
                   help="scenarios that also run compile modes (compiling costs ~1 min per candidate)")
    p.add_argument("--scenarios", default=None, help="comma-separated names (default: all)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, flush=True)
        return 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)    # smoke runs: steady on a shared machine
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else LLAMA3_8B
    scenarios = TINY_SCENARIOS if args.tiny else SCENARIOS
    if args.scenarios:
        scenarios = tuple(s for s in scenarios if s.name in args.scenarios.split(","))
    modes = [m for m in args.modes.split(",") if m]
    if not cuda:
        modes = [m for m in modes if "graph" not in m]
    budget = Budget(args.budget)
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    stem = "gpu_" + ("tiny_" if args.tiny else "") + (torch.cuda.get_device_name(0).replace(" ", "_")
                                                       if cuda else "cpu")
    try:
        from torch import _dynamo
        for name, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                            ("accumulated_cache_size_limit", 512),
                            ("accumulated_recompile_limit", 512)):
            if hasattr(_dynamo.config, name):   # one entry per candidate and batch
                setattr(_dynamo.config, name, value)
    except Exception:  # noqa: BLE001
        pass

    info = machine_info()
    if cuda:
        info["cuda"] = torch.version.cuda
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(machine_line(info))
    t0 = time.time()
    model = build_llama(shape, device, dtype)
    patched_copy = copy.deepcopy(model)       # fasteer's own copy (see _methods)
    methods = _methods((model, patched_copy))
    log(f"model {shape} in {dtype} on {device}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
        f"parameters, built (and copied) in {time.time() - t0:.0f} s")
    command = os.environ.get("FASTEER_BENCH_COMMAND",
                             "python benchmarks/bench_gpu.py" + (" " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv)).rstrip())
    payload = {"set": "GPU", "model": f"Llama-3-8B-shaped random weights ({args.dtype})" if not args.tiny
               else f"tiny Llama {shape} ({args.dtype})", "shape": shape.__dict__, "machine": info,
               "command": command, "scenarios": [], "notes": [], "seconds": 0.0}

    # Priority order under the budget: eager and graph for every scenario first, then the
    # compile modes (about a minute of compiling per candidate) for --compile-scenarios.
    plan = [(sc, m) for m in modes if not m.startswith("compile") for sc in scenarios]
    plan += [(sc, m) for m in modes if m.startswith("compile") for sc in scenarios
             if sc.name in args.compile_scenarios.split(",")]
    prepared = {}
    for sc in scenarios:
        payload["scenarios"].append({"name": sc.name, "batch": sc.batch, "prompt": sc.prompt,
                                     "decode": sc.decode, "modes": {}})
    entries = {e["name"]: e for e in payload["scenarios"]}
    for sc, mode in plan:
        entry = entries[sc.name]
        compiled = mode.startswith("compile")
        if budget.left() < (120 if compiled else 30):
            entry["modes"][mode] = {"records": [], "skipped": "time budget"}
            log(f"[{sc.name}] {mode}: skipped (time budget)")
            continue
        log(f"[{sc.name}] batch {sc.batch}, prompt {sc.prompt}, decode {sc.decode}: {mode} "
            f"({budget.left():.0f} s left)")
        if sc.name not in prepared:
            w = sc.workload(shape)
            g = torch.Generator().manual_seed(7)
            ids = torch.randint(1, shape.vocab, (sc.batch, sc.prompt), generator=g).to(device)
            forced = torch.randint(1, shape.vocab, (sc.batch, 2), generator=g).to(device)
            scale = bp.stream_scale(model, ids[:1])
            cases, missing = bp.cases_for(w, scale, model)
            if missing:
                entry["unavailable_cases"] = missing
                for n, why in missing.items():
                    log(f"  case {n}: not run ({why})")
            prepared[sc.name] = (ids, forced, cases)
        ids, forced, cases = prepared[sc.name]
        max_len = 1 << math.ceil(math.log2(sc.prompt + sc.decode + 8))
        try:
            if mode == "eager":
                recs, base = run_eager(methods, sc, cases, ids, forced, args.rounds, sync, budget, log)
            else:
                recs, base = run_static(methods, sc, cases, ids, forced, args.rounds, sync, budget, log,
                                        compiled=compiled, graph="graph" in mode, max_len=max_len)
        except Exception as exc:  # noqa: BLE001 - keep going: the other modes still count
            recs, base = [{"case": "-", "method": "-", "status": "failed",
                           "reason": f"{type(exc).__name__}: {exc}"[:600],
                           "traceback": traceback.format_exc()[-2000:]}], None
            log(f"  {mode}: FAILED {exc}")
        entry["modes"][mode] = {"records": recs, "unsteered": base}
        for r in recs:
            if r.get("status") == "timed":
                log(f"    {mode:>13} {r['case']:>9} {r['method']:<8} decode {r['decode_s'] * 1e3:8.3f} ms "
                    f"({r['decode_ratio']:.3f}×)")
        if base and base.get("decode_s") is not None:
            log(f"    {mode:>13} unsteered decode {base['decode_s'] * 1e3:.3f} ms")
        if cuda:
            torch.cuda.empty_cache()
        payload["seconds"] = time.time() - t0
        if not args.no_write:
            _write(out_dir, stem, payload)
    md = render(payload)
    log("")
    log(md)
    if not args.no_write:
        paths = _write(out_dir, stem, payload)
        log(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _write(out_dir: Path, stem: str, payload: dict):
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    j.write_text(json.dumps(bp._jsonable(payload), indent=2, default=str) + "\n")
    m.write_text(render(payload))
    return j, m


if __name__ == "__main__":
    sys.exit(main())
