"""`fasteer generate`: continue prompts with a steering vector file applied."""
from __future__ import annotations

from ..cli import UsageError
from . import _common as C


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--prompt", help="the prompt")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument("--vector", required=True, help="steering vector (.safetensors or .gguf)")
    parser.add_argument("--alpha", default="1.0", help="steering strength")
    parser.add_argument("--layers", default=None, help="e.g. '3' or '2,5' or '4-7' "
                        "(default: the vector's own layers)")
    parser.add_argument("--positions", default="all",
                        choices=["all", "prompt", "generated", "last_prompt"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also print the unsteered text")


def run(args) -> int:
    import fasteer as fs
    alpha = C.parse_float(args.alpha, "--alpha")
    prompts = C.read_prompts(args.prompt, args.prompts_file)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens: expected a positive number")
    config = C.model_config(args.model)
    vec = C.load_vector(args.vector, config)
    layers = C.parse_layers(args.layers, config.num_hidden_layers)
    if layers is None:
        bad = [l for l in vec.layers if l >= config.num_hidden_layers]
        if bad:
            raise UsageError(f"--vector: has layers {bad}; the model has "
                             f"{config.num_hidden_layers}")
    model, tok, _ = C.load_model(args.model, args.device, args.dtype)
    if args.compare:
        plain = C.generate_rows(model, tok, prompts, args.max_new_tokens, seed=args.seed,
                                do_sample=not args.greedy)
    with fs.steer(model, fs.Add(vec, alpha=alpha, layers=layers, positions=args.positions)):
        texts = C.generate_rows(model, tok, prompts, args.max_new_tokens, seed=args.seed,
                                do_sample=not args.greedy)
    for i, (p, t) in enumerate(zip(prompts, texts)):
        if args.compare:
            print(f"[{i}] unsteered: {p} {plain[i].strip()}")
        print(f"[{i}] alpha {alpha:g}: {p} {t.strip()}")
    return 0
