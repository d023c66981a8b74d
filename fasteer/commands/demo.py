"""`fasteer demo`: steering you can see, in under a minute, with no model of your own.

1. load the embedded demo model (a 4-layer Llama trained on a synthetic sentiment
   language; or --model smollm2 / gemma3 / any English HF causal LM: then the story is
   told on the real model by `demo_real`, judged by a sentiment lexicon),
2. extract a CAA (difference-of-means) sentiment vector from contrastive prompts,
3. continue neutral prompts at several alphas -- all alphas in ONE batched generate,
   each block of rows with its own steering (per-row slots),
4. print example continuations, the checker's attribute score (share of positive
   sentiment words) and grammaticality per alpha, and
5. measure the decode-latency overhead of the steering.
"""
from __future__ import annotations

import time

from ..cli import UsageError
from . import _common as C


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--alphas", default=None,
                        help="comma-separated alphas (default: the demo's calibrated set)")
    parser.add_argument("--layer", default=None,
                        help="layer(s) to steer, e.g. 2 or 1,2 (default: the demo's 2; "
                             "smollm2 8, gemma3 6; another --model: a third of its depth)")
    parser.add_argument("--prompts", type=int, default=24,
                        help="neutral prompts per alpha (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per continuation (default: the demo's 48; 32 with --model)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    parser.add_argument("--timing-rounds", type=int, default=7,
                        help="paired unsteered/steered rounds of the latency measurement "
                             "(default: %(default)s)")
    parser.add_argument("--sae", action="store_true",
                        help="also steer and watch the demo SAE's sentiment feature")
    parser.add_argument("--plot", default=None,
                        help="with a real --model: PNG to write (default: "
                             "fasteer-demo-<model>.png)")
    C.add_quiet_argument(parser)


def run(args) -> int:
    import fasteer as fs
    from ..demo import language
    from ..demo import world

    t_start = time.perf_counter()
    if args.device == "cpu":
        # the demo model is tiny: one thread avoids oversubscription on a busy machine
        import torch
        torch.set_num_threads(1)
    # Every argument is checked against the model's config before the model is loaded.
    if args.prompts < 1:
        raise UsageError("--prompts: expected a positive number")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens: expected a positive number")
    if args.timing_rounds < 2:
        raise UsageError("--timing-rounds: expected at least 2 (the spread needs several)")
    is_demo = args.model == C.DEMO
    if args.sae and not is_demo:
        raise UsageError("--sae: the demo SAE belongs to the embedded demo model")
    plot = None
    if not is_demo:
        C.check_model_name(args.model)
        from .demo_real import check_real_arguments
        plot = check_real_arguments(args)
    config = C.model_config(args.model)
    n_layers = config.num_hidden_layers
    if args.layer is not None:
        layers = C.parse_layers(args.layer, n_layers, "--layer")
    else:
        from ..models import default_layer
        layers = [world.DEMO_LAYER if is_demo else default_layer(args.model, n_layers)]
    alphas = (C.parse_floats(args.alphas, "--alphas") if args.alphas
              else list(world.DEMO_ALPHAS) if is_demo else None)
    if alphas is None:
        from .demo_real import REAL_ALPHAS
        alphas = list(REAL_ALPHAS)
    if 0.0 not in alphas:
        alphas = [0.0] + alphas
    if len(set(alphas)) != len(alphas):
        raise UsageError("--alphas: values must be distinct")
    max_new = args.max_new_tokens or (world.DEMO_MAX_NEW_TOKENS if is_demo else 32)
    model, tok, is_demo = C.load_model(args.model, args.device, args.dtype)

    print(f"model: {'embedded demo (' + str(world.DEMO_DIR) + ')' if is_demo else args.model}"
          f" · {type(model).__name__}, {n_layers} layers, D={model.config.hidden_size}")
    if not is_demo:
        from .demo_real import run_real_demo
        vec = run_real_demo(args, model, tok, layers, alphas, max_new, plot)
        if not args.no_timing:
            from ..evaluate import load_prompts
            _timing(args, model, tok, vec, alphas, layers, load_prompts("test", 4))
        print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
        return 0
    progress = C.progress_enabled(args.quiet)
    pairs = language.contrastive_pairs(world.DEMO_PAIRS)
    vec = fs.extract.caa(model, tok, [p for p, _ in pairs], [n for _, n in pairs], layers=layers,
                         position="last", progress=progress)
    print(f"CAA vector at layer(s) {layers} from {len(pairs)} contrastive pairs, "
          f"|v| = {float(vec[layers[0]].norm()):.2f}")

    prompts = language.neutral_prompts(args.prompts)
    t0 = time.perf_counter()
    outs = C.sweep_generate(model, tok, vec, alphas, prompts, layers=layers,
                            max_new_tokens=max_new, seed=args.seed, top_p=world.DEMO_TOP_P,
                            progress=progress)
    t_gen = time.perf_counter() - t0
    print(f"one batched generate: {len(alphas)} alphas x {len(prompts)} prompts = "
          f"{len(alphas) * len(prompts)} rows, {max_new} new tokens, {t_gen:.1f} s\n")

    print(f"{'alpha':>7}  {'attribute':>9}  {'grammatical':>11}   example")
    for a in alphas:
        texts = outs[a]
        scores = world.evaluate(prompts, texts)
        example = f"{prompts[0]} | {texts[0].strip()}"
        print(f"{a:>7g}  {scores['attribute']:>9.2f}  {scores['grammaticality']:>11.2f}   "
              f"{example[:110]}")
    print("\nattribute: share of positive sentiment words in the continuations (checker: "
          "fasteer/demo/language.py); grammatical: share of texts the grammar parses.")

    if not args.no_timing:
        _timing(args, model, tok, vec, alphas, layers, prompts[:4])
    if args.sae:
        from .demo_sae import run_sae_demo
        run_sae_demo(model, tok, prompts, max_new, args.seed, progress=progress)
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0


def _timing(args, model, tok, vec, alphas, layers, prompts) -> None:
    """Decode latency, unsteered vs steered at the first positive alpha, paired rounds."""
    steer_alpha = next((a for a in alphas if a > 0), 1.0)
    base, steered = C.decode_overhead(model, tok, vec, steer_alpha, layers, prompts,
                                      rounds=args.timing_rounds)
    print(f"\ndecode latency, batch 4, alpha {steer_alpha:g}: "
          f"{C.overhead_summary(base, steered)}")
    print("(on a shared CPU the spread is the machine's noise; `fasteer bench` measures "
          "properly)")
