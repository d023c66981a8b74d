"""Triton launchers of the fasteer ops (grids, block sizes, warps; no math here).

The kernels live in `fasteer.kernels` (the top-level ``kernels/`` directory, mapped to
that name by setup.py). In a source checkout that was not installed, `fasteer.kernels`
does not exist yet; :func:`kernels_module` then loads ``kernels/`` from beside the
``fasteer/`` directory under the same name, so the tests and the interpreter path work
without an install and the installed layout is never shadowed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def kernels_module(name: str):
    """Import ``fasteer.kernels.<name>`` (installed, or from the source checkout)."""
    try:
        importlib.import_module("fasteer.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "fasteer.kernels":
            raise
        source = Path(__file__).resolve().parents[3] / "kernels"
        if not (source / "__init__.py").is_file():
            raise ModuleNotFoundError(
                "fasteer.kernels is not installed and no kernels/ directory was found beside "
                f"the fasteer package (looked in {source}); reinstall with `pip install -e .`",
                name="fasteer.kernels") from None
        spec = importlib.util.spec_from_file_location(
            "fasteer.kernels", source / "__init__.py", submodule_search_locations=[str(source)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fasteer.kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"fasteer.kernels.{name}")
