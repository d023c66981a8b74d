import os
import sys

# Triton kernels run on CPU tensors through Triton's interpreter; it must be switched on
# before any test module imports triton or fasteer.kernels (a @triton.jit function made
# without it cannot be interpreted later). The GPU kernels are exercised by
# `python -m fasteer.selftest` on a CUDA machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import shared helpers (steer_oracle, hook_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
