"""Activation scaling on real models: ActivScalar, DynScalar and SteerVec, like the paper's table.

    python benchmarks/run_scaling.py --model smollm2            # or gemma3; both by default
    python benchmarks/run_scaling.py --table                    # print the table from the JSON

For each model and task -- country-capital conflict (``ccc``: flip a model that copies
the wrong capital from the context back to the capital it knows) and IOI with target and
foil swapped (``ioi-flip``: flip a model that names the indirect object to the subject;
unsteered, both models are right on every IOI prompt, so the flip is the test) -- it
learns each method on the train split (`fasteer.extract.activation_scaling`), then
applies the result through the fused path (``fs.patch`` + ``st.set``) on the held-out
test split and reports (`fasteer.extract.scaling.evaluate`):

* effectiveness: accuracy (logit(target) > logit(foil)) before / after, the share of
  foil-preferring prompts flipped, the mean change of the logit difference;
* faithfulness: KL at the answer position over the other tokens, and the mean KL of the
  next-token distributions at every earlier prompt position;
* minimality, measured the same way for every method: at each location (site, layer,
  prompt position) the edit's own relative change of the activation |h~ - h| / |h|,
  averaged over the test prompts; "moved" counts locations above 5%, "relative change"
  sums them; and the number of parameters.

DynScalar is also applied to prompts of another template (another length), which the
position-tied methods cannot be.

Writes ``benchmarks/results/scaling/<model>.json`` and ``.md``; one torch thread by
default (``--threads``). Seeds are fixed (task split 0, training 0).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scaling"
METHODS = ("activ", "dyn", "steervec")
NAMES = {"activ": "ActivScalar", "dyn": "DynScalar", "steervec": "SteerVec"}
OTHER_TEMPLATE = {"ccc": "according", "ioi": "long_day"}


def run_model(name: str, args) -> dict:
    import torch
    import transformers
    import fasteer as fs
    from fasteer.extract.scaling.evaluate import evaluate_scaling
    from fasteer.extract.scaling.train import DEFAULTS
    from fasteer.extract.scaling.tasks import build_task, task_report
    from fasteer.models import packaged_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = packaged_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {"model": name, "date": str(date.today()), "torch": torch.__version__,
           "transformers": transformers.__version__, "fasteer": fs.__version__,
           "machine": f"{platform.machine()} {platform.processor() or ''} "
                      f"{torch.get_num_threads()} torch thread(s)".strip(),
           "steps": args.steps, "batch_size": args.batch_size,
           "lr_lambda_min": {NAMES[m]: DEFAULTS[m] for m in METHODS},
           "command": "python benchmarks/run_scaling.py " + " ".join(sys.argv[1:]), "tasks": {}}
    previous = {}           # train_seconds of the last full run (for --evaluate-only)
    if (RESULTS / f"{name}.json").is_file():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        previous = {t: {m: ev.get("train_seconds") for m, ev in e["methods"].items()}
                    for t, e in old.get("tasks", {}).items()}
        if args.evaluate_only:
            out["evaluated_again_with"] = out["command"]
            out["command"] = old["command"]
    for task_name in args.tasks:
        base = task_name.split("-")[0]
        task = build_task(base, tok, model, n_train=args.n_train, n_test=args.n_test, seed=0)
        if task_name.endswith("-flip"):
            task = task.flip()
        other = None
        try:
            other = build_task(base, tok, model, n_train=4, n_test=args.n_test, seed=1,
                               template=OTHER_TEMPLATE[base])
            other = other.flip() if task_name.endswith("-flip") else other
            if other.info.get("length") == task.info.get("length"):
                other = None
        except ValueError as exc:
            print(f"[{name}] no other-template split for {task_name}: {exc}", file=sys.stderr)
        entry = {"info": {k: v for k, v in task.info.items() if k not in ("splits",)},
                 "unsteered": task_report(model, tok, task), "methods": {}}
        if other is not None:
            entry["other_template"] = {"template": OTHER_TEMPLATE[base],
                                       "length": other.info.get("length"),
                                       "n": len(other.test)}
        for method in METHODS:
            file = RESULTS / f"{name}-{task_name}-{method}.safetensors"
            t0 = time.perf_counter()
            if args.evaluate_only:
                result = fs.extract.ActivationScaling.load(file)
            else:
                result = fs.extract.activation_scaling(
                    model, tok, task, method=method, steps=args.steps,
                    batch_size=args.batch_size, seed=0,
                    desc=f"{name} {task_name} {NAMES[method]}")
                RESULTS.mkdir(parents=True, exist_ok=True)
                result.save(file)
            seconds = result.info.get("train_seconds", round(time.perf_counter() - t0, 1))
            if args.evaluate_only and "train_seconds" not in result.info:
                seconds = previous.get(task_name, {}).get(method)
            ev = evaluate_scaling(model, tok, result, task.test)
            ev["train_seconds"] = seconds
            ev["final_losses"] = result.info["final"]
            if method == "dyn" and other is not None:
                ev["other_template"] = evaluate_scaling(model, tok, result, other.test)
            entry["methods"][method] = ev
            print(f"[{name}] {task_name} {NAMES[method]}: accuracy "
                  f"{ev['accuracy_before'][0]:.2f} -> {ev['accuracy_after'][0]:.2f}, "
                  f"KL {ev['kl_answer'][0]:.3f}, moved {ev['minimality']['moved']}"
                  f"/{ev['minimality']['locations']} ({seconds:.0f} s)", flush=True)
        out["tasks"][task_name] = entry
    return out


def _ci(v, digits=2) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def table(results: list[dict]) -> str:
    lines = ["| model | task | n test | method | accuracy before → after | flipped | Δ logit diff "
             "| KL answer | KL prefix | moved / locations | Σ relative change | parameters |",
             "|---|---|---:|---|---|---:|---|---|---|---:|---:|---:|"]
    for r in results:
        for task_name, entry in r["tasks"].items():
            for method, ev in entry["methods"].items():
                m = ev["minimality"]
                flipped = "–" if ev["flipped"] is None else f"{ev['flipped']:.2f}"
                lines.append(
                    f"| {r['model']} | {task_name} | {ev['n']} | {NAMES[method]} | "
                    f"{ev['accuracy_before'][0]:.2f} → {_ci(ev['accuracy_after'])} | {flipped} | "
                    f"{_ci(ev['ld_change'], 1)} | {_ci(ev['kl_answer'], 3)} | "
                    f"{_ci(ev['kl_prefix'], 3)} | {m['moved']} / {m['locations']} | "
                    f"{m['relative_change']:.1f} | {m['parameters']} |")
    other = []
    for r in results:
        for task_name, entry in r["tasks"].items():
            ev = entry["methods"].get("dyn", {}).get("other_template")
            if ev:
                o = entry["other_template"]
                other.append(f"| {r['model']} | {task_name} | {o['template']} ({o['length']} "
                             f"tokens, trained on {entry['info'].get('length')}) | {ev['n']} | "
                             f"{ev['accuracy_before'][0]:.2f} → {_ci(ev['accuracy_after'])} | "
                             f"{_ci(ev['kl_answer'], 3)} |")
    if other:
        lines += ["", "DynScalar on prompts of another template (another length; ActivScalar and "
                  "SteerVec cannot be applied there):", "",
                  "| model | task | template | n | accuracy before → after | KL answer |",
                  "|---|---|---|---:|---|---|"] + other
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", choices=("smollm2", "gemma3"))
    ap.add_argument("--tasks", nargs="+", default=["ccc", "ioi-flip"])
    ap.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per step (default 8)")
    ap.add_argument("--n-train", type=int, default=64, help="train prompts wanted (default 64)")
    ap.add_argument("--n-test", type=int, default=64, help="test prompts wanted (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--table", action="store_true", help="print the table from the JSON files")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="evaluate the saved results/scaling/*.safetensors again, no training")
    args = ap.parse_args(argv)
    models = args.model or ["smollm2", "gemma3"]
    if args.table:
        results = [json.loads((RESULTS / f"{m}.json").read_text()) for m in models
                   if (RESULTS / f"{m}.json").is_file()]
        print(table(results))
        return 0
    for name in models:
        r = run_model(name, args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1))
        (RESULTS / f"{name}.md").write_text(
            f"# Activation scaling on {name}\n\n`{r['command']}` — {r['date']}, {r['machine']}, "
            f"torch {r['torch']}, transformers {r['transformers']}, {r['steps']} steps of "
            f"{r['batch_size']} prompts, (lr, lambda_min) {r['lr_lambda_min']}\n\n{table([r])}\n")
        print(table([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
