"""fasteer inside vLLM: per-request steering with the fused steer+norm kernels.

Install fasteer next to vLLM and point ``FASTEER_VLLM_REGISTRY`` at a JSON file naming
the vectors and SAEs the server offers; vLLM then loads the plugin
(`fasteer.hosts.vllm.plugin`) in every process. Each request says how it is steered in
``SamplingParams.extra_args["fasteer"]`` (over HTTP: ``vllm_xargs``), in the JSON form
of `fasteer.hosts.vllm.spec`. Requests without it are untouched, in the same batch.

Offline::

    import fasteer.hosts.vllm as fv
    fv.enable("registry.json")              # before creating the LLM
    llm = LLM(model=...)
    params = SamplingParams(max_tokens=32, extra_args=fv.extra_args(
        {"add": "happy", "alpha": 4.0, "layers": [10]}))

See docs/serving.md for the server.
"""
from __future__ import annotations

import os

from .spec import REGISTRY_ENV, SPEC_KEY, Registry, SpecError

__all__ = ["enable", "extra_args", "Registry", "SpecError", "SPEC_KEY"]


def enable(registry: str | os.PathLike) -> None:
    """Turn the plugin on in this process and the processes vLLM starts from it."""
    path = os.fspath(registry)
    Registry.from_file(path)       # fail here, not inside the engine
    os.environ[REGISTRY_ENV] = os.path.abspath(path)
    from . import plugin, spec
    spec.registry_from_env.cache_clear()
    plugin.register()


def extra_args(*interventions, **other) -> dict:
    """``SamplingParams(extra_args=...)`` for these interventions (JSON objects)."""
    return {SPEC_KEY: list(interventions), **other}
