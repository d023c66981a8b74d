"""Install fasteer into a live Hugging Face model: carriers, the `Steerer`, `patch`, `steer`.

``fs.patch(model)`` installs one *carrier* per point of the residual stream (from the
table in `fasteer.sites`), a forward pre-hook on the base model that computes per-token
metadata once per forward (`fasteer.metadata`), and a thin ``generate`` wrapper that
tells the metadata where the prompt ends. ``Steerer.set`` lowers interventions to slot
tables (`fasteer.plan`) and writes them into preallocated buffers; nothing is compiled
or captured again when they change. ``Steerer.set_many`` plans many rows' steering in one
go (an alpha sweep over 256 rows), and ``Steerer.decoding(prompt_len)`` marks the forwards
of a hand-written decode loop as decode steps.

Carriers and the numerics they keep:
* A carrier with nothing to do is not installed at all (set() installs and removes
  carriers as their tables fill and empty), and one armed only for some phases (e.g.
  prompt-only steering) calls the module's original forward in the others (host-side
  flag, no device sync): outputs are bit-identical to the unpatched model.
* A norm carrier with work calls the fused ``steer_norm_``: the incoming hidden state is
  edited in place -- the decoder layer's ``residual`` variable is that same tensor, so
  the edit reaches the stream -- and the norm of the edited state is returned. Rows
  without edits are normalised by the fused kernel (equal to the model's norm within
  float rounding).
* Hook carriers (``input``/``output``) edit the tensor at a module boundary in place
  with ``steer_``.
* Full-SAE replaces planned at a point (``SAEReplace``, TopK ``FeatureEdit``;
  `fasteer.sae.carrier`) run first, in place, then the steer edits (``FeatureEdit`` of
  ReLU / JumpReLU / linear SAEs, one feature or several jointly, is a steer edit).
* Autograd on (grad enabled and the hidden state requires grad): the edit is computed
  out of place by the differentiable ``steer_norm`` on a copy and written back with
  ``Tensor.copy_``, which autograd records, so the caller's ``residual`` sees the
  edit and gradients flow through it; the norm is then the module's own forward.
  (Gradient checkpointing recomputes a layer from its saved input, which the carrier
  has already edited: do not combine it with steering inside checkpointed layers.)

Patching twice is an error (never double steering); `Steerer.unpatch` restores every
forward, hook and the ``generate`` attribute, leaving a model that computes bit for bit
what it computed before.

Threads: the per-forward state (each token's slot, where the prompt ends) belongs to the
patched model, so one patched model runs one forward, ``generate`` call or ``decoding``
loop at a time (`fasteer.metadata.ForwardGuard`). Another thread that calls it meanwhile
-- or calls ``set``/``set_many``/``clear``/``unpatch`` -- gets ``RuntimeError("fasteer:
this patched model is already running a forward in another thread; ...")`` at once (no
waiting, never a wrong answer); the thread running it may nest calls (``generate``'s
forwards, ``set`` from a streamer). Servers serialize calls with their own lock or patch
one copy of the model per thread. Compiled graphs and CUDA graph replays do not run the
check (it is skipped while tracing). Hidden states must be float32, bfloat16 or float16:
a model converted to another dtype after patching raises a TypeError at the first
carrier. ``rows=`` names batch rows 0 .. 2**20 - 1 (`MAX_ROW`).

Rows follow prompts in ``generate``: Hugging Face's ``generate`` repeats each prompt k
times (``num_return_sequences`` samples, ``num_beams`` beams: k = ``max(num_beams,
num_return_sequences)``), so while the patched model's ``generate`` runs, explicit
``rows=`` name prompts and steer all k rows of each (row r -> r*k .. r*k + k-1): the
wrapper re-writes the routing tables on entering and leaving the call (in place, as
``set`` does; with ``always_armed=True`` an expanded row beyond the fixed table raises
before generating). Plain forward calls keep batch-row semantics. Explicit position masks
``positions=<[batch, prompt_len] tensor>`` are not expanded.

Compiled and captured forwards
------------------------------
Patch first, then compile or capture: the carriers and the metadata hook are traced
into the graph (Dynamo does not guard on hooks added later).

* ``torch.compile(model, fullgraph=True)``: no graph break comes from fasteer. Inside a
  trace the metadata hook takes its device path (`fasteer.metadata`): every token's slot
  is computed with tensor ops from the cache position, a device copy of the prompt
  length and the routing buffers (`fasteer.routing`), with no host sync and no Python
  value that changes between decode steps. The tables are graph inputs updated in
  place, so ``st.set`` with a new α, vector or per-row assignment reuses the compiled
  graphs; arming or disarming a carrier (steering another layer) or ``st.backend = ...``
  recompiles once. ``FASTEER_BACKEND`` is read when a graph is traced.
* CUDA graphs: ``st = fs.patch(model, sites=..., slots=S, always_armed=True)`` arms
  every carrier at those sites ahead of time: each runs the fused kernel whether or not
  it has work (an empty slot table is a plain norm), the metadata hook always takes the
  device path, and the tables (S slots of ``edits`` edits, ``vectors`` bank rows) and
  the routing buffers are never reallocated. Capture a decode step once, then between
  replays ``st.set(...)``/``st.clear()`` rewrite the tables, α, vectors and which rows
  use which slot in place; a plan that would not fit raises a ValueError (the graph
  holds the buffers' addresses) instead of reallocating. Recipe::

      st = fs.patch(model, sites=["resid_post"], slots=8, always_armed=True)
      cache = StaticCache(config=model.config, max_cache_len=L)
      model(input_ids=prompt, cache=cache)                  # prefill, eager
      ... warm up the decode step on a side stream ...
      g = torch.cuda.CUDAGraph()
      with torch.cuda.graph(g):
          logits = model(input_ids=static_tok, cache=cache).logits
      st.set(fs.Add(vec, 4.0), rows=[0, 2])                 # no re-capture
      static_tok.copy_(next_tok); g.replay()

  A forward continuing a non-empty cache is a decode step; inside ``generate`` or
  ``st.decoding(prompt_len)`` the prompt length decides. Explicit position masks
  (``positions=<tensor>``) are read when the graph is captured, and full-SAE replaces
  (`fasteer.sae.carrier`) are not armed ahead: set them before capturing, and capture
  again when one is added or removed.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn

from . import ops
from .metadata import (PHASE_OFF, DevicePlan, GenerationTracker, MetadataHook, TokenState,
                       wrap_generate)
from .ops import layout as L
from .ops import dispatch
from .ops.steer_norm import _DTYPES
from .plan import LoweringContext, Request, SlotTables, compile_plan
from .routing import Routing, _mark_static
from .sae.carrier import sync_sae_stages
from .sites import SITES, ModelSites, StreamPoint, model_sites, norm_eps_attr

__all__ = ["Steerer", "patch", "steer"]

# decoder-layer list -> Steerer; keyed by the layers so that patching the CausalLM and
# its base model is recognised as the same model.
_PATCHED: "weakref.WeakKeyDictionary[nn.Module, Steerer]" = weakref.WeakKeyDictionary()


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- carriers

class _Carrier:
    """Common part: the tables, the shared token state, the in-place edit."""

    def __init__(self, point: StreamPoint, tables: SlotTables, state: TokenState):
        self.point, self.tables, self.state = point, tables, state
        self.module = point.module
        self.device = tables.device
        self.hidden = tables.hidden
        # armed[phase]: does this carrier have work in a forward of that phase
        self.armed = (False, False, False, False)
        self.installed = False
        # full-SAE replaces planned here (`fasteer.sae.carrier.SAEStages`), run before the
        # steer edits; None when there are none
        self.sae_stages = None

    def set_armed(self, prompt: bool, generated: bool, always: bool) -> None:
        """Arm for the given phases; a carrier with no work in any phase is uninstalled,
        so the module runs exactly as unpatched (not even an extra Python frame)."""
        if always:
            self.armed = (True, True, True, False)
        else:
            self.armed = (prompt, generated, prompt or generated, False)
        if self.armed[2] and not self.installed:
            self.install()
            self.installed = True
        elif not self.armed[2] and self.installed:
            self.remove()
            self.installed = False

    def uninstall(self) -> None:
        if self.installed:
            self.remove()
            self.installed = False

    def _tokens(self, h: torch.Tensor):
        if h.dtype not in _DTYPES:
            # checked here, before any op: the backends have kernels for these dtypes only
            raise TypeError(f"fasteer: the hidden state at {self.point.key} is {h.dtype}, but "
                            f"fasteer's carriers support {', '.join(map(str, _DTYPES))} (was "
                            "the model converted, e.g. model.to(torch.float64), after "
                            "fasteer.patch? convert it to a supported dtype)")
        if h.device != self.device:
            # the kernels take raw pointers: never hand them tensors from two devices
            raise RuntimeError(f"fasteer: the hidden state at {self.point.key} is on {h.device} "
                               f"but the carrier's tables are on {self.device} (was the model "
                               "moved after fasteer.patch? unpatch and patch again)")
        slot, gate = self.state.tokens(self.device)
        if h.numel() != slot.numel() * self.hidden:
            raise RuntimeError(
                f"fasteer: the hidden state at {self.point.key} has {h.numel() // h.shape[-1]} "
                f"rows but the forward's input has {slot.numel()} tokens")
        return slot, gate

    def edit_(self, h: torch.Tensor) -> None:
        """Edit ``h`` in place (autograd-aware)."""
        t = self.tables
        slot, gate = self._tokens(h)
        if torch.is_grad_enabled() and h.requires_grad:
            h_new, _ = ops._steer_norm_fast(h.clone(), slot, gate, t.meta, t.params, t.bank,
                                            norm_kind=L.NORM_NONE)
            h.copy_(h_new)
        elif h.is_contiguous():
            ops._steer_fast_(h, slot, gate, t.meta, t.params, t.bank, backend=self.state.backend)
        else:
            tmp = h.contiguous()
            ops._steer_fast_(tmp, slot, gate, t.meta, t.params, t.bank,
                             backend=self.state.backend)
            h.copy_(tmp)

    def sae_(self, h: torch.Tensor) -> None:
        """Run the full-SAE replaces planned at this point on ``h``, in place."""
        if self.sae_stages is not None:
            slot, gate = self._tokens(h)
            self.sae_stages.apply_(h, slot, gate, self.state.backend)


class _NormCarrier(_Carrier):
    """Replaces a pre-norm's forward with the fused steer+norm."""

    def __init__(self, point, tables, state):
        super().__init__(point, tables, state)
        m, fl = self.module, point.flavour
        self.weight = getattr(m, "weight", None)
        self.bias = getattr(m, "bias", None) if fl.norm_kind == L.NORM_LAYER else None
        self.eps = float(getattr(m, norm_eps_attr(m, fl)))
        self.norm_kind, self.offset = fl.norm_kind, float(fl.weight_offset)
        self.cast_before_weight = fl.cast_before_weight
        self.original = m.forward
        self._fn = self.forward

    def install(self):
        # chain to whatever forward the module has now (its own, or a wrapper's)
        d = self.module.__dict__
        self._had_attr, self._previous = "forward" in d, d.get("forward")
        self.original = self.module.forward
        self.module.forward = self._fn

    def remove(self):
        d = self.module.__dict__
        if d.get("forward") is not self._fn:
            raise RuntimeError(f"fasteer: the forward of {type(self.module).__name__} at "
                               f"{self.point.key} was replaced after fasteer patched it; "
                               "cannot restore it")
        if self._had_attr:
            d["forward"] = self._previous
        else:
            del d["forward"]

    def forward(self, hidden_states, *args, **kwargs):
        if not self.armed[self.state.phase]:
            return self.original(hidden_states, *args, **kwargs)
        h = hidden_states
        self.sae_(h)
        w = self.weight
        if args or kwargs or w is None or h.dtype is not w.dtype or not h.is_contiguous() or \
                (h.requires_grad and torch.is_grad_enabled()):
            # mixed-precision norm weights, odd layouts, autograd: edit, then the model's norm
            self.edit_(h)
            return self.original(h, *args, **kwargs)
        slot, gate = self._tokens(h)
        t = self.tables
        out = torch.empty_like(h)
        ops._steer_norm_fast_(h, out, slot, gate, t.meta, t.params, t.bank, self.weight,
                              self.bias, norm_kind=self.norm_kind, eps=self.eps,
                              weight_offset=self.offset,
                              cast_before_weight=self.cast_before_weight,
                              backend=self.state.backend)
        return out


