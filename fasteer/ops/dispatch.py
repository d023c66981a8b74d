"""Which backend runs an op: availability (with the reason when not) and the choice.

The choice is made per call from the tensors' device and the row count, unless the
caller names a backend (argument, or the FASTEER_BACKEND environment variable). Nothing
here touches CUDA at import time: availability is probed lazily, on first use.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil

BACKENDS = ("reference", "cpu", "triton", "cuda")

# On CUDA tensors, row counts up to this use the CUDA kernel (launch-bound decode work);
# larger ones use Triton when it is available. A documented default until a GPU
# measurement in benchmarks/results/ replaces it.
CUDA_ROWS_CROSSOVER = 64


@functools.lru_cache(maxsize=None)
def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return None, f"{type(exc).__name__}: {exc}"


def cpu_module():
    """`fasteer._C`, or None."""
    return _import("fasteer._C")[0]


def cuda_module():
    """`fasteer._cuda`, or None. Importing it does not initialise CUDA."""
    return _import("fasteer._cuda")[0]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status() -> dict[str, tuple[bool, str]]:
    """name -> (available, why or what). Probes CUDA, so call it only when asked."""
    status: dict[str, tuple[bool, str]] = {"reference": (True, "plain PyTorch, any device")}

    mod, err = _import("fasteer._C")
    if mod is not None:
        status["cpu"] = (True, f"fasteer._C ({mod.build_info()})")
    else:
        status["cpu"] = (False, f"fasteer._C not importable ({err}); reinstall with `pip install -e .`")

    import torch
    cuda_ok = torch.cuda.is_available()
    triton, terr = _import("triton")
    if triton is None:
        status["triton"] = (False, "triton not installed")
    elif cuda_ok:
        status["triton"] = (True, f"triton {triton.__version__} on CUDA")
    elif triton_interpreting():
        status["triton"] = (True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)")
    else:
        status["triton"] = (False, f"triton {triton.__version__} installed, no CUDA device "
                                   "(TRITON_INTERPRET=1 runs it on the CPU)")

    cmod, cerr = _import("fasteer._cuda")
    if cmod is None:
        built = "no nvcc at build time" if "No module named" in (cerr or "") else cerr
        status["cuda"] = (False, f"not built ({built})")
    elif not cuda_ok:
        status["cuda"] = (False, f"built for sm_{','.join(cmod.archs())}; no CUDA device here")
    else:
        status["cuda"] = (True, f"built for sm_{','.join(cmod.archs())}")
    return status


def requested_backend(backend: str | None) -> str:
    """The backend asked for by argument or environment, or 'auto'."""
    name = backend or os.environ.get("FASTEER_BACKEND") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")
    return name


def preflight(device_type: str) -> str:
    """Check FASTEER_BACKEND against a device type before any work starts.

    Returns what a call on that device will use ('cpu', 'reference', ...; on CUDA, 'auto'
    stays 'auto': the choice there depends on the row count). Raises ValueError for a
    name that is not a backend and RuntimeError for one that cannot run on the device,
    with the same messages an op call would give later."""
    name = requested_backend(None)
    if device_type == "cpu":
        return _resolve_cpu(name)
    if device_type == "cuda" and name == "auto":
        return name
    return _resolve_device(name, device_type, 1)


_CPU_RESOLVED: dict[str, str] = {}


def resolve(name: str, device_type: str, n_rows: int) -> str:
    """Turn 'auto' (or a named backend) into one that can run on this device.

    Called on every op call: the CPU answers for 'auto', 'cpu' and 'reference' do not
    change within a process and are cached (decode-size calls are a few µs in all)."""
    if device_type == "cpu":
        cached = _CPU_RESOLVED.get(name)
        if cached is not None:
            return cached
        resolved = _resolve_cpu(name)
        if name in ("auto", "cpu", "reference"):
            _CPU_RESOLVED[name] = resolved
        return resolved
    return _resolve_device(name, device_type, n_rows)


def _resolve_cpu(name: str) -> str:
    if name == "auto":
        return "cpu" if cpu_module() is not None else "reference"
    if name == "cpu" and cpu_module() is None:
        raise RuntimeError("backend 'cpu': fasteer._C is not built; reinstall with `pip install -e .`")
    if name == "cuda":
        raise RuntimeError("backend 'cuda' needs CUDA tensors; these are on the CPU")
    if name == "triton" and not triton_interpreting():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(set before fasteer.kernels is imported)")
    return name


def _resolve_device(name: str, device_type: str, n_rows: int) -> str:
    if device_type == "cuda":
        have_cuda = cuda_module() is not None
        have_triton = _import("triton")[0] is not None
        if name == "auto":
            if have_cuda and (n_rows <= CUDA_ROWS_CROSSOVER or not have_triton):
                return "cuda"
            return "triton" if have_triton else "reference"
        if name == "cuda" and not have_cuda:
            raise RuntimeError("backend 'cuda': fasteer._cuda is not built (no nvcc at build time?)")
        if name == "triton" and not have_triton:
            raise RuntimeError("backend 'triton': triton is not installed")
        if name == "cpu":
            raise RuntimeError("backend 'cpu' needs CPU tensors; these are on CUDA")
        return name
    if name in ("auto", "reference"):
        return "reference"
    raise RuntimeError(f"backend {name!r} does not run on device type {device_type!r}")


def nvcc_path() -> str | None:
    return shutil.which("nvcc")
