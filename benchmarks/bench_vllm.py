"""vLLM throughput (generated tokens/s) on a real model: unsteered vs fasteer vs hooks.

Four configurations of vLLM's offline engine (``LLM.generate``), side by side in one run:

* ``unsteered``    -- vLLM as it ships: the fasteer plugin off (``FASTEER_VLLM_REGISTRY``
  unset), no hooks;
* ``fasteer``      -- the fasteer plugin (`fasteer.hosts.vllm`), every request steered:
  ``{"add": "vec", "alpha": ALPHA}`` with a vector that has a direction at every layer
  (``resid_post``), so the edit runs at every layer inside the fused add + steer + RMSNorm
  carriers;
* ``fasteer-half`` -- the same plugin, half of the requests steered the same way (even
  request indices), the other half unsteered, in the same batch;
* ``hooks``        -- what a forward-hook plugin does (IBM's vLLM-Hook, vllm-lens): the
  fasteer plugin off, a Python forward hook on every vLLM decoder layer adding
  ``alpha * v[l]`` to the layer's output ``residual`` (vLLM decoder layers return
  ``(hidden_states, residual)`` and the stream is their sum, so this adds to the stream,
  = ``resid_post[l]``) for the tokens of steered requests, decided once per engine step
  from the model runner's batch view (`fasteer.hosts.vllm.routing`, with
  ``GPUModelRunner._model_forward`` wrapped as fasteer's plugin does). Every request is
  steered, as in ``fasteer``.

All four run in eager mode (hooks need it; ``enforce_eager=True`` everywhere), greedy,
``ignore_eos`` (every request generates exactly ``--max-tokens`` tokens), no prefix
caching, on the same distinct prompts. A batch of B is B requests handed to one
``generate`` call together; ``max_num_seqs`` is the largest batch, so all B run
concurrently. Throughput = B * max_tokens / the wall time of the call (prefill included).

Each configuration lives in its own worker process holding its ``LLM`` (the plugin and the
hooks patch vLLM classes process-wide), started once and driven by this process over
pipes. Timing is interleaved: every round runs every configuration once per batch size,
the order rotating by one each round; figures are medians over rounds and every ratio
divides by the ``unsteered`` median of the same run (the JSON also has the medians of the
per-round paired ratios). Before timing, at the largest batch, the outputs are checked:
``fasteer`` must differ from ``unsteered``, ``hooks`` must equal ``fasteer`` token for
token, and ``fasteer-half``'s rows must equal ``fasteer``'s (steered rows) and
``unsteered``'s (the others); a failure is reported in the results, not hidden.

The steering vector is CAA (`fasteer.extract.caa`, transformers in the same environment) on
four sentiment pairs at every layer (``--vector caa``, the default), or seeded random unit
directions times 20 (``--vector random``: no transformers load); ``--alpha`` (default 0.1)
keeps the text sane at every layer.

    .venv-vllm/bin/python benchmarks/bench_vllm.py            # ~8 min on 2 cores
    .venv-vllm/bin/python benchmarks/bench_vllm.py --quick    # smoke run, 1-2 min

CPU (default): SmolLM2-135M-Instruct (`fasteer.models.packaged_model_path("smollm2")`),
float32, each worker with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``OMP_NUM_THREADS=1``,
``VLLM_CPU_KVCACHE_SPACE=1``; writes ``benchmarks/results/vllm_cpu.{json,md}``.

GPU variant: ``--device cuda --model /path/to/an-8B-shaped-model`` (bf16, the four
workers share the GPU: ``--gpu-memory-utilization`` each, default 0.22) on a CUDA build
of vLLM; writes ``vllm_cuda.{json,md}``. It has not been run: this machine has no GPU and
the lent GPU machine has no vLLM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = ["unsteered", "fasteer", "fasteer-half", "hooks"]
# (fasteer plugin on, steered requests: none / all / half, forward hooks)
SETUP = {
    "unsteered": dict(plugin=False, steer="none", hooks=False),
    "fasteer": dict(plugin=True, steer="all", hooks=False),
    "fasteer-half": dict(plugin=True, steer="half", hooks=False),
    "hooks": dict(plugin=False, steer="all", hooks=True),
}
VECTOR_ID = "vec"
POSITIVE = ["I love this, it is wonderful", "What a great and happy day",
            "This is excellent and delightful", "I feel joyful and grateful"]
NEGATIVE = ["I hate this, it is terrible", "What an awful and sad day",
            "This is horrible and disgusting", "I feel miserable and angry"]
SUBJECTS = ["The weather today", "My favourite food", "The meeting yesterday",
            "Our new neighbour", "The film we watched", "The train to the city",
            "My first day at work", "The old library", "The garden in spring",
            "Her latest novel", "The school concert", "This small café",
            "The hotel room", "Our trip to the coast", "The new phone", "The football match"]
VERBS = [" is", " was", " will be", " seems"]
PROMPTS = [s + v for v in VERBS for s in SUBJECTS]          # 64 distinct prompts
TARGET = 0.98
WORKER_TIMEOUT = 900.0


def steered_rows(steer: str, batch: int) -> list[bool]:
    if steer == "none":
        return [False] * batch
    if steer == "all":
        return [True] * batch
    return [i % 2 == 0 for i in range(batch)]                 # half: even indices


# =============================================================================== worker
class HookSteering:
    """A forward-hook steering plugin for vLLM: ``residual += alpha * v[l]`` after decoder
    layer l for the tokens of steered requests (a request is steered when its
    SamplingParams carry a ``fasteer`` spec; the plugin itself is off in this process)."""

    def __init__(self, runner, deltas: dict):
        import torch
        model = runner.get_model()
        layers = model.model.layers
        dtype = runner.model_config.dtype
        device = next(model.parameters()).device
        self.deltas = {l: d.to(device=device, dtype=dtype) for l, d in deltas.items()}
        max_tokens = int(runner.max_num_tokens) + 8
        self.mask = torch.zeros(max_tokens, 1, dtype=dtype, device=device)
        self.mode = None            # None (not a routed step) / "none" / "all" / "mixed"
        self._high_water = 0
        self.handles = [layers[l].register_forward_hook(self._hook(l)) for l in self.deltas]

    def _hook(self, layer: int):
        delta = self.deltas[layer]

        def hook(module, args, output):
            mode = self.mode
            if mode is None or mode == "none":
                return None
            hidden, residual = output
            if mode == "all":
                return hidden, residual + delta
            return hidden, residual + self.mask[:residual.shape[0]] * delta
        return hook

    def prepare_step(self, runner) -> None:
        import numpy as np
        import torch
        from fasteer.hosts.vllm import routing
        from fasteer.hosts.vllm.steering import spec_of

        batch = runner.input_batch
        n = batch.num_reqs
        steered = np.array([spec_of(runner.requests[rid].sampling_params) is not None
                            for rid in batch.req_ids[:n]], dtype=bool)
        qsl = np.asarray(runner.query_start_loc.np[:n + 1])
        req, _ = routing.token_classes(qsl, np.asarray(batch.num_computed_tokens_cpu[:n]),
                                       np.asarray(batch.num_prompt_tokens[:n]))
        tokens = steered[req]                      # per-token: steered or not
        if not tokens.any():
            self.mode = "none"
            return
        if tokens.all():                           # no mask to apply: one add per layer
            self.mode = "all"
            return
        t = tokens.shape[0]
        host = np.zeros((max(t, self._high_water), 1), dtype=np.float32)
        host[:t, 0] = tokens
        self.mask[:host.shape[0]].copy_(torch.from_numpy(host))
        self._high_water = t
        self.mode = "mixed"


def install_hook_plugin(deltas: dict) -> None:
    """Patch vLLM's runners in this process: hooks on load, routing per step."""
    import functools
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        original = cls.__dict__.get("load_model")
        if original is None:
            continue

        def load_model(self, *a, _original=original, **k):
            result = _original(self, *a, **k)
            if getattr(self, "_bench_hooks", None) is None:
                self._bench_hooks = HookSteering(self, deltas)
            return result
        cls.load_model = functools.wraps(original)(load_model)

    forward = GPUModelRunner._model_forward

    @functools.wraps(forward)
    def _model_forward(self, *a, **k):
        hooks = getattr(self, "_bench_hooks", None)
        if hooks is None:
            return forward(self, *a, **k)
        hooks.prepare_step(self)
        try:
            return forward(self, *a, **k)
        finally:
            hooks.mode = None
    GPUModelRunner._model_forward = _model_forward


