"""`fasteer generate`: continue prompts with steering applied -- what `fasteer extract`
makes, and SAE feature edits.

Steering options (each may be repeated; all of them apply together,
in the order given, --vector first):

  --add FILE[:ALPHA]         h <- h + ALPHA * v                      (fs.Add; ALPHA default 1)
  --clamp FILE[:VALUE]       pin the projection on v's direction to VALUE (fs.Clamp; VALUE
                             default: the per-layer targets in the vector's metadata, as
                             `fasteer extract --method instruction` stores them)
  --ablate FILE              remove v's direction                    (fs.Ablate)
  --feature SAE:K:OP:VALUE   edit SAE feature K: OP is add, set, scale or clamp (VALUE
                             'LO,HI' for clamp, either side may be empty) (fs.FeatureEdit);
                             SAE is a folder / hub id, 'demo' (the demo model's SAE) or a
                             packaged SAE's name ('smollm2')
  --vector FILE --alpha A    the older form of --add FILE:A (still works)

--layers and --positions apply to every vector option; a feature edit acts where its SAE
was trained (its layer and site). Every argument is checked before the model loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UsageError
from . import _common as C

EPILOG = "steering options" + __doc__.split("Steering options", 1)[1]

FEATURE_OPS = ("add", "set", "scale", "clamp")
SCALES = ("raw", "resid")


class _Steer(argparse.Action):
    """Collects --add/--clamp/--ablate/--feature into one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def add_arguments(parser) -> None:
    C.add_model_argument(parser)
    parser.add_argument("--prompt", help="the prompt (or --prompts-file)")
    parser.add_argument("--prompts-file", metavar="FILE", help="one prompt per line")
    parser.add_argument("--add", action=_Steer, dest="steering", const="add",
                        default=[], metavar="FILE[:ALPHA]",
                        help="add ALPHA times the vector in FILE (.safetensors or .gguf; "
                             "ALPHA default 1); repeatable")
    parser.add_argument("--clamp", action=_Steer, dest="steering", const="clamp",
                        default=[], metavar="FILE[:VALUE]",
                        help="clamp the projection on FILE's direction to VALUE (default: the "
                             "per-layer targets stored in the vector's metadata, as "
                             "`extract --method instruction` writes them); repeatable")
    parser.add_argument("--ablate", action=_Steer, dest="steering", const="ablate",
                        default=[], metavar="FILE",
                        help="ablate FILE's direction (e.g. `extract --method ablation`); "
                             "repeatable")
    parser.add_argument("--feature", action=_Steer, dest="steering", const="feature",
                        default=[], metavar="SAE:K:OP:VALUE",
                        help="edit feature K of an SAE (a folder or hub id, 'demo' for the "
                             "demo model's SAE, or a packaged SAE's name such as 'smollm2'); "
                             "OP: add, set, scale or clamp (VALUE 'LO,HI', a side may be "
                             "empty); acts at the SAE's own layer and site; repeatable")
    parser.add_argument("--vector", metavar="FILE",
                        help="steering vector added with --alpha (the same as --add FILE:ALPHA)")
    parser.add_argument("--alpha", default=None,
                        help="strength for --vector (default: 1.0)")
    parser.add_argument("--alpha-scale", default="raw", choices=SCALES,
                        help="raw: alpha multiplies the vector as stored; resid: alpha is a "
                             "fraction of the typical residual norm stored in the vector's "
                             "metadata ('resid_norm') (default: %(default)s)")
    parser.add_argument("--layers", default=None, help="e.g. '3' or '2,5' or '4-7', for every "
                        "vector option (default: each vector's own layers)")
    parser.add_argument("--positions", default="all",
                        choices=["all", "prompt", "generated", "last_prompt"],
                        help="which tokens are steered (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens per continuation (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding instead of sampling (temperature 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--compare", action="store_true", help="also print the unsteered text")
    C.add_quiet_argument(parser)


