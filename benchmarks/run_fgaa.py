"""CAA vs FGAA vs SAE-TS targeted steering vs plain feature steering on SmolLM2-135M-Instruct,
with fasteer's packaged SAE (resid_post[8]) and the quality report of `fasteer eval`.

    python benchmarks/run_fgaa.py                 # everything (fits the approximator if absent)
    python benchmarks/run_fgaa.py --fit-only      # only the effect approximator
    python benchmarks/run_fgaa.py --table         # rebuild the Markdown table and plot

Per concept (the four shipped ones: sentiment, ocean, formality, french), four steerings at
the same place, resid_post[8], each evaluated by `fasteer.evaluate.evaluate` (what `fasteer
eval` runs: 24 select + 24 test neutral prompts, one 32-token sampled continuation per
prompt and strength, concept judge, fluency from the unsteered model's NLL and looping,
combined = harmonic mean, best strength picked on the select prompts, 95% bootstrap
intervals on the test prompts):

1. **CAA**: ``fs.extract.caa`` over the concept's 48 train pairs, ``Add(v, α)``.
2. **FGAA** (Soo et al. 2025): ``fs.extract.fgaa`` over the same pairs with the SAE's corpus
   density (``density_threshold=0.01``, BOS filter, top-k 50) and the effect approximator
   (``mapping="effect"``), ``Add(v, α)``.
3. **SAE-TS** (Chalnev et al. 2024): ``fs.extract.targeted_vector`` for the concept's
   feature k (the top feature of FGAA's filtered target), ``Add(v, α)``.
4. **Feature steering**: ``FeatureEdit(k, op="add", value=α·|v_CAA|)`` -- adds α|v_CAA|
   times feature k's unit decoder row (the SAE's own edit, fused).

Strength: every vector but CAA's is rescaled to the CAA vector's norm for that concept, and
the feature edit's value is α·|v_CAA|, so one α grid means the same added length for all four.

The effect approximator (``fs.extract.fit_effect_approximator``) is fitted once on
model-written continuations of neutral chat prompts (not the concepts' prompts) and stored
next to the packaged SAE (``effects.safetensors``, float16).
Outputs: benchmarks/results/fgaa/{smollm2_<concept>_<method>.json,.md,.png} (the eval reports),
smollm2_<concept>_summary.json, approximator.json, and comparison.json / .md / .png (all
concepts merged). Concepts may run in separate processes (``--concepts``) side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "results" / "fgaa"
METHODS = ("caa", "fgaa", "sae_ts", "feature")
LABELS = {"caa": "CAA", "fgaa": "FGAA", "sae_ts": "SAE-TS targeted", "feature": "Feature add"}
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def approximator_path() -> Path:
    from fasteer.sae.packaged import packaged_sae_path
    return packaged_sae_path("smollm2") / "effects.safetensors"


def neutral_chat_prompts(tok, n: int) -> list[str]:
    """Chat prompts for fitting the approximator: the shipped neutral prompts' 'select' and
    'test' splits are the evaluation's, so these are written here, apart from them."""
    subjects = ["my morning", "the city", "a weekend", "the kitchen", "a road trip", "school",
                "the garden", "work", "a library", "the market", "a river", "an old house",
                "the train", "a museum", "the neighbours", "a bicycle", "the winter",
                "a new hobby", "the office", "a park", "a phone call", "dinner", "a letter",
                "the news"]
    kinds = ["Write a few sentences about {s}.", "Tell me about {s}.", "Describe {s}.",
             "Continue the story: it started with {s}.", "What can you say about {s}?"]
    texts = [k.format(s=s) for s in subjects for k in kinds][:n]
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                    add_generation_prompt=True) for t in texts]


