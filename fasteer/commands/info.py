"""`fasteer info`: version, torch, and each backend's availability with the reason."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def collect() -> dict:
    import torch

    from .. import __version__
    from ..ops import backend_status
    from ..ops.dispatch import CUDA_ROWS_CROSSOVER

    info = {
        "fasteer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {name: {"available": ok, "detail": why}
                     for name, (ok, why) in backend_status().items()},
        "cuda_rows_crossover": CUDA_ROWS_CROSSOVER,
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


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
    return 0
