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
    C.add_quiet_argument(parser)


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
    progress = C.progress_enabled(args.quiet)
    model, tok, is_demo = C.load_model(args.model, args.device, args.dtype)
    n_layers = config.num_hidden_layers
    if vec is None:
        layers = layers or [world.DEMO_LAYER if is_demo else n_layers // 2]
        pairs = language.contrastive_pairs(world.DEMO_PAIRS)
        vec = fs.extract.caa(model, tok, [p for p, _ in pairs], [n for _, n in pairs],
                             layers=layers, progress=progress)
    prompts = language.neutral_prompts(args.prompts)
    print(f"sweep: {len(alphas)} alphas x {len(prompts)} prompts in one batched generate "
          f"({len(alphas) * len(prompts)} rows)")
    outs = C.sweep_generate(model, tok, vec, alphas, prompts, layers=layers,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            top_p=world.DEMO_TOP_P, progress=progress)
    rows = sweep_rows(prompts, outs, alphas, seed=args.seed)
    print(f"{'alpha':>7}  {'attribute':>9}  {'grammatical':>11}   (95% bootstrap intervals "
          f"over the {len(prompts)} prompts)")
    for r in rows:
        a, g = r["attribute"], r["grammaticality"]
        attr = f"{a[0]:>9.2f}" if a is not None else f"{'-':>9}"
        span = f" [{a[1]:.2f}, {a[2]:.2f}]" if a is not None else ""
        print(f"{r['alpha']:>7g}  {attr}  {g[0]:>11.2f}   attribute{span}, grammatical "
              f"[{g[1]:.2f}, {g[2]:.2f}]")
    write_plot(rows, out, title=f"{'demo model' if is_demo else args.model}, "
                                f"layers {layers or vec.layers}")
    print(f"wrote {out}")
    return 0


def sweep_rows(prompts, outs, alphas, *, seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """Per alpha: ``attribute`` and ``grammaticality`` as (mean, low, high) with 95%
    percentile-bootstrap intervals over prompts (`fasteer.evaluate.stats.bootstrap`), and
    ``n`` (prompts) / ``scored`` (continuations with a sentiment word, which the attribute
    is the mean over; ``attribute`` is None when none has one).

    The means are exactly `fasteer.demo.world.evaluate`'s numbers."""
    import torch

    from ..demo import language
    from ..evaluate.stats import bootstrap
    rows = []
    for i, a in enumerate(alphas):
        texts = outs[a]
        attr = [s for s in (language.attribute_score(t) for t in texts) if s is not None]
        gram = [float(language.is_grammatical(f"{p} {t}".strip())) for p, t in zip(prompts, texts)]
        g = bootstrap({"grammaticality": torch.tensor(gram)}, n_boot=n_boot,
                      seed=seed + i)["grammaticality"]
        at = (bootstrap({"attribute": torch.tensor(attr)}, n_boot=n_boot,
                        seed=seed + i)["attribute"] if attr else None)
        rows.append(dict(alpha=a, attribute=at, grammaticality=g, n=len(texts),
                         scored=len(attr)))
    return rows


def sweep_figure(rows, title: str):
    """The sweep plot as a matplotlib Figure: attribute and grammaticality against alpha,
    each with its 95% bootstrap interval as error bars; n in the title; the dotted line at
    0.5 is where a text has as many positive as negative sentiment words."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    series = (("attribute", "o-", "tab:blue",
               "attribute: share of positive sentiment words"),
              ("grammaticality", "s-", "tab:orange", "grammaticality: share of texts that parse"))
    for key, style, color, label in series:
        pts = [(r["alpha"], r[key]) for r in rows if r[key] is not None]
        xs = [x for x, _ in pts]
        mean = [v[0] for _, v in pts]
        err = [[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]]
        ax.errorbar(xs, mean, yerr=err, fmt=style, color=color, label=label, capsize=3,
                    lw=1.5, ms=4, elinewidth=1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":",
               label="0.5: as many positive as negative words")
    ax.set_xlabel("alpha (steering strength)")
    ax.set_ylabel("score (mean over prompts, 95% bootstrap CI)")
    ax.set_ylim(-0.05, 1.05)
    n = rows[0]["n"] if rows else 0
    ax.set_title(f"fasteer sweep: strength vs capability\n{title} · n = {n} prompts per alpha",
                 fontsize=10)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plot(rows, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt
    fig = sweep_figure(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