class _HookCarrier(_Carrier):
    """Edits the tensor entering (``input``) or leaving (``output``) a module, in place."""

    def __init__(self, point, tables, state):
        super().__init__(point, tables, state)
        self.handle = None

    def install(self):
        if self.point.kind == "input":
            self.handle = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = self.module.register_forward_hook(self._post)

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _pre(self, module, args, kwargs):
        if not self.armed[self.state.phase]:
            return None
        h = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(h, torch.Tensor):
            raise RuntimeError(f"fasteer: cannot find the hidden state entering "
                               f"{type(module).__name__} at {self.point.key}")
        self.sae_(h)
        self.edit_(h)
        return None

    def _post(self, module, args, output):
        if not self.armed[self.state.phase]:
            return None
        # a layer returns a tensor (BERT in transformers 5), a tuple (hidden, extras...) or
        # a ModelOutput; the stream is its first tensor
        h = _first_tensor(output)
        if not isinstance(h, torch.Tensor):
            raise RuntimeError(f"fasteer: cannot find the hidden state leaving "
                               f"{type(module).__name__} at {self.point.key}")
        self.sae_(h)
        self.edit_(h)
        return None


def _first_tensor(output):
    if isinstance(output, dict):
        h = output.get("last_hidden_state")
        output = h if isinstance(h, torch.Tensor) else tuple(output.values())
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output