# ------------------------------------------------------------------ parsing the specs
def _split_number(spec: str, option: str, what: str):
    """'FILE' or 'FILE:NUMBER' -> (file, number or None). The number is the part after the
    last ':' when it parses as one (so 'C:\\v.gguf' or 'a:b/v.gguf' stay paths)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            float(tail)
        except ValueError:
            if Path(head).is_file() and not Path(spec).exists():
                raise UsageError(f"{option} {spec}: {what} must be a number, got {tail!r} "
                                 f"(expected FILE[:{what}])") from None
        else:
            return head, C.parse_float(tail, f"{option} {spec}: {what}")
    return spec, None


def _check_file(path: str, option: str) -> None:
    if not Path(path).is_file():
        raise UsageError(f"{option}: no such file: {path}")


def _parse_feature(spec: str):
    """'SAE:K:OP:VALUE' -> (sae, k, op, value); value a float or (lo, hi) for clamp."""
    parts = spec.rsplit(":", 3)
    if len(parts) != 4 or not all(parts[:3]):
        raise UsageError(f"--feature {spec}: expected SAE:K:OP:VALUE, e.g. demo:73:set:40")
    sae, k, op, value = parts
    try:
        k = int(k)
    except ValueError:
        raise UsageError(f"--feature {spec}: K must be a feature number, got {k!r}") from None
    if k < 0:
        raise UsageError(f"--feature {spec}: K must be >= 0, got {k}")
    if op not in FEATURE_OPS:
        raise UsageError(f"--feature {spec}: unknown OP {op!r}; expected one of "
                         f"{', '.join(FEATURE_OPS)}")
    if op == "clamp":
        bounds = value.split(",")
        if len(bounds) != 2:
            raise UsageError(f"--feature {spec}: clamp takes VALUE 'LO,HI' (a side may be "
                             "empty for no bound)")
        lo, hi = (C.parse_float(b, f"--feature {spec}: VALUE") if b.strip() else None
                  for b in bounds)
        if lo is None and hi is None:
            raise UsageError(f"--feature {spec}: clamp needs at least one bound")
        if lo is not None and hi is not None and lo > hi:
            raise UsageError(f"--feature {spec}: clamp bounds need LO <= HI")
        return sae, k, op, (lo, hi)
    if not value:
        raise UsageError(f"--feature {spec}: VALUE is missing (expected SAE:K:OP:VALUE)")
    return sae, k, op, C.parse_float(value, f"--feature {spec}: VALUE")


def _sae_location(name: str, spec: str) -> str:
    """The folder (or hub id) an SAE name stands for; a local path must exist."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name == "demo":
        from ..demo.sae import SAE_DIR
        return str(SAE_DIR)
    from ..sae.packaged import PACKAGED_SAES, packaged_sae_path
    if name in PACKAGED_SAES:
        try:
            return str(packaged_sae_path(name))
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--feature {spec}: {exc}") from None
    looks_hub = (name.count("/") >= 1 and not name.startswith((".", "/", "~"))
                 and not name.endswith("/"))
    if not looks_hub:
        raise UsageError(f"--feature {spec}: no such SAE folder: {name}")
    return name


def parse_steering(args) -> list[tuple]:
    """The steering options as [(kind, ...)] in command-line order, syntax checked and
    files checked to exist -- nothing loaded yet."""
    specs = []
    if args.vector is not None:
        alpha = C.parse_float(args.alpha if args.alpha is not None else "1.0", "--alpha")
        specs.append(("add", "--vector", args.vector, alpha))
    elif args.alpha is not None:
        C.parse_float(args.alpha, "--alpha")
        raise UsageError("--alpha: goes with --vector FILE (for --add write FILE:ALPHA)")
    for kind, spec in args.steering:
        option = f"--{kind}"
        if kind == "add":
            path, alpha = _split_number(spec, option, "ALPHA")
            specs.append(("add", option, path, 1.0 if alpha is None else alpha))
        elif kind == "clamp":
            path, value = _split_number(spec, option, "VALUE")
            specs.append(("clamp", option, path, value))
        elif kind == "ablate":
            specs.append(("ablate", option, spec, None))
        else:
            specs.append(("feature", option, spec, _parse_feature(spec)))
    if not specs:
        raise UsageError("nothing to steer with: give --add FILE[:ALPHA], --clamp FILE[:VALUE], "
                         "--ablate FILE, --feature SAE:K:OP:VALUE or --vector FILE")
    for kind, option, path, _ in specs:
        if kind != "feature":
            _check_file(path, option)
    return specs