def fit(model, tok, sae, args):
    import fasteer as fs
    path = approximator_path()
    if path.exists() and not args.refit:
        return fs.extract.EffectApproximator.load(path)
    t0 = time.perf_counter()
    cache = Path.home() / ".cache" / "fasteer" / "sae-training" / f"effects-{args.n_vectors}.pt"
    if cache.exists() and not args.remeasure:
        # the measured (vector, effect) pairs of an earlier run: refit only
        from fasteer.extract.effects import RIDGE_GRID, fit_effect_map
        saved = torch.load(cache, weights_only=True)
        W, b, metrics = fit_effect_map(saved["S"].double(), saved["E"], ridge=list(RIDGE_GRID),
                                       held_out=0.1, seed=args.seed)
        meta = json.loads(saved["meta"]) | metrics | {"ridge": list(RIDGE_GRID)}
        approx = fs.extract.EffectApproximator(W.float(), b.float(), layer=sae.layer,
                                               site=sae.site, metadata=meta)
        print(f"approximator refitted from {cache}: "
              f"{json.dumps({k: v for k, v in metrics.items() if 'r2' in k or 'cos' in k})}")
        approx.save(path, dtype=torch.float16)
        return approx
    approx = fs.extract.fit_effect_approximator(
        model, tok, sae, neutral_chat_prompts(tok, args.fit_prompts), n_vectors=args.n_vectors,
        scale=args.scale, max_new_tokens=args.fit_tokens, samples_per_vector=1,
        baseline_samples=args.baseline_samples, batch_size=args.fit_batch, seed=args.seed)
    print(f"approximator fitted in {time.perf_counter() - t0:.0f} s: "
          f"{json.dumps({k: v for k, v in approx.metadata.items() if 'r2' in k or 'cos' in k})}")
    m = approx.measurement
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"S": m.vectors, "E": m.effects.float(), "meta": json.dumps(approx.metadata)}, cache)
    approx.save(path, dtype=torch.float16)
    return approx


def steerings(model, tok, sae, density, approx, concept):
    """{method: (make_interventions, description, info)} for one concept."""
    import fasteer as fs
    pos, neg = concept.pairs("train")
    layer = sae.layer
    caa = fs.extract.caa(model, tok, pos, neg, layers=[layer], site="resid_post", progress=False)
    norm = float(caa[layer].norm())
    fg = fs.extract.fgaa(model, tok, sae, pos, neg, density=density, approximator=approx,
                         mapping="effect", progress=False)
    k = int(fg.metadata["features"][0])
    ts = fs.extract.targeted_vector(approx, [k])

    def rescaled(vec):
        v = vec[layer].float()
        return fs.SteeringVector({layer: v * (norm / float(v.norm()))}, site="resid_post",
                                 metadata=dict(vec.metadata))

    out = {}
    (OUT / "vectors").mkdir(parents=True, exist_ok=True)
    for method, vec in (("caa", caa), ("fgaa", rescaled(fg)), ("sae_ts", rescaled(ts))):
        # `fasteer eval --model smollm2 --concept <c> --vector <file>` reruns this row
        vec.save(OUT / "vectors" / f"smollm2_{concept.name}_{method}.safetensors")
        out[method] = ((lambda a, v=vec: fs.Add(v, alpha=a)),
                       f"{LABELS[method]}: Add(v, α), |v| = {norm:.2f} (CAA's norm)",
                       {"norm": norm})
    out["feature"] = ((lambda a: fs.FeatureEdit(sae, k, op="add", value=a * norm)),
                      f"FeatureEdit(feature {k}, add α·{norm:.2f})", {"feature": k})
    info = {"feature": k, "caa_norm": norm,
            "fgaa_features": fg.metadata["features"][:10],
            "cos": {"fgaa_caa": _cos(fg[layer], caa[layer]), "sae_ts_caa": _cos(ts[layer], caa[layer]),
                    "feature_caa": _cos(sae.feature_decoder(k).float(), caa[layer]),
                    "fgaa_sae_ts": _cos(fg[layer], ts[layer])}}
    return out, info


def _cos(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasteer import models
    from fasteer.evaluate import evaluate, load_concept
    from fasteer.sae.labels import format_contexts, top_contexts
    from fasteer.sae.packaged import load_packaged_sae

    torch.set_num_threads(args.threads)
    folder = models.packaged_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"                 # generation pads on the left
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sae, density = load_packaged_sae("smollm2")
    sae = sae.to(dtype=torch.float32)
    approx = fit(model, tok, sae, args)
    if args.fit_only:
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "approximator.json").write_text(json.dumps(dict(approx.metadata), indent=1) + "\n")
    for name in args.concepts.split(","):
        concept = load_concept(name)
        table, info = steerings(model, tok, sae, density, approx, concept)
        pos, _ = concept.pairs("train")
        labels = top_contexts(model, tok, sae, pos + list(concept.pairs("test")[0]),
                              [info["feature"]], k=5, progress=False)
        info["feature_top_contexts"] = format_contexts(labels)
        path = OUT / f"smollm2_{name}_summary.json"
        entry = {"info": info, "methods": {}}
        if path.exists():           # keep methods run earlier (e.g. with --methods)
            entry["methods"] = json.loads(path.read_text()).get("methods", {})
        for method in args.methods.split(","):
            make, description, _ = table[method]
            report = evaluate(model, tok, concept, alphas=ALPHAS, make_interventions=make,
                              description=description, layers=[sae.layer], seed=args.seed,
                              n_prompts=args.prompts,
                              model_name="smollm2", progress=not args.quiet)
            report.settings["command"] = "python benchmarks/run_fgaa.py " + " ".join(sys.argv[1:])
            report.save(OUT, stem=f"smollm2_{name}_{method}")
            best = report.at(report.best_alpha)
            entry["methods"][method] = {
                "best_alpha": report.best_alpha,
                "test": {k: list(v) for k, v in best.scores.items()},
                "unsteered": {k: list(v) for k, v in report.at(0.0).scores.items()},
                "seconds": report.settings["seconds"]}
            print(f"{name}/{method}: α={report.best_alpha:g} concept "
                  f"{best.scores['concept'][0]:.2f} fluency {best.scores['fluency'][0]:.2f} "
                  f"combined {best.scores['combined'][0]:.2f}", flush=True)
            if path.exists():       # another process may have added methods meanwhile
                entry["methods"] = {**json.loads(path.read_text()).get("methods", {}),
                                    method: entry["methods"][method]}
            path.write_text(json.dumps(entry, indent=1) + "\n")
    write_table()
    return 0