# --------------------------------------------------------------------------- Steerer

def _site_points(sites: ModelSites, names) -> set:
    if names is None:
        return set(sites.points)
    if isinstance(names, str):
        names = (names,)
    keys = set()
    for name in names:
        if name not in SITES:
            raise ValueError(f"sites: expected names from {SITES}, got {name!r}")
        for l in range(sites.n_layers):
            try:
                keys.add(sites.stream_point(l, name))
            except ValueError as exc:
                raise ValueError(f"sites: {exc}") from None
    return keys


def _point_name(key) -> str:
    """A carrier key as the user names it: ("mlp", 3) -> "mlp_out[3]"."""
    kind, layer = key
    names = {"pre": "resid_pre", "mid": "resid_mid", "attn": "attn_out", "mlp": "mlp_out"}
    return f"{names.get(kind, kind)}[{layer}]"


# The largest batch row index ``rows=`` may name (checked before anything is allocated:
# the routing table holds one entry per row up to the largest one named).
MAX_ROW = 2 ** 20 - 1


def _as_rows(rows) -> tuple[int, ...] | None:
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        if rows.is_floating_point() or rows.dtype == torch.bool or rows.dim() > 1:
            raise TypeError(f"rows: expected a list of row indices, got a {rows.dtype} tensor "
                            f"of shape {tuple(rows.shape)}")
        rows = rows.tolist()
    if isinstance(rows, int) and not isinstance(rows, bool):
        rows = (rows,)
    if not isinstance(rows, Iterable) or isinstance(rows, (str, bytes)):
        raise TypeError(f"rows: expected None or a list of batch row indices, got "
                        f"{type(rows).__name__}")
    out = []
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"rows: expected ints, got {r!r}")
        if r < 0:
            raise ValueError(f"rows: expected row indices >= 0, got {r}")
        if r > MAX_ROW:
            raise ValueError(f"rows: expected batch row indices <= {MAX_ROW} (2**20 - 1), "
                             f"got {r}")
        out.append(r)
    if not out:
        raise ValueError("rows: expected at least one row (None means every row)")
    if len(set(out)) != len(out):
        raise ValueError(f"rows: row indices must be distinct, got {out}")
    return tuple(out)


