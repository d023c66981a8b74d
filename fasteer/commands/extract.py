"""`fasteer extract`: prompt files in, steering vector file out (.safetensors or .gguf)."""
from __future__ import annotations

from pathlib import Path

from ..cli import UsageError
from . import _common as C

METHODS = ("caa", "pca_diff", "pca_center", "instruction", "ablation")


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--method", default="caa", choices=METHODS,
                        help="caa: difference of means; pca_diff / pca_center: repeng's PCA; "
                             "instruction: a direction plus per-layer Clamp targets (for "
                             "`generate --clamp FILE`); ablation: a direction to remove (for "
                             "`generate --ablate FILE`)")
    parser.add_argument("--pairs", help=".jsonl/.json of {\"positive\": ..., \"negative\": ...}")
    parser.add_argument("--positive", help="file with one positive prompt per line")
    parser.add_argument("--negative", help="file with one negative prompt per line")
    parser.add_argument("--layers", default=None, help="e.g. '3' or '2,5' or '4-7' (default: all)")
    parser.add_argument("--position", default="last", choices=["last", "mean"],
                        help="activations of the last token or the mean over tokens")
    parser.add_argument("--site", default="resid_post", choices=["resid_pre", "resid_post"],
                        help="where in each layer the activations are read")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--out", required=True, help="output .safetensors or .gguf")
    C.add_quiet_argument(parser)


def run(args) -> int:
    from ..extract import extract_from_files

    if not args.pairs and not (args.positive and args.negative):
        raise UsageError("prompts are needed: --pairs FILE, or --positive FILE and --negative FILE")
    for name in ("pairs", "positive", "negative"):
        value = getattr(args, name)
        if value and not Path(value).exists():
            raise UsageError(f"--{name}: no such file: {value}")
    if Path(args.out).suffix.lower() not in (".safetensors", ".gguf"):
        raise UsageError(f"--out: expected a .safetensors or .gguf path, got {args.out!r}")
    if args.batch_size < 1:
        raise UsageError("--batch-size: expected a positive number")
    layers = C.parse_layers(args.layers, C.model_config(args.model).num_hidden_layers)
    model, tok, _ = C.load_model(args.model, args.device, args.dtype)
    options = dict(site=args.site, batch_size=args.batch_size, chat_template=args.chat_template,
                   progress=C.progress_enabled(args.quiet))
    if args.method in ("caa", "instruction", "ablation"):
        options["position"] = args.position
    try:
        vec = extract_from_files(model, tok, args.method, pairs=args.pairs, positive=args.positive,
                                 negative=args.negative, layers=layers, output=args.out, **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    norms = ", ".join(f"{l}: {float(vec[l].norm()):.3g}" for l in vec.layers[:8])
    print(f"wrote {args.out}: {args.method} vector, layers {list(vec.layers)}, D={vec.hidden_size} "
          f"(norms {norms}{', ...' if len(vec.layers) > 8 else ''})")
    return 0