def comparison_table(summary: dict) -> str:
    """The Markdown table of comparison.json: one row per (concept, method), test scores at
    the best strength."""
    rows = ["| concept | method | best α | concept score | fluency | combined |",
            "|---|---|---:|---|---|---|"]

    def ci(v):
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"
    for name, entry in summary.get("concepts", {}).items():
        for method in METHODS:
            m = entry["methods"].get(method)
            if m is None:
                continue
            t = m["test"]
            rows.append(f"| {name} | {LABELS[method]} | {m['best_alpha']:g} | {ci(t['concept'])} "
                        f"| {ci(t['fluency'])} | {ci(t['combined'])} |")
    return "\n".join(rows)


def write_table() -> None:
    from fasteer.evaluate.report import EvalReport
    summary = {"approximator": json.loads((OUT / "approximator.json").read_text()),
               "concepts": {}}
    for name in ("sentiment", "ocean", "formality", "french"):
        path = OUT / f"smollm2_{name}_summary.json"
        if path.exists():
            summary["concepts"][name] = json.loads(path.read_text())
    (OUT / "comparison.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = comparison_table(summary)
    (OUT / "comparison.md").write_text(table + "\n")
    print(table)
    _plot(summary, EvalReport)


def _plot(summary, EvalReport) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    concepts = list(summary.get("concepts", {}))
    if not concepts:
        return
    fig, axes = plt.subplots(1, len(concepts), figsize=(4.2 * len(concepts), 3.6), squeeze=False)
    for ax, name in zip(axes[0], concepts):
        for method in METHODS:
            path = OUT / f"smollm2_{name}_{method}.json"
            if not path.exists():
                continue
            rep = EvalReport.load(path)
            xs = [r.alpha for r in rep.test]
            ys = [r.scores["combined"][0] for r in rep.test]
            lo = [r.scores["combined"][1] for r in rep.test]
            hi = [r.scores["combined"][2] for r in rep.test]
            ax.plot(xs, ys, marker="o", label=LABELS[method])
            ax.fill_between(xs, lo, hi, alpha=0.12)
        ax.set_title(f"{name} (n = {rep.test[0].n if rep.test else 0} test prompts)",
                     fontsize=10)
        ax.set_xlabel("α (added length, in units of |v_CAA|)")
        ax.set_ylabel("combined score (test prompts)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, resid_post[8]; bands: 95% bootstrap", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "comparison.png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", default="sentiment,ocean,formality,french",
                   help="(default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="(default: %(default)s)")
    p.add_argument("--fit-prompts", type=int, default=40,
                   help="approximator: chat prompts the vectors continue (default: %(default)s)")
    p.add_argument("--baseline-samples", type=int, default=8,
                   help="approximator: unsteered generations per prompt (default: %(default)s)")
    p.add_argument("--n-vectors", type=int, default=2048,
                   help="approximator: random steering vectors (default: %(default)s)")
    p.add_argument("--scale", type=float, default=0.5,
                   help="approximator: vector length relative to the median residual norm "
                        "(default: %(default)s)")
    p.add_argument("--fit-tokens", type=int, default=32,
                   help="approximator: generated tokens per vector (default: %(default)s)")
    p.add_argument("--fit-batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--refit", action="store_true", help="fit the approximator even if stored "
                   "(from the cached measurements when present)")
    p.add_argument("--remeasure", action="store_true",
                   help="with --refit: measure the effects again even if cached")
    p.add_argument("--fit-only", action="store_true")
    p.add_argument("--table", action="store_true", help="only rebuild table and plot")
    p.add_argument("--prompts", type=int, default=24,
                   help="neutral prompts per split, 1-24 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        write_table()
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
