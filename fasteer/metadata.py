"""Per-token metadata: which slot each token uses, and whether it may be edited.

Computed once per model forward by a forward pre-hook on the base model (the module that
owns the decoder layers) and shared by every carrier, so a carrier call does no Python
work beyond launching its op. For every token of the batch (row ``b * T + t`` of the
flattened hidden state) it fills

* ``slot`` int32: the token's slot, picked from the plan's lookup table
  ``lut[request of row b, class of token]`` (see `fasteer.plan`), -1 = untouched;
* ``gate`` uint8: 0 for padding (never edited), 1 otherwise.

Prompt or generated. Position rules need to know which tokens belong to the prompt.
Inside ``generate`` (the patch wraps the model's ``generate``) the prompt is known: it is
the ``input_ids``/``inputs_embeds`` handed to ``generate`` (absolute positions
``0 .. prompt_len-1``), and a host-side counter of the tokens fed so far gives each
forward's absolute positions without reading the cache (no device sync, so static caches
and captured graphs are fine). This is right for cached decoding, chunked prefill, a
reused prefix cache (``past`` read once per call) and ``use_cache=False`` (every forward
restarts at position 0). Outside ``generate``, a forward whose cache is empty is a
prompt and a forward continuing a non-empty cache is a generated step; a hand-written
decode loop can say so instead with ``Steerer.decoding(prompt_len)`` (no cache read).

Padding. The 2-D ``attention_mask`` (the columns of the current tokens) when the forward
gets one; else, for the prompt inside ``generate``, the 2-D mask handed to ``generate``
(``generate`` turns it into a 4-D mask for static caches); else a 4-D mask is read at
each token's own key position (a padded token does not attend to itself; a row that
attends to the future was "unmasked" by the SDPA fix-up and is padding too). Tokens fed
after the prompt inside ``generate`` are never padding (``generate`` extends the mask
with ones).

Compiled and captured forwards (the device path). The host path above reads Python
counters and, outside ``generate``, a static cache's length (``int(...)``: a device sync
that Dynamo would turn into a guard on the tensor's value). Inside a ``torch.compile``
trace, and always when the `Steerer` is armed ahead (``always_armed=True``, the CUDA
graph mode), the hook computes the same metadata from tensors instead: absolute
positions from ``cache_position`` or the cache's length as a tensor, the prompt length
from `GenerationTracker.device_prompt_len` (written by the ``generate`` wrapper and
``decoding``, outside any forward; -1 = unknown: a forward that starts the sequence is
the prompt), the slot from the routing buffers of `fasteer.routing`, updated in place
by ``Steerer.set``. The phase is then PHASE_MIXED (every carrier armed for any phase
runs and the token's class picks its slot) and nothing is cached across forwards, so
a replayed graph recomputes everything from the current buffers. Two checks of the
host path need host values the device path does not have and are skipped there: the
shape of an explicit position mask against the prompt outside ``generate``, and (in
captured graphs) steering set for rows beyond the captured batch.
"""
from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from .ops import dispatch
from .plan import CLASS_GENERATED, CLASS_LAST_PROMPT, CLASS_PROMPT, CODES, N_CLASSES

# Phases of one forward (index into a carrier's `armed` tuple).
PHASE_PROMPT, PHASE_GENERATED, PHASE_MIXED, PHASE_OFF = 0, 1, 2, 3

_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