def build_interventions(specs, config, *, layers, positions, alpha_scale="raw"):
    """[(label, intervention)] for the parsed specs, every vector/SAE loaded and checked
    against the model's config (width, layers) -- still before the model loads."""
    import fasteer as fs
    n_layers = config.num_hidden_layers
    out = []
    for kind, option, path, param in specs:
        if kind == "feature":
            out.append(_feature_edit(fs, path, param, config, positions))
            continue
        vec = C.load_vector(path, config, option)
        if layers is None:
            bad = [l for l in vec.layers if l >= n_layers]
            if bad:
                raise UsageError(f"{option}: {path} has layers {bad}; the model has {n_layers} "
                                 f"(0..{n_layers - 1}); pick some with --layers")
        try:
            if kind == "add":
                extra = {"scale": alpha_scale} if alpha_scale != "raw" else {}
                try:
                    iv = fs.Add(vec, alpha=param, layers=layers, positions=positions, **extra)
                except TypeError as exc:
                    if extra and "scale" in str(exc):
                        raise UsageError("--alpha-scale resid: this fasteer's fs.Add has no "
                                         "scale= yet") from None
                    raise
                label = f"add {path} x{param:g}{' (resid)' if extra else ''}"
            elif kind == "clamp":
                iv = fs.Clamp(vec, value=param, layers=layers, positions=positions)
                label = (f"clamp {path} to {param:g}" if param is not None else
                         f"clamp {path} to its stored targets {iv.value}")
            else:
                iv = fs.Ablate(vec, layers=layers, positions=positions)
                label = f"ablate {path}"
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{option} {path}: {exc}") from None
        out.append((label, iv))
    return out


def _feature_edit(fs, spec, parsed, config, positions):
    name, k, op, value = parsed
    location = _sae_location(name, spec)
    try:
        sae = fs.SAE.load(location)
    except Exception as exc:  # noqa: BLE001 - any unreadable SAE is the user's input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--feature {spec}: cannot load the SAE: {first}") from None
    if sae.d_in != config.hidden_size:
        raise UsageError(f"--feature {spec}: the SAE reads width {sae.d_in}, the model has "
                         f"{config.hidden_size}")
    if sae.layer is None or not 0 <= sae.layer < config.num_hidden_layers:
        raise UsageError(f"--feature {spec}: the SAE was trained at layer {sae.layer}; the model "
                         f"has layers 0..{config.num_hidden_layers - 1}")
    if not 0 <= k < sae.d_sae:
        raise UsageError(f"--feature {spec}: K must be in 0..{sae.d_sae - 1} (the SAE has "
                         f"{sae.d_sae} features), got {k}")
    try:
        iv = fs.FeatureEdit(sae, feature=k, op=op, value=value, positions=positions)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--feature {spec}: {exc}") from None
    shown = value if op != "clamp" else f"[{value[0]}, {value[1]}]"
    return f"feature {k} {op} {shown} ({name}, {sae.site}[{sae.layer}])", iv


def run(args) -> int:
    import fasteer as fs
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens: expected a positive number")
    C.check_model_name(args.model)
    specs = parse_steering(args)
    prompts = C.read_prompts(args.prompt, args.prompts_file)
    config = C.model_config(args.model)
    layers = C.parse_layers(args.layers, config.num_hidden_layers)
    steering = build_interventions(specs, config, layers=layers, positions=args.positions,
                                   alpha_scale=args.alpha_scale)
    legacy = len(specs) == 1 and specs[0][1] == "--vector"
    model, tok, _ = C.load_model(args.model, args.device, args.dtype)
    progress = C.progress_enabled(args.quiet)
    if args.compare:
        plain = C.generate_rows(model, tok, prompts, args.max_new_tokens, seed=args.seed,
                                do_sample=not args.greedy, progress=progress,
                                desc="unsteered")
    try:
        st = fs.steer(model, *(iv for _, iv in steering))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"steering: {exc}") from None
    with st:
        texts = C.generate_rows(model, tok, prompts, args.max_new_tokens, seed=args.seed,
                                do_sample=not args.greedy, progress=progress, desc="steered")
    if not legacy:
        print("steering: " + "; ".join(label for label, _ in steering))
    tag = f"alpha {specs[0][3]:g}" if legacy else "steered"
    for i, (p, t) in enumerate(zip(prompts, texts)):
        if args.compare:
            print(f"[{i}] unsteered: {p} {plain[i].strip()}")
        print(f"[{i}] {tag}: {p} {t.strip()}")
    return 0
