"""`fasteer sweep`: an alpha sweep done as ONE batched generate with per-row steering.

Prints a table of the checker's attribute score and grammaticality per alpha and writes
a PNG of both against alpha: the strength/capability trade-off (small alpha shifts the
behaviour, large alpha breaks fluency). Scores need the demo world's checker, so the
numbers are for the demo language; with --model the texts are printed instead.
"""
from __future__ import annotations

from pathlib import Path

from ..cli import UsageError
from . import _common as C


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--vector", default=None,
                        help="steering vector file (default: CAA extracted from the demo pairs)")
    parser.add_argument("--alphas", default="-3,-1.3,-0.6,0,0.6,1.3,2,3,5,8,12",
                        help="comma-separated; write --alphas=-2,0,2 when the first is negative "
                             "(default: %(default)s)")
    parser.add_argument("--layers", default=None,
                        help="e.g. '2' or '1,2' (default: the vector's layers; without "
                             "--vector, the demo's layer 2 or the model's middle layer)")
    parser.add_argument("--prompts", type=int, default=16,
                        help="neutral prompts per alpha (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens per continuation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--out", default="sweep.png",
                        help="PNG to write (default: %(default)s; needs fasteer[plot])")


def run(args) -> int:
    import fasteer as fs
    from ..demo import language, world

    alphas = C.parse_floats(args.alphas, "--alphas")
    if len(set(alphas)) != len(alphas):
        raise UsageError("--alphas: values must be distinct")
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise UsageError("--prompts and --max-new-tokens: expected positive numbers")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: expected a .png path, got {args.out!r}")
    try:  # before any work: the plot comes last, and losing the whole sweep to it is no way
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("writing the plot needs matplotlib: pip install 'fasteer[plot]'") from None
    config = C.model_config(args.model)
    layers = C.parse_layers(args.layers, config.num_hidden_layers)
    vec = C.load_vector(args.vector, config) if args.vector else None
    model, tok, is_demo = C.load_model(args.model, args.device, args.dtype)
    n_layers = config.num_hidden_layers
    if vec is None:
        layers = layers or [world.DEMO_LAYER if is_demo else n_layers // 2]
        pairs = language.contrastive_pairs(world.DEMO_PAIRS)
        vec = fs.extract.caa(model, tok, [p for p, _ in pairs], [n for _, n in pairs],
                             layers=layers, progress=False)
    prompts = language.neutral_prompts(args.prompts)
    print(f"sweep: {len(alphas)} alphas x {len(prompts)} prompts in one batched generate "
          f"({len(alphas) * len(prompts)} rows)")
    outs = C.sweep_generate(model, tok, vec, alphas, prompts, layers=layers,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            top_p=world.DEMO_TOP_P)
    rows = []
    print(f"{'alpha':>7}  {'attribute':>9}  {'grammatical':>11}")
    for a in alphas:
        s = world.evaluate(prompts, outs[a])
        rows.append((a, s["attribute"], s["grammaticality"]))
        print(f"{a:>7g}  {s['attribute']:>9.2f}  {s['grammaticality']:>11.2f}")
    write_plot(rows, out, title=f"{'demo model' if is_demo else args.model}, layers {layers or vec.layers}")
    print(f"wrote {out}")
    return 0


def write_plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(alphas, [r[1] for r in rows], "o-", label="attribute score (share positive)")
    ax.plot(alphas, [r[2] for r in rows], "s-", label="grammaticality (share parsed)")
    ax.set_xlabel("alpha (steering strength)")
    ax.set_ylim(-0.05, 1.05)
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_title(f"fasteer sweep: strength vs capability\n{title}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
