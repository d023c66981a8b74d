"""Triton launchers of the fasteer ops (grids, block sizes, warps; no math here).

The kernels live in `fasteer.kernels` (source: the top-level ``kernels/`` directory; see
that package's docstring for how it is found installed and in a checkout).
"""
from __future__ import annotations

import importlib


def kernels_module(name: str):
    """Import ``fasteer.kernels.<name>``."""
    return importlib.import_module(f"fasteer.kernels.{name}")
