"""`python -m fasteer.selftest`: the one command to run on a CUDA machine.

It builds nothing: it checks the installed kernels (`cuda`, `triton`) against the
`reference` backend and a float64 computation at real sizes, checks `torch.compile`
and CUDA-graph capture of a patched model, runs a short kernel benchmark, and writes
JSON plus a markdown summary. On a machine without CUDA it says so and exits 0.
"""
from .run import main

__all__ = ["main"]
