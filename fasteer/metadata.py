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
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .ops import dispatch
from .plan import CLASS_GENERATED, CLASS_LAST_PROMPT, CLASS_PROMPT, N_CLASSES

# Phases of one forward (index into a carrier's `armed` tuple).
PHASE_PROMPT, PHASE_GENERATED, PHASE_MIXED, PHASE_OFF = 0, 1, 2, 3

_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


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
        try:
            yield
        finally:
            self.__dict__.update(saved)


    @contextlib.contextmanager
    def decoding(self, prompt_len: int):
        """Forwards inside are decode steps continuing a ``prompt_len``-token prompt (for
        hand-written decode loops, e.g. over a captured graph, where reading a static
        cache's length would be a device sync)."""
        saved = dict(self.__dict__)
        self.in_generate, self.first_forward = True, False
        self.prompt_len, self.prompt_mask, self.position = prompt_len, None, prompt_len
        try:
            yield
        finally:
            self.__dict__.update(saved)


def wrap_generate(model, tracker: GenerationTracker):
    """Return (install, remove) for a ``generate`` wrapper that tells `tracker` a call began."""
    original = getattr(model, "generate", None)
    if not callable(original):
        return (lambda: None), (lambda: None)
    had_instance_attr = "generate" in model.__dict__
    previous = model.__dict__.get("generate")

    def generate(*args, **kwargs):
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
            slot = plan.slots(B, T, start, n_prompt, prompt_len, nonpad, device)
        gate = (self._constant(B * T, 1, torch.uint8, device) if nonpad is None
                else nonpad.reshape(-1).to(torch.uint8).contiguous())
        state.backend = dispatch.requested_backend(None)
        state.set(phase, slot, gate)

        # The carrier at resid_pre[0] edits the embeddings in place; never a caller's tensor.
        if plan is not None and plan.edits_layer0_input and isinstance(embeds, torch.Tensor) \
                and not isinstance(ids, torch.Tensor):
            kwargs = dict(kwargs)
            args = list(args)
            if "inputs_embeds" in kwargs:
                kwargs["inputs_embeds"] = embeds.clone()
            else:
                args[self.param_names.index("inputs_embeds")] = embeds.clone()
            return tuple(args), kwargs
        return None

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

    def _nonpad_4d(self, mask, kwargs, B, T, cache, device):
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
              device) -> torch.Tensor:
        """Slots [B * T] (int32, contiguous) of a forward whose first ``n_prompt`` tokens
        are prompt tokens at absolute positions ``start ..`` of a ``prompt_len`` prompt."""
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