def _flatten(interventions) -> tuple:
    out = []
    for iv in interventions:
        if isinstance(iv, (list, tuple)):
            out.extend(_flatten(iv))
            continue
        if not callable(getattr(iv, "lower", None)) or not hasattr(iv, "positions"):
            raise TypeError(f"interventions: expected fasteer interventions (Add, Clamp, Ablate, "
                            f"Scale, FeatureEdit, ...), got {type(iv).__name__}")
        out.append(iv)
    return tuple(out)


def generate_expansion(model, args, kwargs) -> int:
    """How many rows ``model.generate(*args, **kwargs)`` makes of each prompt:
    ``max(num_beams, num_return_sequences)`` (what Hugging Face's ``generate`` passes to
    ``_expand_inputs_for_generation``), each read from the keyword arguments, else the
    ``generation_config`` argument, else ``model.generation_config`` (1 when unset)."""
    config = kwargs.get("generation_config")
    if config is None and len(args) > 1:
        config = args[1]

    def value(name: str):
        v = kwargs.get(name)
        for source in (config, getattr(model, "generation_config", None)):
            if v is None and source is not None:
                v = getattr(source, name, None)
        return 1 if v is None else v

    try:
        return max(int(value("num_beams")), int(value("num_return_sequences")), 1)
    except (TypeError, ValueError):
        return 1      # generate itself reports a malformed setting


class _ExpandingTracker:
    """The tracker `fasteer.metadata.wrap_generate` enters for each ``generate`` call: the
    `GenerationTracker`'s ``generation``, plus the row expansion of the `Steerer`."""

    def __init__(self, steerer: "Steerer"):
        self._steerer = weakref.ref(steerer)
        self._tracker = steerer.tracker

    @contextlib.contextmanager
    def generation(self, args, kwargs):
        st = self._steerer()
        with self._tracker.generation(args, kwargs):
            if st is None or not st._patched:
                yield
                return
            with st._expanding(generate_expansion(st.model, args, kwargs)):
                yield


