"""`fasteer info`: version, torch, and each backend's availability with the reason.

``fasteer info --model NAME_OR_PATH`` instead loads that model (``demo``, ``smollm2``,
``gemma3``, a local Hugging Face folder or a hub id; causal LMs, else any ``AutoModel``
such as an encoder) and prints which carrier each site gets per layer and why: a table
entry, a probe verdict (`fasteer.carrier_probe`) or the hook fallback with its reason."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.add_argument("--model", default=None,
                        help="show the carriers fasteer installs in this model: 'demo', "
                             "'smollm2', 'gemma3', a local Hugging Face folder or a hub id")
    parser.add_argument("--layers-path", default=None,
                        help="with --model: the attribute path of the layer list (e.g. "
                             "encoder.layer), as fasteer.patch(model, layers_path=...)")


def collect() -> dict:
    import torch

    from .. import __version__
    from ..ops import backend_status
    from ..ops.dispatch import CUDA_ROWS_CROSSOVER, preflight

    info = {
        "fasteer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {name: {"available": ok, "detail": why}
                     for name, (ok, why) in backend_status().items()},
        "cuda_rows_crossover": CUDA_ROWS_CROSSOVER,
        "fasteer_backend_env": os.environ.get("FASTEER_BACKEND"),
        "active_backend": {},
        "backend_problem": None,
    }
    for device_type in ["cpu"] + (["cuda"] if info["cuda_device"] else []):
        try:
            name = preflight(device_type)
        except (ValueError, RuntimeError) as exc:
            info["backend_problem"] = f"FASTEER_BACKEND={info['fasteer_backend_env']!r}: {exc}"
            break
        if name == "auto":
            name = (f"auto (cuda for <= {CUDA_ROWS_CROSSOVER} rows, else triton when "
                    "available)")
        info["active_backend"][device_type] = name
    try:
        import transformers
        info["transformers"] = transformers.__version__
        from ..models import status
        info["real_models"] = status()
    except ImportError:
        info["transformers"] = None
        info["real_models"] = {}
    info["packaged_saes"] = _packaged_saes()
    return info


def _packaged_saes() -> dict:
    """{model name: one-line description} of the SAEs shipped in the package (read from
    their cfg.json / training.json, no weights loaded)."""
    import json

    from ..sae.packaged import PACKAGED_SAES, packaged_sae_path
    out = {}
    for name in PACKAGED_SAES:
        try:
            folder = packaged_sae_path(name)
            cfg = json.loads((folder / "cfg.json").read_text())
            q = json.loads((folder / "training.json").read_text())["quality_held_out"]
            out[name] = (f"{cfg['d_sae']} ReLU features at {cfg['hook_name']} "
                         f"(FVE {q['fve']:.2f}, L0 {q['mean_l0']:.0f}; {folder})")
        except (OSError, KeyError, ValueError) as exc:
            out[name] = f"unreadable: {exc}"
    return out


def run(args) -> int:
    if args.model is not None:
        return run_model(args)
    if args.layers_path is not None:
        from ..cli import UsageError
        raise UsageError("--layers-path needs --model")
    info = collect()
    if args.json:
        import json
        print(json.dumps(info, indent=2))
        return 0
    print(f"fasteer {info['fasteer']}  (python {info['python']}, torch {info['torch']}, "
          f"transformers {info['transformers']})")
    print(f"CUDA device: {info['cuda_device'] or 'none'}")
    print("backends:")
    for name, b in info["backends"].items():
        mark = "yes" if b["available"] else "no "
        print(f"  {name:<10} {mark}  {b['detail']}")
    chosen = info["fasteer_backend_env"] or "unset, so auto"
    if info["backend_problem"]:
        print(f"active backend: none -- {info['backend_problem']}")
        print(f"fasteer info: warning: {info['backend_problem']}", file=sys.stderr)
    else:
        for device_type, name in info["active_backend"].items():
            print(f"active backend on {device_type} tensors: {name}  (FASTEER_BACKEND {chosen})")
    if info["real_models"]:
        print("real models (--model NAME for demo, eval, generate, ...):")
        for name, m in info["real_models"].items():
            where = (f"converted: {m['folder']}" if m["folder"] else "converted on first use")
            print(f"  {name:<10} {'yes' if m['installed'] else 'no '}  "
                  f"{where if m['installed'] else 'install: ' + m['install']}")
    if info["packaged_saes"]:
        print("packaged SAEs (fasteer.sae.packaged.load_packaged_sae(NAME)):")
        for name, line in info["packaged_saes"].items():
            print(f"  {name:<10} {line}")
    return 0


# --------------------------------------------------------------------------- --model

_SITE_KEYS = {"resid_pre": "pre", "resid_mid": "mid", "attn_out": "attn", "mlp_out": "mlp"}


def _load_any(name: str):
    """The model for ``--model`` (no tokenizer): the demo, a packaged model, or a HF
    folder / hub id as a causal LM, else as ``AutoModel`` (encoders)."""
    from ..cli import UsageError
    from ._common import DEMO, _quiet_weight_loading, load_model, resolve_model
    if name == DEMO:
        return load_model(name)[0]
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    path = resolve_model(name)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    errors = []
    with _quiet_weight_loading(enabled=looks_local):
        try:
            # the class the checkpoint was saved from (a BertModel is not a BertLMHeadModel)
            archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
        except (OSError, ValueError, KeyError):
            archs = []
        saved = [getattr(transformers, a, None) for a in archs[:1]]
        for auto in [c for c in saved if c is not None] + [AutoModelForCausalLM, AutoModel]:
            try:
                return auto.from_pretrained(path).eval()
            except (OSError, ValueError, KeyError) as exc:
                errors.append(str(exc).strip().splitlines()[0] if str(exc).strip()
                              else type(exc).__name__)
    raise UsageError(f"--model: cannot load {name!r}: {errors[-1]}")


def _module_names(root) -> dict:
    return {id(m): n for n, m in root.named_modules()}


def _carrier_text(sites, point, root, where: str = "") -> str:
    """One carrier in words: 'norm input_layernorm (LlamaRMSNorm, RMS)'."""
    from ..ops import layout as L
    mod = point.module
    cls = type(mod).__name__
    if point.kind == "norm":
        flavour = "RMS" if point.flavour.norm_kind == L.NORM_RMS else "LayerNorm"
        name = _module_names(root).get(id(mod), "?")
        return f"norm {name}{where} ({cls}, {flavour})"
    name = _module_names(root).get(id(mod), "")
    target = f"{name} ({cls})" if name else f"the layer ({cls})"
    if point.kind == "output" and mod is sites.layers[-1] and point.key[0] == "pre":
        target = f"the last layer ({cls})"
    return f"{point.kind} hook on {target}{where}"


def _ranges(layers: list[int]) -> str:
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return "layer" + ("s " if len(layers) > 1 else " ") + ",".join(runs)


def _grouped(items: list[tuple[int, str]]) -> list[dict]:
    """[(layer, text)] -> [{"layers": "layers 0-3", "carrier": text}], first-seen order."""
    groups: dict[str, list[int]] = {}
    for l, text in items:
        groups.setdefault(text, []).append(l)
    return [{"layers": _ranges(ls), "carrier": text} for text, ls in groups.items()]


def carrier_report(sites) -> dict:
    """What `fasteer.sites.model_sites` resolved, per site and layer, JSON-able."""
    spec, n = sites.spec, sites.n_layers
    owner_name = _module_names(sites.model).get(id(sites.owner), "") or "the model"
    report = {"class": type(sites.model).__name__, "model_type": sites.model_type,
              "layers_path": sites.layers_path, "n_layers": n, "hidden": sites.hidden,
              "architecture": spec.name, "source": sites.source, "verdict": sites.verdict,
              "sites": {}}
    for site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        if site == "resid_mid" and spec.resid_mid is None:
            report["sites"][site] = {"unavailable": spec.no_mid_reason}
            continue
        if site in ("attn_out", "mlp_out") and getattr(spec, site) is None:
            report["sites"][site] = {"unavailable": spec.no_component_reason}
            continue
        items = []
        for l in range(n):
            if site == "resid_post":
                if l < n - 1:
                    items.append((l, "the carrier of resid_pre of the next layer"))
                    continue
                pt = sites.points[("pre", n)]
                where = f" of {owner_name}" if pt.kind == "norm" else ""
                items.append((l, _carrier_text(sites, pt, sites.owner if pt.kind == "norm"
                                               else sites.layers[l], where)))
                continue
            pt = sites.points[(_SITE_KEYS[site], l)]
            items.append((l, _carrier_text(sites, pt, sites.layers[l])))
        report["sites"][site] = {"carriers": _grouped(items)}
    return report


def run_model(args) -> int:
    import warnings

    from ..cli import UsageError
    from ._common import check_model_name
    check_model_name(args.model)          # cheap checks before the heavy imports
    model = _load_any(args.model)
    from ..sites import model_sites
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the verdict is printed below
            sites = model_sites(model, layers_path=args.layers_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report = carrier_report(sites)
    report["model"] = args.model
    if args.json:
        import json
        print(json.dumps(report, indent=2))
        return 0
    how = {"table": "carriers from fasteer's table", "probe": "carriers verified by a probe",
           "hooks": "hook fallback"}[sites.source]
    print(f"model {args.model}: {report['class']}, model type {report['model_type']!r}, "
          f"{report['n_layers']} layers at {report['layers_path']}, hidden {report['hidden']}")
    print(f"{how} [{report['architecture']}]: {report['verdict']}")
    for site, entry in report["sites"].items():
        if "unavailable" in entry:
            print(f"  {site:<11} unavailable: {entry['unavailable']}")
            continue
        for i, g in enumerate(entry["carriers"]):
            label = site if i == 0 else ""
            print(f"  {label:<11} {g['layers']}: {g['carrier']}")
    return 0
