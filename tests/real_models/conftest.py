"""Shared setup of the real-model tests (SmolLM2-135M, Gemma-3-270M; see `_load.py`)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def real_model_threads():
    """One torch thread. On the project's 2-core machine two threads make a 135M / 270M
    forward only ~1.3x faster when the machine is idle, but 5-20x slower when anything
    else runs beside the tests (OpenMP barriers spin-wait for a descheduled thread;
    measured: 1.8 s vs 8-24 s for a Gemma-3 prompt + 5-token generate). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