class ForwardGuard:
    """One thread at a time per patched model.

    The per-forward state (`TokenState`, the `GenerationTracker`) lives on the `Steerer`,
    not on the thread, so two threads running forwards of one patched model at once would
    read each other's slots. The guard refuses that instead: the metadata pre-hook takes it
    (non-blocking) for the duration of each forward of the base model and the forward hook
    (``always_call=True``: also when the forward raises) gives it back; ``generate``,
    ``Steerer.decoding`` and ``Steerer.set``/``clear``/``unpatch`` hold it for their whole
    duration. The same thread may take it again (``generate`` calls forward many times; a
    streamer may call ``set`` between steps); another thread gets a RuntimeError, never a
    wrong answer. Skipped inside a ``torch.compile`` trace (compiled graphs do not run it,
    and neither does a CUDA graph replay).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._local = threading.local()   # forwards this thread entered (for `exit_forward`)

    def enter(self, what: str) -> None:
        me = threading.get_ident()
        if self._owner == me:             # only this thread ever sets _owner to its own id
            self._depth += 1
            return
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"fasteer: this patched model is already running a forward in another thread; "
                f"{what} was refused (one patched model runs one forward, generate call or "
                "decoding loop at a time, and set/clear/unpatch wait for none of them). "
                "Serialize the calls (e.g. one threading.Lock around generate and set), or "
                "patch one copy of the model per thread")
        self._owner, self._depth = me, 1

    def exit(self) -> None:
        if self._owner != threading.get_ident():
            return
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    @contextlib.contextmanager
    def held(self, what: str):
        self.enter(what)
        try:
            yield
        finally:
            self.exit()

    def enter_forward(self) -> None:
        self.enter("this forward")
        self._local.forwards = getattr(self._local, "forwards", 0) + 1

    def exit_forward(self) -> None:
        """Give back what `enter_forward` took in this thread (nothing if it did not: the
        pre-hook raised before taking it, or another thread holds the guard)."""
        n = getattr(self._local, "forwards", 0)
        if n > 0:
            self._local.forwards = n - 1
            self.exit()

    @property
    def busy_elsewhere(self) -> bool:
        owner = self._owner
        return owner is not None and owner != threading.get_ident()


class TokenState:
    """What carriers read during one forward: phase, per-token slot and gate."""

    def __init__(self):
        self.phase = PHASE_OFF
        self.device: torch.device | None = None
        self.slot: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.backend = "auto"
        self._by_device: dict = {}

    def tokens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, gate) on ``device`` (copied once per forward for other devices)."""
        pair = self._by_device.get(device)
        if pair is None:
            pair = (self.slot.to(device), self.gate.to(device))
            self._by_device[device] = pair
        return pair

    def set(self, phase: int, slot: torch.Tensor | None = None, gate: torch.Tensor | None = None):
        self.phase = phase
        self.slot, self.gate = slot, gate
        self._by_device = {} if slot is None else {slot.device: (slot, gate)}
        self.device = None if slot is None else slot.device


class GenerationTracker:
    """Knows, inside ``generate``, where the prompt ends (host-side, no device sync)."""

    def __init__(self):
        self.in_generate = False
        self.first_forward = False
        self.prompt_len: int | None = None
        self.prompt_mask: torch.Tensor | None = None   # 2-D mask handed to generate
        self.position = 0                               # absolute position of the next token
        # The prompt length as a device scalar (-1: unknown) for the device path of
        # `MetadataHook`: compiled graphs and captured CUDA graphs read it by address, so
        # it is written here, outside any forward, instead of baked in as a Python int.
        self.device_prompt_len: torch.Tensor | None = None
        self._published = -1                            # what device_prompt_len holds

    def attach(self, device: torch.device) -> None:
        """Create the device copy of the prompt length on ``device``."""
        self.device_prompt_len = torch.full((1,), -1, dtype=torch.long, device=device)

    def _publish(self, prompt_len: int | None) -> int:
        """Write ``prompt_len`` (None: unknown) to the device scalar; returns the old value
        as written before (host-side copy, no device read)."""
        old = self._published
        value = -1 if prompt_len is None else int(prompt_len)
        if self.device_prompt_len is not None and value != old:
            self.device_prompt_len.fill_(value)
        self._published = value
        return old

    @contextlib.contextmanager
    def generation(self, args, kwargs):
        saved = dict(self.__dict__)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        self.in_generate, self.first_forward = True, True
        self.prompt_len = None
        for t in (ids, embeds, mask):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.prompt_len = int(t.shape[1])
                break
        self.prompt_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.position = 0
        old = self._publish(self.prompt_len)
        try:
            yield
        finally:
            current = self._published
            self.__dict__.update(saved)
            self._published = current
            self._publish(None if old < 0 else old)


    @contextlib.contextmanager
    def decoding(self, prompt_len: int):
        """Forwards inside are decode steps continuing a ``prompt_len``-token prompt (for
        hand-written decode loops, where reading a static cache's length would be a
        device sync). Also publishes ``prompt_len`` to the device path (compiled and
        captured forwards), which otherwise treats a forward starting at position 0 as
        the prompt."""
        saved = dict(self.__dict__)
        self.in_generate, self.first_forward = True, False
        self.prompt_len, self.prompt_mask, self.position = prompt_len, None, prompt_len
        old = self._publish(prompt_len)
        try:
            yield
        finally:
            current = self._published
            self.__dict__.update(saved)
            self._published = current
            self._publish(None if old < 0 else old)


