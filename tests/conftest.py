import os
import sys

# Triton kernels run on CPU tensors through Triton's interpreter; it must be switched on
# before any test module imports triton or fasteer.kernels (a @triton.jit function made
# without it cannot be interpreted later). The GPU kernels are exercised by
# `python -m fasteer.selftest` on a CUDA machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import shared helpers (steer_oracle, hook_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# The vLLM host's engine tests need vLLM, which lives in its own environment (it pins its
# own transformers): tests/run.sh runs them there with `pytest tests/serving_vllm`.
import importlib.util  # noqa: E402

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["serving_vllm"]
