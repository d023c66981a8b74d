"""Registration with vLLM (entry point group ``vllm.general_plugins``).

vLLM calls `register` in every process it starts (API server, engine core, workers). It
does nothing unless ``FASTEER_VLLM_REGISTRY`` names a registry file, so installing
fasteer next to vLLM changes nothing by itself. When configured it wraps three vLLM
methods, each in the process where it runs:

* ``InputProcessor.process_inputs`` (front end): a request's ``fasteer`` spec is parsed
  and checked against the model and the registry -- a bad one raises ``ValueError``,
  which vLLM answers with HTTP 400 for that request only -- and the request's prefix-cache
  salt gets the steering's hash, so KV blocks are shared only between requests with
  equal steering (an unsteered request never reuses a steered block, nor the reverse).
* ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (worker): right after the
  weights load, before vLLM compiles or captures the model, the carriers are installed
  (`fasteer.hosts.vllm.steering.VllmSteering`). Every tensor-parallel rank installs the
  same tables: the residual stream is replicated across ranks.
* ``GPUModelRunner._model_forward`` (worker, once per engine step): the step's per-token
  slots are computed from the runner's batch view and written into the slot buffer.

vLLM's V2 model runner keeps another batch view; the plugin sets
``VLLM_USE_V2_MODEL_RUNNER=0`` and refuses to start if it was asked for explicitly.
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np

# a child of vLLM's logger: its handlers and level (INFO) apply, in every process
logger = logging.getLogger("vllm.fasteer")
_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point (safe to call more than once)."""
    global _REGISTERED
    from .spec import REGISTRY_ENV, registry_from_env

    if _REGISTERED or not os.environ.get(REGISTRY_ENV):
        return
    registry_from_env()   # a broken registry stops the server at start, not at a request
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False", ""):
        raise RuntimeError("fasteer's vLLM host routes steering from the V1 model runner's "
                           "batch view; unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    _patch_input_processor()
    _patch_runners()
    _REGISTERED = True
    logger.info("fasteer: steering enabled (registry %s)", os.environ[REGISTRY_ENV])


# ----------------------------------------------------------------------------- front end
def _model_shape(model_config) -> tuple[int, int]:
    cfg = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_fasteer", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from .spec import SpecError, parse, raw_spec, registry_from_env, salt

        try:
            raw = raw_spec(getattr(params, "extra_args", None))
            if raw is not None:
                n_layers, hidden = _model_shape(self.model_config)
                parse(raw, registry_from_env(), n_layers, hidden)
        except SpecError as exc:
            raise _request_error(str(exc)) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if raw is not None:
            tag = salt(raw)
            request.cache_salt = f"{request.cache_salt}|{tag}" if request.cache_salt else tag
        return request

    process_inputs._fasteer = True
    InputProcessor.process_inputs = process_inputs


def _request_error(message: str) -> Exception:
    """The error for a bad steering spec: vLLM's client-error type (the server answers
    HTTP 400 for that request alone) that is also a ValueError (what the offline API and
    `fasteer.hosts.vllm.SpecError` users catch)."""
    from vllm.exceptions import VLLMValidationError

    global _RequestError
    if _RequestError is None:
        class FasteerRequestError(VLLMValidationError, ValueError):
            pass
        _RequestError = FasteerRequestError
    return _RequestError(message, parameter="vllm_xargs.fasteer")


_RequestError = None


# ----------------------------------------------------------------------------- worker
def _patch_runners() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        classes.append(CPUModelRunner)
    except ImportError:   # a GPU build without the CPU runner
        pass
    for cls in classes:
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_fasteer", False):
            continue
        cls.load_model = _wrap_load_model(original)
    forward = GPUModelRunner._model_forward
    if not getattr(forward, "_fasteer", False):
        GPUModelRunner._model_forward = _wrap_model_forward(forward)


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(self)
        return result
    load_model._fasteer = True
    return load_model


def install(runner) -> None:
    """Put the carriers on ``runner``'s model (idempotent)."""
    from .spec import registry_from_env
    from .steering import Capacity, VllmSteering

    if getattr(runner, "_fasteer_steering", None) is not None:
        return
    model = runner.get_model()
    model_config = runner.model_config
    cfg = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    sizes = getattr(runner.compilation_config, "cudagraph_capture_sizes", None) or [0]
    max_tokens = max(int(runner.max_num_tokens), max(sizes)) + 8
    runner._fasteer_steering = VllmSteering(
        model, cfg.model_type, registry_from_env(), max_tokens=max_tokens,
        capacity=Capacity.from_env(int(runner.max_num_reqs)),
        backend=os.environ.get("FASTEER_BACKEND") or None)
    logger.info("fasteer: carriers on %d stream points of %s",
                len(runner._fasteer_steering.carriers), type(model).__name__)


def _wrap_model_forward(original):
    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        steering = getattr(self, "_fasteer_steering", None)
        if steering is not None:
            route_step(self, steering)
        return original(self, *args, **kwargs)
    _model_forward._fasteer = True
    return _model_forward


def route_step(runner, steering) -> None:
    """The V1 runner's batch view -> per-token slots (see `fasteer.hosts.vllm.routing`)."""
    batch = runner.input_batch
    n = batch.num_reqs
    requests = runner.requests
    keys = [steering.request_key(rid, requests[rid].sampling_params)
            for rid in batch.req_ids[:n]]
    if len(steering._request_keys) > 2 * len(requests) + 16:
        steering.forget_requests(requests)
    qsl = np.asarray(runner.query_start_loc.np[:n + 1])
    steering.prepare_step(keys, qsl, np.asarray(batch.num_computed_tokens_cpu[:n]),
                          np.asarray(batch.num_prompt_tokens[:n]))
