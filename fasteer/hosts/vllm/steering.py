"""The steering state of one vLLM worker: carriers, fixed tables, and the per-step plan.

Every distinct steering a running request asks for (its canonical spec) is one plan
*request* (`fasteer.plan.compile_plan`), so requests with equal steering share slots.
When a step brings a spec that is not planned yet, the plan is recompiled over the specs
of the requests in that step and written into the tables **in place**. The tables have a
fixed capacity, chosen at start-up (``slots``, ``edits`` per slot, ``bank_rows`` per
point): vLLM compiles (and on GPUs captures) the model once, so no buffer a carrier reads
may ever be reallocated. A plan that does not fit raises with the setting to raise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from fasteer.plan import CompiledPlan, LoweringContext, N_CLASSES, Request, SlotTables, \
    compile_plan

from . import routing
from .carriers import NormCarrier, StepBuffers, VllmSites
from .spec import Registry, canonical, parse, raw_spec


@dataclass(frozen=True)
class Capacity:
    slots: int
    edits: int
    bank_rows: int

    @classmethod
    def from_env(cls, max_num_seqs: int) -> "Capacity":
        def env_int(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}: expected a positive integer, got {raw!r}") from None
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
            return value
        # one request can need up to 3 slots (prompt / last prompt / generated tokens)
        return cls(env_int("FASTEER_VLLM_SLOTS", 3 * max_num_seqs),
                   env_int("FASTEER_VLLM_EDITS", 16),
                   env_int("FASTEER_VLLM_BANK_ROWS", 128))


class VllmSteering:
    """Installed on a model runner after its model is loaded (before vLLM compiles it)."""

    def __init__(self, model: nn.Module, model_type: str, registry: Registry, *,
                 max_tokens: int, capacity: Capacity, backend: str | None = None):
        self.sites = VllmSites(model, model_type)
        self.registry, self.capacity = registry, capacity
        device = self.sites.modules[("pre", 0)].weight.device
        self.ctx = LoweringContext(n_layers=self.sites.n_layers, hidden=self.sites.hidden,
                                   model_type=model_type)
        self.buffers = StepBuffers.allocate(max_tokens, device)
        self.tables = {key: SlotTables(self.sites.hidden, device, capacity.slots,
                                       capacity.edits, capacity.bank_rows)
                       for key in self.sites.modules}
        self.carriers = [NormCarrier(module, self.tables[key], self.buffers, backend)
                         for key, module in self.sites.modules.items()]
        self._specs: dict[str, tuple] = {}        # canonical spec -> interventions
        self._planned: list[str] = []             # plan request index -> canonical spec
        self._request_keys: dict[str, tuple] = {}  # request id -> (sampling params, spec key)
        self._lut = np.full((1, N_CLASSES), -1, dtype=np.int32)
        self._high_water = 0
        for c in self.carriers:
            c.install()

    def remove(self) -> None:
        for c in self.carriers:
            c.remove()

    # ------------------------------------------------------------------ planning
    def interventions(self, key: str, raw) -> tuple:
        if key not in self._specs:
            self._specs[key] = parse(raw, self.registry, self.sites.n_layers, self.sites.hidden)
        return self._specs[key]

    def plan(self, keys: list[str]) -> None:
        """Compile the specs ``keys`` and write every point's tables in place."""
        requests = [Request(self._specs[k], None) for k in keys]
        compiled: CompiledPlan = compile_plan(requests, self.sites, self.ctx)
        if compiled.sae_points:
            raise ValueError("full-SAE edits are not supported by fasteer's vLLM host")
        cap = self.capacity
        if compiled.n_slots > cap.slots:
            raise ValueError(f"steering needs {compiled.n_slots} slots, the tables hold "
                             f"{cap.slots}: raise FASTEER_VLLM_SLOTS")
        for key, t in compiled.points.items():
            s, e = t.meta.shape[:2]
            if e > cap.edits:
                raise ValueError(f"steering needs {e} edits at {key}, the tables hold "
                                 f"{cap.edits}: raise FASTEER_VLLM_EDITS")
            if t.bank.shape[0] > cap.bank_rows:
                raise ValueError(f"steering needs {t.bank.shape[0]} vectors at {key}, the "
                                 f"tables hold {cap.bank_rows}: raise FASTEER_VLLM_BANK_ROWS")
        for key, tables in self.tables.items():
            tables.write(compiled.points.get(key))
        lut = compiled.lut[:, :N_CLASSES].numpy().astype(np.int32)
        lut[-1] = -1
        self._lut, self._planned = lut, list(keys)

    # ------------------------------------------------------------------ per step
    def request_key(self, req_id: str, sampling_params) -> str | None:
        """The canonical spec of a running request (None: unsteered), parsed and lowered
        once, when the request is first seen, not at every engine step."""
        hit = self._request_keys.get(req_id)
        if hit is not None and hit[0] is sampling_params:
            return hit[1]
        raw = spec_of(sampling_params)
        key = None if raw is None else canonical(raw)
        if key is not None:
            self.interventions(key, raw)
        self._request_keys[req_id] = (sampling_params, key)
        return key

    def forget_requests(self, running) -> None:
        """Drop cached keys of requests that are no longer in ``running`` (a container of
        request ids)."""
        self._request_keys = {r: v for r, v in self._request_keys.items() if r in running}

    def prepare_step(self, keys: list, query_start_loc: np.ndarray,
                     num_computed: np.ndarray, prompt_len: np.ndarray) -> None:
        """Route one step: ``keys[i]`` is request i's canonical spec (`request_key`; None:
        unsteered)."""
        wanted = [k for k in dict.fromkeys(keys) if k is not None]
        if any(k not in self._planned for k in wanted):
            self.plan(wanted)
        none_row = self._lut.shape[0] - 1
        index = {k: i for i, k in enumerate(self._planned)}
        lut_row = np.array([none_row if k is None else index[k] for k in keys], dtype=np.int64)
        slots = routing.token_slots(self._lut, lut_row, query_start_loc, num_computed,
                                    prompt_len)
        self.write_slots(slots)

    def write_slots(self, slots: np.ndarray) -> None:
        n = slots.shape[0]
        cap = self.buffers.slot.shape[0]
        if n > cap:
            raise ValueError(f"step of {n} tokens: the slot buffer holds {cap}")
        host = np.full(max(n, self._high_water), -1, dtype=np.int32)
        host[:n] = slots
        self.buffers.slot[:host.shape[0]].copy_(torch.from_numpy(host), non_blocking=False)
        self._high_water = n


def spec_of(sampling_params):
    """The raw fasteer spec of a request's sampling params (None: unsteered)."""
    if sampling_params is None:
        return None
    return raw_spec(getattr(sampling_params, "extra_args", None))