def wrap_generate(model, tracker: GenerationTracker, guard: ForwardGuard | None = None):
    """Return (install, remove) for a ``generate`` wrapper that tells `tracker` a call began
    (holding ``guard`` for the whole call: the tracker is per model, not per thread)."""
    original = getattr(model, "generate", None)
    if not callable(original):
        return (lambda: None), (lambda: None)
    had_instance_attr = "generate" in model.__dict__
    previous = model.__dict__.get("generate")

    def generate(*args, **kwargs):
        with (guard.held("generate") if guard is not None else contextlib.nullcontext()):
            with tracker.generation(args, kwargs):
                return original(*args, **kwargs)

    generate.__doc__ = getattr(original, "__doc__", None)
    generate.__wrapped__ = original

    def install():
        model.generate = generate

    def remove():
        if model.__dict__.get("generate") is generate:
            if had_instance_attr:
                model.generate = previous
            else:
                del model.__dict__["generate"]

    return install, remove


def _past_length(cache) -> int | torch.Tensor:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return get()
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) \
            and cache[0] and isinstance(cache[0][0], torch.Tensor):
        return int(cache[0][0].shape[-2])     # legacy tuple cache
    return 0


class MetadataHook:
    """The base model's forward pre-hook; fills a `TokenState` from the plan's lookup."""

    def __init__(self, base, state: TokenState, tracker: GenerationTracker):
        self.state, self.tracker = state, tracker
        self.plan = None          # `DevicePlan` or None (nothing to do)
        self.always_armed = False
        self.routing = None       # `fasteer.routing.Routing`: read by the device path
        self.backend = None       # op backend for the carriers (None: FASTEER_BACKEND / auto)
        self.guard = ForwardGuard()   # one thread at a time (see `ForwardGuard`)
        self._constants: dict = {}
        try:
            self.param_names = [p.name for p in inspect.signature(base.forward).parameters.values()
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            self.param_names = ["input_ids"]

    def _constant(self, n: int, value: int, dtype, device) -> torch.Tensor:
        """A cached constant vector (decode steps reuse it: no allocation, stable pointer)."""
        key = (n, value, dtype, device)
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = torch.full((n,), value, dtype=dtype, device=device)
        return t

    # -- argument access ---------------------------------------------------------------
    def _arg(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        if name in self.param_names:
            i = self.param_names.index(name)
            if i < len(args):
                return args[i]
        return None

    def __call__(self, module, args, kwargs):
        if not torch.compiler.is_compiling():
            # released by `finish` (a forward hook with always_call=True, so also when the
            # forward, or this hook, raises)
            self.guard.enter_forward()
        state, tracker, plan = self.state, self.tracker, self.plan
        ids = self._arg(args, kwargs, "input_ids")
        embeds = self._arg(args, kwargs, "inputs_embeds")
        x = ids if isinstance(ids, torch.Tensor) else embeds
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            state.set(PHASE_OFF)
            return None
        B, T = int(x.shape[0]), int(x.shape[1])
        cache = None
        for name in _CACHE_NAMES:
            cache = self._arg(args, kwargs, name)
            if cache is not None:
                break
        if self.always_armed or torch.compiler.is_compiling():
            return self._device_call(args, kwargs, ids, embeds, x, B, T, cache)

        # where this forward lies relative to the prompt (host ints only)
        in_generate = tracker.in_generate
        if in_generate:
            if tracker.first_forward:
                tracker.first_forward = False
                tracker.position = int(_past_length(cache))
                if tracker.prompt_len is None:
                    tracker.prompt_len = tracker.position + T
            start = 0 if cache is None else tracker.position
            tracker.position = start + T
            n_prompt = min(max(tracker.prompt_len - start, 0), T)
        if plan is None and not self.always_armed:
            state.set(PHASE_OFF)
            return None
        if not in_generate:
            start = 0
            n_prompt = T if int(_past_length(cache)) == 0 else 0
        phase = PHASE_PROMPT if n_prompt == T else PHASE_GENERATED if n_prompt == 0 else PHASE_MIXED
        if not self.always_armed:
            wanted = (plan.active_prompt if phase == PHASE_PROMPT else
                      plan.active_generated if phase == PHASE_GENERATED else
                      plan.active_prompt or plan.active_generated)
            if not wanted:
                state.set(PHASE_OFF)
                return None

        device = x.device
        if in_generate and n_prompt == 0:
            nonpad = None            # tokens fed after the prompt are never padding
        else:
            nonpad = self._nonpad(args, kwargs, B, T, start, n_prompt, cache, device)
        if plan is None:        # always armed, nothing set: every token untouched
            slot = self._constant(B * T, -1, torch.int32, device)
        else:
            prompt_len = tracker.prompt_len if in_generate else T
            index = (self._prompt_index(B, T, start, n_prompt, nonpad, device)
                     if plan.n_positions and n_prompt else None)
            slot = plan.slots(B, T, start, n_prompt, prompt_len, nonpad, device, index)
        gate = (self._constant(B * T, 1, torch.uint8, device) if nonpad is None
                else nonpad.reshape(-1).to(torch.uint8).contiguous())
        state.backend = dispatch.requested_backend(self.backend)
        state.set(phase, slot, gate)
        return self._protect_embeds(plan, args, kwargs, ids, embeds)

    def _prompt_index(self, B, T, start, n_prompt, nonpad, device) -> torch.Tensor:
        """Each token's index in its row's prompt, counting real tokens from 0 (the position
        id Hugging Face gives it), int64 [B|1, T]; -1 before the first real token."""
        pm = self.tracker.prompt_mask if self.tracker.in_generate else None
        if pm is not None and pm.shape[1] >= start + n_prompt and B % pm.shape[0] == 0:
            cum = (pm != 0).long().cumsum(1) - 1
            idx = torch.full((pm.shape[0], T), -1, dtype=torch.long)
            idx[:, :n_prompt] = cum[:, start:start + n_prompt]
            if B != pm.shape[0]:         # num_beams / num_return_sequences expand rows
                idx = idx.repeat_interleave(B // pm.shape[0], dim=0)
            return idx.to(device)
        if nonpad is not None and start == 0:
            return nonpad.long().cumsum(1) - 1
        return (torch.arange(T, device=device) + start).view(1, T)

    def finish(self, module, args, output):
        """Forward hook: the forward is over, drop its per-token tensors. Under
        torch.compile this also keeps them out of the graph's outputs (a compiled graph
        would otherwise return them to store in `TokenState`, and with CUDA-graph trees
        they would point into the graph's memory pool). Registered with always_call=True:
        it also gives back the thread guard when the forward raised."""
        if torch.compiler.is_compiling():
            self.state.set(PHASE_OFF)
            return
        if self.guard.busy_elsewhere:
            return       # this forward was refused: the state is the other thread's
        self.state.set(PHASE_OFF)
        self.guard.exit_forward()

    def _protect_embeds(self, plan, args, kwargs, ids, embeds):
        """The carrier at resid_pre[0] edits the embeddings in place; never a caller's tensor
        (armed ahead, that carrier runs even with nothing to do: a leaf that requires grad
        cannot be written in place at all)."""
        edits_input = self.always_armed or (plan is not None and plan.edits_layer0_input)
        if edits_input and isinstance(embeds, torch.Tensor) and not isinstance(ids, torch.Tensor):
            kwargs = dict(kwargs)
            args = list(args)
            if "inputs_embeds" in kwargs:
                kwargs["inputs_embeds"] = embeds.clone()
            else:
                args[self.param_names.index("inputs_embeds")] = embeds.clone()
            return tuple(args), kwargs
        return None

    # -- the device path: torch.compile and CUDA graphs -------------------------------------
    def _device_call(self, args, kwargs, ids, embeds, x, B, T, cache):
        """Per-token metadata from tensors only (see "Compiled and captured forwards").

        Every forward is PHASE_MIXED (carriers armed for any phase run; a token's class
        picks its slot), positions come from ``cache_position`` or the cache's length as
        a tensor, the prompt length from the tracker's device scalar, the routing from
        `fasteer.routing.Routing`: no host sync, no Python value that changes between
        decode steps, nothing cached across forwards.
        """
        state, plan = self.state, self.plan
        if not self.always_armed and (plan is None or not
                                      (plan.active_prompt or plan.active_generated)):
            state.set(PHASE_OFF)
            return None
        if plan is not None and plan.max_row >= B:      # shapes only: no sync
            raise ValueError(f"rows: steering was set for row {plan.max_row} but this batch "
                             f"has {B} rows (rows index the batch the model sees)")
        device = x.device
        pos = self._positions(args, kwargs, T, cache, device)               # [T] absolute
        pl = self.tracker.device_prompt_len
        if pl is None:
            pl = torch.full((1,), -1, dtype=torch.long, device=device)
        elif pl.device != device:
            pl = pl.to(device)
        # prompt tokens: before the known prompt end; else the whole forward if it starts
        # the sequence (a forward continuing a cache is a decode step)
        prompt_tok = torch.where(pl >= 0, pos < pl, pos[:1] == 0).view(1, T)
        nonpad = self._nonpad_device(args, kwargs, B, T, pos, prompt_tok, cache, device)
        t = torch.arange(T, device=device).view(1, T)
        real = prompt_tok if nonpad is None else nonpad & prompt_tok
        last = torch.where(real, t, -1).amax(dim=1, keepdim=True)                  # [B|1, 1]
        # the last prompt token only exists in the forward that holds the prompt's end
        ends = torch.where(pl >= 0, (pos == pl - 1).any(), True).view(1, 1)
        cls = torch.where(prompt_tok, torch.where((t == last) & ends, CLASS_LAST_PROMPT,
                                                  CLASS_PROMPT), CLASS_GENERATED)
        rr = self.routing.requests_for(B, device)
        if plan is not None and plan.any_masks:
            cls = cls + N_CLASSES * self._mask_bits_device(plan, rr, B, T, pos, prompt_tok,
                                                           device)
        if plan is not None and plan.n_positions:
            cls = cls + CODES * _position_codes(
                self._prompt_index_device(B, T, pos, nonpad, device), prompt_tok,
                plan.n_positions)
        slot = self.routing.slots(rr, cls)
        gate = (torch.ones(B * T, dtype=torch.uint8, device=device) if nonpad is None
                else nonpad.expand(B, T).reshape(-1).to(torch.uint8))
        state.backend = dispatch.requested_backend(self.backend)
        state.set(PHASE_MIXED, slot, gate)
        return self._protect_embeds(plan, args, kwargs, ids, embeds)

    def _prompt_index_device(self, B, T, pos, nonpad, device) -> torch.Tensor:
        """`_prompt_index` from tensor positions (no host sync)."""
        pm = self.tracker.prompt_mask if self.tracker.in_generate else None
        if pm is not None and B % pm.shape[0] == 0:
            P = pm.shape[1]
            cum = ((pm != 0).long().cumsum(1) - 1).to(device)
            idx = cum[:, pos.clamp(max=P - 1)]
            if B != pm.shape[0]:
                idx = idx.repeat_interleave(B // pm.shape[0], dim=0)
            return idx
        if nonpad is not None:
            # a forward holding prompt tokens starts the sequence here (outside generate)
            return nonpad.long().cumsum(1) - 1
        return pos.view(1, T)

    def _positions(self, args, kwargs, T, cache, device) -> torch.Tensor:
        """Absolute positions [T] of this forward's tokens, int64, without a host sync."""
        pos = self._arg(args, kwargs, "cache_position")
        if isinstance(pos, torch.Tensor) and pos.dim() == 1 and pos.shape[0] == T:
            return pos.to(device=device, dtype=torch.long)
        past = _past_length(cache)
        t = torch.arange(T, device=device)
        if isinstance(past, torch.Tensor):      # static caches: a device counter
            return t + past.to(device=device, dtype=torch.long).reshape(-1)[:1]
        return t + int(past)

    def _nonpad_device(self, args, kwargs, B, T, pos, prompt_tok, cache, device):
        """`_nonpad` with tensor positions: [B|1, T] bool, or None (no padding)."""
        mask = self._arg(args, kwargs, "attention_mask")
        if isinstance(mask, dict):
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        tracker = self.tracker
        nonpad = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] < T or mask.shape[0] not in (1, B):
                raise ValueError(f"attention_mask: expected shape [{B}, >= {T}] for input of "
                                 f"shape [{B}, {T}], got {tuple(mask.shape)}")
            nonpad = (mask[:, -T:] != 0).to(device)
        elif tracker.in_generate and tracker.prompt_mask is not None and \
                B % tracker.prompt_mask.shape[0] == 0:
            pm = tracker.prompt_mask
            P = pm.shape[1]
            cols = (pm != 0).to(device)[:, pos.clamp(max=P - 1)] | (pos >= P).view(1, T)
            if B != pm.shape[0]:         # num_beams / num_return_sequences expand rows
                cols = cols.repeat_interleave(B // pm.shape[0], dim=0)
            nonpad = cols
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            nonpad = self._nonpad_4d(mask, kwargs, B, T, cache, device, pos=pos)
        if nonpad is not None and tracker.in_generate:
            nonpad = nonpad | ~prompt_tok    # tokens fed after the prompt are never padding
        return nonpad

    def _mask_bits_device(self, plan, rr, B, T, pos, prompt_tok, device) -> torch.Tensor:
        """`DevicePlan._mask_bits` with tensor positions: mask j of a request sets bit j of
        its rows' prompt tokens at positions the mask marks."""
        bits = torch.zeros(B, T, dtype=torch.long, device=device)
        for r, masks in enumerate(plan.masks):
            if not masks:
                continue
            rows = (rr == self.routing.request_row[r]).view(B, 1)
            for j, m in enumerate(masks):
                if m.dim() == 1:
                    m = m.view(1, -1)
                if m.shape[0] not in (1, B):
                    raise ValueError(f"positions: mask of shape {tuple(m.shape)} does not match "
                                     f"a batch of {B} rows (expected [batch, prompt_len] or "
                                     "[prompt_len])")
                P = m.shape[-1]
                known = self.tracker.prompt_len if self.tracker.in_generate else None
                if known is not None and P != known:
                    raise ValueError(f"positions: mask of shape {tuple(m.shape)} does not match "
                                     f"the prompt [{B}, {known}] (expected [batch, prompt_len] "
                                     "or [prompt_len])")
                on = (m != 0)[:, pos.clamp(max=P - 1)] & (pos < P).view(1, T) & prompt_tok
                bits = bits | ((on & rows).long() << j)
        return bits

    # -- padding -------------------------------------------------------------------------
    def _nonpad(self, args, kwargs, B, T, start, n_prompt, cache, device):
        mask = self._arg(args, kwargs, "attention_mask")
        if isinstance(mask, dict):
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] < T or mask.shape[0] not in (1, B):
                raise ValueError(f"attention_mask: expected shape [{B}, >= {T}] for input of "
                                 f"shape [{B}, {T}], got {tuple(mask.shape)}")
            return (mask[:, -T:] != 0).expand(B, T).to(device)
        tracker = self.tracker
        if tracker.in_generate:
            if n_prompt == 0:
                return None          # tokens fed after the prompt are never padding
            pm = tracker.prompt_mask
            if pm is not None and pm.shape[1] >= start + T and B % pm.shape[0] == 0:
                cols = (pm[:, start:start + T] != 0).to(device)
                if B != pm.shape[0]:     # num_beams / num_return_sequences expand rows
                    cols = cols.repeat_interleave(B // pm.shape[0], dim=0)
                if n_prompt < T:
                    cols = cols.clone()
                    cols[:, n_prompt:] = True
                return cols
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return self._nonpad_4d(mask, kwargs, B, T, cache, device)
        if mask is not None and not isinstance(mask, torch.Tensor):
            return None              # e.g. a flex-attention BlockMask: no padding info
        return None

    def _nonpad_4d(self, mask, kwargs, B, T, cache, device, pos=None):
        if pos is None:
            pos = kwargs.get("cache_position")
        if not isinstance(pos, torch.Tensor):
            past = _past_length(cache)
            pos = torch.arange(T, device=mask.device) + (past.to(mask.device)
                                                          if isinstance(past, torch.Tensor) else past)
        pos = pos.to(mask.device).long().view(1, T, 1)
        rows = mask[:, 0]                          # [B or 1, T, K]
        K = rows.shape[-1]
        attend = rows if rows.dtype == torch.bool else rows == 0
        if K < T:
            raise ValueError(f"attention_mask: a 4-D mask with {K} key positions cannot cover "
                             f"{T} query tokens; pass a 2-D attention mask")
        own = attend.gather(-1, pos.clamp(max=K - 1).expand(rows.shape[0], T, 1)).squeeze(-1)
        nxt = (pos + 1).clamp(max=K - 1)
        future = attend.gather(-1, nxt.expand(rows.shape[0], T, 1)).squeeze(-1) & \
            (pos.squeeze(-1) + 1 < K)
        return (own & ~future).expand(B, T).to(device)


def _position_codes(index: torch.Tensor, prompt_tok: torch.Tensor, n_positions: int):
    """pidx of `fasteer.plan`: prompt index + 1 for prompt tokens with index < P, else 0."""
    inside = prompt_tok & (index >= 0) & (index < n_positions)
    return torch.where(inside, index + 1, 0)


class DevicePlan:
    """The parts of a compiled plan the metadata hook reads, on the model's device."""

    def __init__(self, compiled, device: torch.device):
        self.lut = compiled.lut.to(device)
        self.n_requests = compiled.lut.shape[0] - 1
        self.default_request = compiled.default_request
        self.row_requests = dict(compiled.row_requests)
        self.max_row = max(self.row_requests, default=-1)
        self.masks = [[m.to(device) for m in ms] for ms in compiled.masks]
        self.any_masks = any(self.masks)
        self.active_prompt = compiled.active_prompt
        self.active_generated = compiled.active_generated
        self.edits_layer0_input = compiled.edits_layer0_input
        self.n_positions = compiled.n_positions
        self._row_cache: dict[tuple, torch.Tensor] = {}
        self._generated: dict[tuple, torch.Tensor] = {}

    def row_requests_for(self, B: int, device) -> torch.Tensor:
        key = (B, device)
        rr = self._row_cache.get(key)
        if rr is None:
            if self.max_row >= B:
                raise ValueError(f"rows: steering was set for row {self.max_row} but this batch "
                                 f"has {B} rows (rows index the batch the model sees)")
            none = self.n_requests           # the lut's all -1 row
            default = self.default_request if self.default_request >= 0 else none
            rr = torch.full((B,), default, dtype=torch.long)
            for row, r in self.row_requests.items():
                rr[row] = r
            rr = rr.to(device)
            self._row_cache[key] = rr
        return rr

    def slots(self, B: int, T: int, start: int, n_prompt: int, prompt_len: int, nonpad,
              device, index: torch.Tensor | None = None) -> torch.Tensor:
        """Slots [B * T] (int32, contiguous) of a forward whose first ``n_prompt`` tokens
        are prompt tokens at absolute positions ``start ..`` of a ``prompt_len`` prompt;
        ``index`` [B|1, T]: the tokens' prompt indices (plans with position-indexed
        edits)."""
        if n_prompt == 0:          # decode steps: the same slots every step, computed once
            key = (B, T, device)
            slot = self._generated.get(key)
            if slot is None:
                rr = self.row_requests_for(B, device)
                lut = self.lut.to(device)
                slot = lut[rr, CLASS_GENERATED].view(B, 1).expand(B, T).reshape(-1).contiguous()
                self._generated[key] = slot
            return slot
        rr = self.row_requests_for(B, device)
        lut = self.lut if self.lut.device == device else self.lut.to(device)
        t = torch.arange(T, device=device)
        prompt_tok = (t < n_prompt).view(1, T)
        real = prompt_tok if nonpad is None else nonpad & prompt_tok
        if start + n_prompt >= prompt_len:      # this forward holds the end of the prompt
            last = torch.where(real, t.view(1, T), -1).amax(dim=1, keepdim=True)   # [B, 1]
            cls = torch.where(t.view(1, T) == last, CLASS_LAST_PROMPT, CLASS_PROMPT)
        else:
            cls = torch.full((1, T), CLASS_PROMPT, dtype=torch.long, device=device)
        if n_prompt < T:
            cls = torch.where(prompt_tok, cls, CLASS_GENERATED)
        if self.any_masks:
            cls = cls + N_CLASSES * self._mask_bits(rr, B, T, start, n_prompt, prompt_len, device)
        if self.n_positions and index is not None:
            cls = cls + CODES * _position_codes(index, prompt_tok, self.n_positions)
        return lut[rr.view(B, 1), cls.expand(B, T)].reshape(-1).contiguous()

    def _mask_bits(self, rr, B, T, start, n_prompt, prompt_len, device) -> torch.Tensor:
        bits = torch.zeros(B, T, dtype=torch.long, device=device)
        for r, masks in enumerate(self.masks):
            if not masks:
                continue
            rows = (rr == r).view(B, 1)
            for j, m in enumerate(masks):
                if m.dim() == 1:
                    m = m.view(1, -1)
                if m.shape[-1] != prompt_len or m.shape[0] not in (1, B):
                    raise ValueError(f"positions: mask of shape {tuple(m.shape)} does not match "
                                     f"the prompt [{B}, {prompt_len}] (expected [batch, "
                                     "prompt_len] or [prompt_len])")
                full = torch.zeros(B, T, dtype=torch.bool, device=device)
                full[:, :n_prompt] = m[:, start:start + n_prompt].expand(B, n_prompt)
                bits |= (full & rows).long() << j
        return bits