def worker(cfg: dict) -> None:
    """One configuration: an LLM, then requests from stdin, one JSON line each."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # vLLM's prints and logs go to the log, not the pipe

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    setup = cfg["setup"]
    if setup["plugin"]:
        import fasteer.hosts.vllm as fv
        fv.enable(cfg["registry"])
    if setup["hooks"]:
        from fasteer.vectors import SteeringVector
        vec = SteeringVector.load(cfg["vector"])
        install_hook_plugin({l: cfg["alpha"] * vec[l] for l in vec.layers})

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    kw = dict(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              enforce_eager=True, max_num_seqs=cfg["max_num_seqs"],
              enable_prefix_caching=False, seed=0)
    if cfg["device"] == "cuda":
        kw["gpu_memory_utilization"] = cfg["gpu_memory_utilization"]
    llm = LLM(**kw)
    from fasteer.hosts.vllm.spec import SPEC_KEY
    spec = {SPEC_KEY: [{"add": VECTOR_ID, "alpha": cfg["alpha"]}]}
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    reply({"ready": True, "vllm": vllm.__version__, "torch": torch.__version__,
           "transformers": tf_version, "torch_threads": torch.get_num_threads()})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            break
        batch, max_tokens = msg["batch"], msg["max_tokens"]
        rows = steered_rows(setup["steer"], batch)
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                 extra_args=spec if s else None) for s in rows]
        c0, t0 = time.process_time(), time.perf_counter()
        outs = llm.generate(PROMPTS[:batch], params, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        out = {"seconds": seconds, "cpu_seconds": cpu_seconds,
               "tokens": sum(len(t) for t in tokens)}
        if msg.get("return_tokens"):
            out["token_ids"] = tokens
            out["texts"] = [o.outputs[0].text for o in outs[:2]]
        reply(out)


# =============================================================================== parent
class Worker:
    def __init__(self, name: str, cfg: dict, env: dict, log: Path):
        self.name, self.log = name, log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps({**cfg, "name": name, "setup": SETUP[name]})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file, env=env,
            text=True, bufsize=1)

    def read(self, timeout: float = WORKER_TIMEOUT) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            tail = self.log.read_text()[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"worker {self.name!r} " + ("timed out" if not ready else
                               f"exited ({self.proc.wait()})") + f"; its log ends:\n{tail}")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
        self._log_file.close()


def make_vector(kind: str, model_path: str, device: str, folder: Path, n_layers: int,
                hidden: int) -> dict:
    import torch
    from fasteer.vectors import SteeringVector

    if kind == "random":
        g = torch.Generator().manual_seed(0)
        dirs = {}
        for l in range(n_layers):
            v = torch.randn(hidden, generator=g)
            dirs[l] = 20.0 * v / v.norm()
        vec = SteeringVector(dirs, site="resid_post", metadata={"method": "random, norm 20"})
    else:
        import fasteer as fs
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model = model.to(device).eval()
        vec = fs.extract.caa(model, tok, POSITIVE, NEGATIVE, progress=False)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    path = folder / "vec.safetensors"
    vec.save(path)
    (folder / "registry.json").write_text(json.dumps({"vectors": {VECTOR_ID: path.name}}))
    return {"path": str(path), "layers": len(vec.layers),
            "norms": {str(l): round(n, 3) for l, n in vec.norms().items()}}


def check_outputs(toks: dict, batch: int) -> dict:
    """The correctness checks (greedy token ids at the largest batch)."""
    u, f, h, k = (toks[c] for c in CONFIGS)
    rows = steered_rows("half", batch)

    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    differ = sum(f[i] != u[i] for i in range(batch))
    hooks_equal = sum(k[i] == f[i] for i in range(batch))
    half_ok = sum(h[i] == (f[i] if rows[i] else u[i]) for i in range(batch))
    mismatches = [{"request": i, "first_different_token": first_diff(k[i], f[i])}
                  for i in range(batch) if k[i] != f[i]]
    return {
        "batch": batch,
        "fasteer_differs_from_unsteered": f"{differ}/{batch}",
        "hooks_equal_fasteer": f"{hooks_equal}/{batch}",
        "half_rows_equal_their_reference": f"{half_ok}/{batch}",
        "hooks_mismatches": mismatches,
        "ok": differ == batch and hooks_equal == batch and half_ok == batch,
    }


def _git_state() -> dict:
    """The checkout the figures come from (fasteer is installed editable in the vLLM env)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "fasteer", "csrc")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes_in_fasteer_or_csrc":
                [l.strip() for l in changed.splitlines()] if changed else []}


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batches 1 and 4, 2 rounds, 8 tokens")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens generated per request (default 64)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,16,64)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default=None,
                    help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--vector", choices=("caa", "random"), default="caa")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="wall: perf_counter around generate; cpu: the worker process's CPU "
                         "time (user+sys, all its threads: robust on a shared machine); "
                         "auto: cpu on --device cpu, wall on cuda")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.22,
                    help="--device cuda: the fraction of the GPU each of the 4 workers takes")
    ap.add_argument("--out", default=None, help="folder for the results (default "
                    "benchmarks/results/, or $FASTEER_BENCH_OUT)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))

    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rounds = args.rounds or (2 if args.quick else 4)
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [1, 4] if args.quick else [1, 16, 64])
    if max(batches) > len(PROMPTS):
        ap.error(f"--batches: at most {len(PROMPTS)} (the number of distinct prompts)")
    clock = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" else "wall")
    if args.device == "cuda" and clock == "cpu":
        ap.error("--clock cpu: GPU time is not the process's CPU time; use --clock wall")
    if args.device == "cuda" and not args.model:
        ap.error("--device cuda needs --model (an 8B-shaped model folder)")

    from common import machine_info, machine_line, markdown_table, write_results
    t_start = time.perf_counter()
    info = machine_info()
    info["load_average_start"] = _load()
    info["git"] = _git_state()
    model_path = args.model
    model_label = Path(model_path).name if model_path else None
    if model_path is None:
        from fasteer.models import packaged_model_path
        model_path = str(packaged_model_path("smollm2"))
        model_label = "SmolLM2-135M-Instruct (fasteer.models 'smollm2')"
    config = json.loads((Path(model_path) / "config.json").read_text())
    cfg_text = config.get("text_config", config)
    n_layers, hidden = cfg_text["num_hidden_layers"], cfg_text["hidden_size"]
    root = Path(__file__).resolve().parent.parent
    exe = Path(sys.executable)
    python = str(exe.relative_to(root)) if exe.is_relative_to(root) else "python"
    command = os.environ.get("FASTEER_BENCH_COMMAND") or shlex.join(
        [python, "benchmarks/bench_vllm.py", *(sys.argv[1:] if argv is None else argv)])
    print(machine_line(info), flush=True)
    print(f"model {model_path} ({n_layers} layers, D={hidden}), device {args.device}, "
          f"batches {batches}, {max_tokens} tokens, {rounds} rounds", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="bench_vllm_")
    folder = Path(tmp.name)
    workers: dict[str, Worker] = {}
    try:
        t0 = time.perf_counter()
        vector = make_vector(args.vector, model_path, args.device, folder, n_layers, hidden)
        print(f"vector: {args.vector} at {vector['layers']} layers, alpha {args.alpha} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        wcfg = dict(model=model_path, device=args.device,
                    dtype="float32" if args.device == "cpu" else "bfloat16",
                    max_model_len=max_tokens + 64, max_num_seqs=max(batches),
                    alpha=args.alpha, vector=vector["path"],
                    registry=str(folder / "registry.json"),
                    gpu_memory_utilization=args.gpu_memory_utilization)
        t0 = time.perf_counter()
        for name in CONFIGS:
            env = {k: v for k, v in os.environ.items() if k != "FASTEER_VLLM_REGISTRY"}
            if SETUP[name]["plugin"]:
                env["FASTEER_VLLM_REGISTRY"] = wcfg["registry"]
            workers[name] = Worker(name, wcfg, env, folder / f"{name}.log")
        ready = {name: w.read() for name, w in workers.items()}
        print(f"workers ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        w0 = ready["unsteered"]
        info["vllm"] = w0["vllm"]
        info["worker_torch_threads"] = {n: r["torch_threads"] for n, r in ready.items()}

        # ---- correctness, at the largest batch (also the warm-up for that size)
        big = max(batches)
        outs = {n: workers[n].ask(batch=big, max_tokens=max_tokens, return_tokens=True)
                for n in CONFIGS}
        check = check_outputs({n: o["token_ids"] for n, o in outs.items()}, big)
        check["sample_texts"] = {n: outs[n]["texts"][0] for n in ("unsteered", "fasteer",
                                                                    "hooks")}
        print("checks:", json.dumps({k: v for k, v in check.items()
                                     if k not in ("sample_texts",)}), flush=True)
        if not check["ok"]:
            print("WARNING: a correctness check failed (see above); timing anyway",
                  flush=True)
        for b in batches:                                  # warm-up, untimed
            if b != big:
                for n in CONFIGS:
                    workers[n].ask(batch=b, max_tokens=min(8, max_tokens))

        # ---- timed, interleaved rounds
        samples = {(n, b): [] for n in CONFIGS for b in batches}      # the chosen clock
        other = {(n, b): [] for n in CONFIGS for b in batches}        # the other clock
        for r in range(rounds):
            for bi, b in enumerate(batches):
                k = (r + bi) % len(CONFIGS)
                for n in CONFIGS[k:] + CONFIGS[:k]:
                    res = workers[n].ask(batch=b, max_tokens=max_tokens)
                    wall, cpu = res["tokens"] / res["seconds"], res["tokens"] / res["cpu_seconds"]
                    samples[(n, b)].append(cpu if clock == "cpu" else wall)
                    other[(n, b)].append(wall if clock == "cpu" else cpu)
            print(f"round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s, "
                  f"load {_load()})", flush=True)
    finally:
        for w in workers.values():
            w.close()
        tmp.cleanup()

    # ---- figures
    results, rows = [], []
    for b in batches:
        med = {n: statistics.median(samples[(n, b)]) for n in CONFIGS}
        ratio = {n: med[n] / med["unsteered"] for n in CONFIGS}
        paired = {n: statistics.median(x / y for x, y in zip(samples[(n, b)],
                                                            samples[("unsteered", b)]))
                  for n in CONFIGS}
        vs_hooks = med["fasteer"] / med["hooks"]
        med_other = {n: statistics.median(other[(n, b)]) for n in CONFIGS}
        other_clock = "wall" if clock == "cpu" else "cpu"
        results.append(dict(batch=b, max_tokens=max_tokens, rounds=rounds, clock=clock,
                            tokens_per_s=med, ratio=ratio, paired_ratio_median=paired,
                            fasteer_over_hooks=vs_hooks,
                            samples_tokens_per_s={n: samples[(n, b)] for n in CONFIGS},
                            other_clock={
                                "clock": other_clock, "tokens_per_s": med_other,
                                "ratio": {n: med_other[n] / med_other["unsteered"]
                                          for n in CONFIGS},
                                "samples_tokens_per_s": {n: other[(n, b)] for n in CONFIGS}}))
        rows.append([b, f"{med['unsteered']:.1f}",
                     f"{med['fasteer']:.1f}", f"{ratio['fasteer']:.3f}×",
                     f"{med['fasteer-half']:.1f}", f"{ratio['fasteer-half']:.3f}×",
                     f"{med['hooks']:.1f}", f"{ratio['hooks']:.3f}×", f"{vs_hooks:.3f}×"])
    header = ["batch", "unsteered tok/s", "fasteer tok/s", "fasteer ×", "fasteer-half tok/s",
              "fasteer-half ×", "hooks tok/s", "hooks ×", "fasteer / hooks"]
    table = markdown_table(header, rows)
    # round-to-round spread of the unsteered figures: how far apart equal work lands
    spread = max((max(samples[("unsteered", b)]) - min(samples[("unsteered", b)]))
                  / (2 * statistics.median(samples[("unsteered", b)])) for b in batches)
    met = [r["ratio"]["fasteer"] >= TARGET and r["fasteer_over_hooks"] > 1.0 for r in results]
    target_line = (f"Target: fasteer ≥ {TARGET:.2f}× unsteered vLLM throughput and ahead of "
                   "hooks: " + ("met" if all(met) else "NOT met") + " — " + ", ".join(
                       f"batch {r['batch']}: {r['ratio']['fasteer']:.3f}× unsteered, "
                       f"{r['fasteer_over_hooks']:.3f}× hooks" for r in results))
    info["load_average_end"] = _load()
    seconds = time.perf_counter() - t_start
    other_line = (f"{results[0]['other_clock']['clock']}-clock ratios to unsteered (same run): "
                  + "; ".join(f"batch {r['batch']}: " + ", ".join(
                      f"{n} {r['other_clock']['ratio'][n]:.3f}×" for n in CONFIGS[1:])
                      for r in results))
    print()
    print(f"generated tokens/s ({clock} clock), median of {rounds} rounds:")
    print(table, end="")
    print(other_line)
    print(target_line)
    print(f"unsteered round-to-round spread: ±{100 * spread:.1f}%")
    print(f"checks {'passed' if check['ok'] else 'FAILED'}; {seconds:.0f} s in all", flush=True)

    if args.no_write:
        return
    checks_md = (f"Checks (greedy tokens, batch {check['batch']}, before timing): fasteer "
                 f"differs from unsteered in {check['fasteer_differs_from_unsteered']} "
                 f"requests; hooks equal fasteer in {check['hooks_equal_fasteer']}; "
                 f"fasteer-half rows equal their reference (fasteer for steered rows, "
                 f"unsteered for the others) in {check['half_rows_equal_their_reference']}"
                 + ("." if check["ok"] else ". **A check failed**" + (
                     f": hooks differ from fasteer at {check['hooks_mismatches']}"
                     if check["hooks_mismatches"] else "") + "."))
    clock_text = ("the worker process's CPU time (user + sys) during `generate`: on this "
                  "shared machine it is steadier than the wall clock, whose ratios are "
                  "given below the table" if clock == "cpu" else
                  "wall time of `generate` (CPU-time ratios below the table)")
    noise_md = (f"Noise: the unsteered throughput itself varied by up to ±{100 * spread:.1f}% "
                "from round to round in this run (half its max−min range over the median)")
    if 1 in batches:
        r1 = next(r for r in results if r["batch"] == 1)
        gap = abs(r1["ratio"]["fasteer"] - r1["ratio"]["fasteer-half"])
        noise_md += (f", and at batch 1, where `fasteer` and `fasteer-half` do the same work "
                     f"(one steered request), their ratios differ by {gap:.3f}")
    noise_md += ("; differences of that size cannot be told apart from the load of the "
                 "shared machine by one run.")
    samples_md = "\n".join(f"* {n}: {json.dumps(t)}" for n, t in check["sample_texts"].items())
    md = (f"# vLLM throughput: fasteer vs unsteered vLLM vs forward hooks ({args.device})\n\n"
          f"{target_line}\n\nCommand: `{command}`\n\n{machine_line(info)} · vLLM "
          f"{info['vllm']} · transformers {info.get('transformers', '?')}. Load average "
          f"(1/5/15 min) at start: {info['load_average_start']}, at end: "
          f"{info['load_average_end']} on {info['cpu_count']} cores. Checkout "
          f"{(info['git']['commit'] or '?')[:10]}"
          + (f" with uncommitted changes in {len(info['git']['uncommitted_changes_in_fasteer_or_csrc'])}"
             " files of fasteer/ or csrc/" if info["git"]["uncommitted_changes_in_fasteer_or_csrc"]
             else "") + ".\n\n"
          f"Model {model_label} ({n_layers} layers, D={hidden}, "
          f"{wcfg['dtype']}), vLLM offline `LLM.generate`, eager, greedy, `ignore_eos`, "
          f"{max_tokens} generated tokens per request, B distinct prompts per call "
          f"(max_num_seqs {max(batches)}), no prefix caching. Steering: "
          f"`{{\"add\": \"vec\", \"alpha\": {args.alpha}}}` with a {args.vector} vector at "
          f"all {vector['layers']} layers (resid_post). Generated tokens/s, median of "
          f"{rounds} interleaved rounds, one worker process per configuration; × is the "
          f"throughput ratio to unsteered vLLM of the same run (higher is faster). Clock: "
          f"{clock_text}.\n\n"
          + table + f"\n{other_line}\n\n{noise_md}\n" +
          "\n* `unsteered`: vLLM without fasteer (plugin off).\n"
          "* `fasteer`: the fasteer plugin, every request steered at every layer.\n"
          "* `fasteer-half`: the fasteer plugin, even-indexed requests steered, the others "
          "not (batch 1: its one request is steered).\n"
          "* `hooks`: plugin off; a forward hook on every decoder layer adds alpha·v to its "
          "output residual for steered tokens (routed per step from the runner's batch "
          "view), every request steered — what vLLM-Hook / vllm-lens do.\n\n"
          f"{checks_md}\n\nSample (request 0):\n\n{samples_md}\n")
    payload = {"machine": info, "command": command, "seconds": seconds,
               "unsteered_round_spread": spread,
               "model": model_path, "n_layers": n_layers, "hidden": hidden,
               "device": args.device, "dtype": wcfg["dtype"], "alpha": args.alpha,
               "clock": clock,
               "vector": {"kind": args.vector, "layers": vector["layers"],
                          "norms": vector["norms"]},
               "batches": batches, "max_tokens": max_tokens, "rounds": rounds,
               "prompts": PROMPTS[:max(batches)], "checks": check, "target": target_line,
               "results": results}
    if args.out:
        os.environ["FASTEER_BENCH_OUT"] = args.out
    stem = f"vllm_{args.device}" + ("_quick" if args.quick else "")
    paths = write_results(stem, payload, md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