class Steerer:
    """Steering installed in one model. Made by `fasteer.patch`; see the module docstring."""

    def __init__(self, model: nn.Module, *, slots: int | None = None, sites=None,
                 always_armed: bool = False, edits: int | None = None,
                 vectors: int | None = None, backend: str | None = None,
                 layers_path: str | None = None, _sites: ModelSites | None = None):
        for name, value in (("slots", slots), ("edits", edits), ("vectors", vectors)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name}: expected a positive int (initial {name} capacity), "
                                 f"got {value!r}")
        if backend is not None:
            dispatch.requested_backend(backend)      # validates the name
        if not isinstance(always_armed, bool):
            raise TypeError(f"always_armed: expected a bool, got {type(always_armed).__name__}")
        # _sites: carriers resolved by the caller (`fasteer.carrier_probe` tries a shape)
        self.sites = _sites if _sites is not None else model_sites(model, layers_path)
        if self.sites.layers in _PATCHED:
            raise ValueError("model: already patched by fasteer; use the Steerer that patched it "
                             "(st.set / st.clear) or call st.unpatch() first")
        self.model = model
        self.always_armed = always_armed
        self._ctx = LoweringContext(self.sites.n_layers, self.sites.hidden, self.sites.model_type)
        self._requests: list[Request] = []
        self._lowered: dict[int, tuple] = {}     # id(intervention) -> (intervention, edits)
        self.state = TokenState()
        self.tracker = GenerationTracker()
        if sites is None and always_armed:
            # armed ahead, every carrier runs in every forward: by default only the
            # residual stream's (component outputs cost a hook each; name them to arm them)
            keys = {k for k in self.sites.points if k[0] in ("pre", "mid")}
        else:
            keys = _site_points(self.sites, sites)
        self.carriers: dict[tuple[str, int], _Carrier] = {}
        capacity = slots or 4
        # Armed ahead (CUDA graphs): fixed buffers, sized so a typical plan fits -- up to
        # two edits per slot and one distinct vector per edit.
        edit_capacity = edits or (2 if always_armed else 1)
        vector_capacity = vectors or (capacity * edit_capacity if always_armed else 1)
        for key in sorted(keys, key=lambda k: (k[1], k[0] == "pre")):
            point = self.sites.points[key]
            tables = SlotTables(self.sites.hidden, _module_device(point.module), slots=capacity,
                                edits=edit_capacity, bank_rows=vector_capacity)
            if always_armed:
                _mark_static(tables.meta, tables.params, tables.bank)
            cls = _NormCarrier if point.kind == "norm" else _HookCarrier
            self.carriers[key] = cls(point, tables, self.state)
        self.metadata = MetadataHook(self.sites.base, self.state, self.tracker)
        self.metadata.always_armed = always_armed
        self._device = _module_device(self.sites.base)
        self.metadata.backend = backend
        self.metadata.routing = Routing(self._device, requests=capacity,
                                        rows=1024 if always_armed else 64, fixed=always_armed)
        self.tracker.attach(self._device)
        if always_armed:
            _mark_static(self.tracker.device_prompt_len)
        self._guard = self.metadata.guard
        # Rows follow prompts: the wrapper's "tracker" also maps explicit rows onto the
        # batch generate expands (num_return_sequences / num_beams) while it runs.
        self._row_expand = 1
        self._install_generate, self._remove_generate = wrap_generate(
            model, _ExpandingTracker(self), self._guard)
        # install: nothing above touched the model (carriers install when armed)
        for c in self.carriers.values():
            c.set_armed(False, False, always_armed)
        self._meta_handle = self.sites.base.register_forward_pre_hook(self.metadata,
                                                                      with_kwargs=True)
        # always_call: the hook also runs when the forward raises (it gives back the guard)
        self._meta_done = self.sites.base.register_forward_hook(self.metadata.finish,
                                                                always_call=True)
        self._install_generate()
        _PATCHED[self.sites.layers] = self
        self._patched = True

    # -- public API ------------------------------------------------------------------------
    @property
    def patched(self) -> bool:
        return self._patched

    @property
    def requests(self) -> list[Request]:
        return list(self._requests)

    def set(self, *interventions, rows=None) -> "Steerer":
        """Steer ``rows`` (None: every row) with ``interventions``, replacing what they had.

        Each call with explicit rows gets its own slots, so several calls give one batch
        different steering per row. Everything is validated before any table changes.

        ``rows`` index the batch a forward sees -- and, inside the patched model's
        ``generate``, the *prompts*: generate repeats each prompt k times (k =
        ``num_return_sequences`` when sampling, ``num_beams`` for beam search; in general
        ``max(num_beams, num_return_sequences)``, from the keyword arguments, else the
        ``generation_config`` passed, else ``model.generation_config``), so ``rows=[r]``
        steers expanded rows r*k .. r*k + k-1, every sequence of prompt r. Direct forward
        calls (and hand-written decode loops) keep plain batch-row semantics.
        """
        return self.set_many([(interventions, rows)])

    def set_many(self, assignments) -> "Steerer":
        """``set(*interventions, rows=rows)`` for each ``(interventions, rows)`` pair, in
        order, planned and written once (a sweep over many rows in one call).
        ``interventions`` is one intervention or a list of them."""
        self._check_patched()
        with self._guard.held("set"):
            self._set_many(assignments)
        return self

    def _set_many(self, assignments) -> None:
        requests = list(self._requests)
        for pair in assignments:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"assignments: expected (interventions, rows) pairs, got "
                                f"{type(pair).__name__}")
            ivs, rows = pair
            requests = self._assign(requests, _flatten(ivs if isinstance(ivs, (list, tuple))
                                                       else (ivs,)), _as_rows(rows))
        self._commit(requests)

    @staticmethod
    def _assign(requests: list[Request], ivs: tuple, rows) -> list[Request]:
        """The request list after giving ``rows`` (None: all) the interventions ``ivs``."""
        if rows is None:
            return [Request(ivs, None)] if ivs else []
        out = []
        taken = set(rows)
        for req in requests:
            if req.rows is None:
                out.append(req)
                continue
            left = tuple(r for r in req.rows if r not in taken)
            if left:
                out.append(Request(req.interventions, left))
        out.append(Request(ivs, rows))
        return out

    def watch(self, sae, features, *, max_tokens: int = 256, tokens: str = "all", layer=None,
              site=None, batch_size: int | None = None, value: str = "edited"):
        """Record SAE ``features``' activations for every token into a preallocated buffer
        ``[batch, max_tokens, K]``; returns a `fasteer.sae.watch.Watch` (``.values()``,
        ``.edited_values()``, ``.encoded_values()``, ``.clear()``, ``.remove()``).
        ``tokens="generated"`` records only tokens fed after the prompt.

        ``value`` picks what is recorded (docs/watch.md): ``"edited"`` (default) -- the
        latent as fasteer's edits at this point set it: ``op(z_k)`` where a FeatureEdit /
        SAEReplace of this SAE edits feature k here (``FeatureEdit(sae, k, "set", 40)`` reads
        40), else ``z_k`` of the stream before the edits here (after upstream steering);
        ``"encoded"`` -- the SAE's encoding of the stream after fasteer's edits here (what
        later layers see; the only value before this option existed); ``"both"``.
        Placement defaults to the SAE's layer and site. Cost: one [N, D] x [D, K] product per
        forward and value (the full encode for TopK SAEs), plus a float32 replay of the
        point's edits where one edits a watched feature; see `fasteer.sae.watch`."""
        from .sae.watch import Watch
        self._check_patched()
        w = Watch(self, sae, features, max_tokens=max_tokens, tokens=tokens, layer=layer,
                  site=site, batch_size=batch_size, value=value)
        self.__dict__.setdefault("_watches", []).append(w)
        return w

    def decoding(self, prompt_len: int):
        """Context manager: the forwards inside are decode steps after a ``prompt_len``-token
        prompt (what ``generate`` tells fasteer itself). For hand-written decode loops,
        where fasteer would otherwise read the cache length (a device sync for static
        caches, not allowed while capturing a CUDA graph)."""
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
            raise ValueError(f"prompt_len: expected a positive int, got {prompt_len!r}")
        return self._decoding(prompt_len)

    @contextlib.contextmanager
    def _decoding(self, prompt_len: int):
        with self._guard.held("decoding"), self.tracker.decoding(prompt_len):
            yield

    def clear(self) -> "Steerer":
        """Remove all steering (the carriers stay installed; outputs are the model's own)."""
        self._check_patched()
        with self._guard.held("clear"):
            self._commit([])
        return self

    def unpatch(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        if not self._patched:
            return
        with self._guard.held("unpatch"):
            self._unpatch()

    def _unpatch(self) -> None:
        errors = []
        for c in self.carriers.values():
            try:
                c.uninstall()
            except RuntimeError as exc:
                errors.append(str(exc))
        for w in list(getattr(self, "_watches", ())):
            w.remove()
        self._meta_handle.remove()
        self._meta_done.remove()
        self._remove_generate()
        _PATCHED.pop(self.sites.layers, None)
        self._patched = False
        self.state.set(PHASE_OFF)
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> "Steerer":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self):
        state = "patched" if self._patched else "unpatched"
        return (f"Steerer({self.sites.model_type}, {len(self.carriers)} carriers "
                f"[{self.sites.spec.name}], {len(self._requests)} request(s), {state})")

    # -- internals -------------------------------------------------------------------------
    def _check_patched(self):
        if not self._patched:
            raise RuntimeError("Steerer: the model was unpatched; call fasteer.patch(model) again")

    def _lower(self, iv):
        hit = self._lowered.get(id(iv))
        if hit is not None and hit[0] is iv:
            return hit[1]
        edits = iv.lower(self._ctx)
        self._lowered[id(iv)] = (iv, edits)
        return edits

    def _check_capacity(self, compiled) -> None:
        """Armed ahead, the buffers never move (a captured CUDA graph holds their
        addresses): refuse a plan that does not fit instead of reallocating them."""
        if compiled is not None:
            self._check_tables(compiled)
        self._check_sae_stages(compiled)
        self.metadata.routing.check(compiled)

    def _check_sae_stages(self, compiled) -> None:
        """Full-SAE stages (SAEReplace, TopK FeatureEdit) are ops a captured graph either
        runs or not: once a point has them, a later plan may change their edits, values
        and rows, or drop them (rows then skip), but not which SAEs run there."""
        for key, carrier in self.carriers.items():
            held = carrier.sae_stages
            plan = None if compiled is None else compiled.sae_points.get(key)
            if held is None or plan is None or not plan.stages or held.fits(plan):
                continue
            names = [st.weights.name for st in held.stages]
            raise ValueError(
                f"sae: with always_armed=True the full-SAE stages at {key} are fixed once set "
                f"({names}, up to {[tuple(st.edit_feat.shape) for st in held.stages]} "
                "slots x edits) so that a captured CUDA graph stays valid; this plan needs "
                f"{[p.weights.name for p in plan.stages]} with "
                f"{[tuple(p.edit_feat.shape) for p in plan.stages]}. Patch again (and "
                "re-capture) to change them")

    def _check_tables(self, compiled) -> None:
        for key, pt in compiled.points.items():
            tables = self.carriers[key].tables
            if tables.fits(pt):
                continue
            need = (pt.meta.shape[0], pt.meta.shape[1], pt.bank.shape[0])
            have = (tables.meta.shape[0], tables.meta.shape[1], tables.bank.shape[0])
            arg = next(n for n, a, b in zip(("slots", "edits", "vectors"), need, have) if a > b)
            raise ValueError(
                f"{arg}: the plan needs {need[0]} slots, {need[1]} edits per slot and "
                f"{need[2]} vectors at {key}, but fasteer.patch(..., always_armed=True) armed "
                f"room for {have[0]} slots, {have[1]} edits and {have[2]} vectors. The tables "
                "are fixed so that captured CUDA graphs stay valid; patch again with larger "
                "slots=, edits= or vectors=")

    @property
    def backend(self) -> str | None:
        """The op backend the carriers use (None: ``FASTEER_BACKEND`` or automatic)."""
        return self.metadata.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None:
            dispatch.requested_backend(name)         # validates the name
        self.metadata.backend = name

    def _expanded(self, requests: list[Request]) -> list[Request]:
        """``requests`` with explicit rows mapped onto the expanded batch of a running
        ``generate``: row r -> r*k .. r*k + k-1 (k = `_row_expand`; 1 outside generate)."""
        k = self._row_expand
        if k == 1:
            return requests
        return [req if req.rows is None else
                Request(req.interventions, tuple(r * k + j for r in req.rows for j in range(k)))
                for req in requests]

    @contextlib.contextmanager
    def _expanding(self, k: int):
        """Inside ``generate`` with expansion factor ``k``: explicit rows name prompts."""
        old = self._row_expand
        explicit = any(req.rows is not None for req in self._requests)
        if k == old or not explicit:
            self._row_expand = k
            try:
                yield
            finally:
                self._row_expand = old
                if self._patched and k != old and \
                        any(req.rows is not None for req in self._requests):
                    self._commit(self._requests)     # rows were set inside (a streamer)
            return
        self._row_expand = k
        try:
            self._commit(self._requests)     # may raise (fixed tables): before generate runs
        except BaseException:
            self._row_expand = old
            raise
        try:
            yield
        finally:
            self._row_expand = old
            if self._patched:
                self._commit(self._requests)

    def _commit(self, requests: list[Request]) -> None:
        planned = self._expanded(requests)
        compiled = compile_plan(planned, self.sites, self._ctx, self._lower) if planned else None
        if compiled is not None:
            missing = [k for k in (*compiled.points, *compiled.sae_points)
                       if k not in self.carriers]
            if missing:
                names = [_point_name(k) for k in missing]
                raise ValueError(f"sites: no carrier installed at {', '.join(names)} "
                                 "(fasteer.patch(model, sites=...) left them out)")
            device_plan = DevicePlan(compiled, self._device)
        else:
            device_plan = None
        if self.always_armed:
            self._check_capacity(compiled)
        # validated: now change the live tables
        self.metadata.routing.write(compiled)
        for key, carrier in self.carriers.items():
            pt = None if compiled is None else compiled.points.get(key)
            if not carrier.tables.fits(pt):
                carrier.tables.grow_for(pt)
            carrier.tables.write(pt)
            carrier.sae_stages = sync_sae_stages(
                carrier.sae_stages, None if compiled is None else compiled.sae_points.get(key),
                carrier.device, keep=self.always_armed)
            armed = (False, False) if compiled is None else compiled.armed.get(key, (False, False))
            carrier.set_armed(*armed, self.always_armed)
        self.metadata.plan = device_plan
        self._requests = requests
        live = {id(iv) for req in requests for iv in req.interventions}
        self._lowered = {k: v for k, v in self._lowered.items() if k in live}


def patch(model: nn.Module, slots: int | None = None, sites=None, *,
          always_armed: bool = False, edits: int | None = None, vectors: int | None = None,
          backend: str | None = None, layers_path: str | None = None) -> Steerer:
    """Install fasteer's carriers into ``model`` and return its `Steerer`.

    ``slots``: initial slot capacity of the tables (they grow when a plan needs more).
    ``sites``: restrict carriers to these site names (default: every point of the stream
    and every component output -- a carrier is installed only while it has work; with
    ``always_armed=True`` the default is the stream's points only, name ``"attn_out"`` /
    ``"mlp_out"`` to arm those too).
    ``always_armed``: arm ahead for CUDA graphs -- carriers run the fused op even with
    nothing to do (a fixed op sequence; unsteered rows equal the model's norm within
    rounding), the per-token metadata is computed on the device, and the tables hold
    ``slots`` slots of ``edits`` edits (default 2) reading up to ``vectors`` distinct
    vectors per site (default slots * edits); they are never reallocated, so a plan that
    does not fit raises instead (see "Compiled and captured forwards" above).
    ``backend``: op backend for the carriers ("reference", "cpu", "triton", "cuda";
    default: ``FASTEER_BACKEND`` or automatic); also settable as ``st.backend``.
    ``layers_path``: the attribute path of the layer list to steer (``"encoder.layer"``,
    ``"decoder.block"``); by default fasteer finds it (`fasteer.layer_discovery`), and asks
    for it where a model has several stacks (encoder-decoder models). ``st.sites.verdict``
    says which carriers the model got and why (`fasteer.sites.model_sites`).

    One thread at a time: while a forward, ``generate`` call or ``st.decoding`` loop of the
    patched model runs, a forward, ``generate``, ``set``, ``clear`` or ``unpatch`` from
    another thread raises ``RuntimeError("fasteer: this patched model is already running a
    forward in another thread; ...")`` (serialize the calls, or patch one model copy per
    thread). The model must stay in float32, bfloat16 or float16 (a forward after
    ``model.to(torch.float64)`` raises a TypeError naming the dtype).
    """
    return Steerer(model, slots=slots, sites=sites, always_armed=always_armed, edits=edits,
                   vectors=vectors, backend=backend, layers_path=layers_path)


def steer(model: nn.Module, *interventions, rows=None, layers_path: str | None = None) -> Steerer:
    """Patch ``model`` and set ``interventions``; use as ``with fs.steer(model, ...):``.

    Leaving the ``with`` block unpatches. Errors in the interventions are raised before
    the model is left modified. ``layers_path``: as in `patch`.
    """
    st = Steerer(model, layers_path=layers_path)
    try:
        st.set(*interventions, rows=rows)
    except BaseException:
        st.unpatch()
        raise
    return st
