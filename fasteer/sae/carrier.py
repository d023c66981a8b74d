"""Full-SAE replaces at a carrier: what the plan stores per stream point, and the device
side a carrier runs before its steer edits.

Why a second table kind next to the steer+norm tables: the sparse FEATURE edits of the
fused op read one encoder column and one decoder row per feature -- exact for any set of
ReLU / JumpReLU / linear features (a multi-feature edit reads them JOINTly, every z_k from
the same h; `fasteer.ops.layout`) -- but not for

* TopK SAEs: whether feature k is active depends on every other feature's pre-activation;
* dropping the error term (h replaced by the SAE's reconstruction).

Those lower to `fasteer.plan.SAEReplaceEdit` and run through ``fasteer.ops.sae_replace_``
(encode -> latent edits -> decode) on the whole SAE.

Per-row slots: a point's SAE replaces are grouped in *stages*. Stage ``(j, weights)`` holds,
for every slot whose j-th SAE replace at this point uses ``weights``, that replace's edits
(``edit_feat``/``edit_code`` [S, K], ``edit_val`` [S, K, 2], ``keep_error`` [S]) and a slot
map ``remap`` (global slot + 1 -> the slot itself, or -1 for slots that skip the stage;
slots past its end skip too). Stages run in order of j, so each row gets its own SAE replaces in its own order.
The device buffers are preallocated and overwritten in place while the stage structure
stays the same; the SAE weights are moved to the carrier's device once per (carrier, SAE)
(not at all when the SAE already lives there in a dtype the op reads).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .. import ops
from ..ops import layout as L
from ..ops.reference.sae_replace import sae_replace as reference_sae_replace

_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SAEWeights:
    """The tensors and flags the full-SAE op reads: one SAE, or a few features of one.

    ``w_enc`` [D, F], ``b_enc`` [F], ``w_dec`` [F, D], ``b_dec`` [D], ``threshold`` [F] (empty
    unless JumpReLU), ``activation`` (a layout ACT_* code), ``k`` (TopK), ``in_scale`` and
    ``apply_b_dec`` as in `fasteer.ops.sae_replace_`. Identity matters: stages and device
    copies are keyed by the object, so `full` returns the same object for the same SAE.
    """

    _full_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, w_enc, b_enc, w_dec, b_dec, threshold, *, activation: int, k: int,
                 in_scale: float, apply_b_dec: bool, name: str):
        self.w_enc, self.b_enc, self.w_dec, self.b_dec = w_enc, b_enc, w_dec, b_dec
        self.threshold = threshold
        self.activation, self.k = int(activation), int(k)
        self.in_scale, self.apply_b_dec = float(in_scale), bool(apply_b_dec)
        self.name = name

    @property
    def d_sae(self) -> int:
        return self.w_enc.shape[1]

    @classmethod
    def full(cls, sae) -> "SAEWeights":
        """The whole SAE, exactly as `fasteer.SAE.encode` / `decode` compute it."""
        hit = cls._full_cache.get(sae)
        if hit is not None:
            return hit
        tensors = sae.state_dict()
        for name, t in tensors.items():
            _check_finite(f"sae.{name}", t)
        dtype = sae.dtype if sae.dtype in _OP_DTYPES else torch.float32
        cast = (lambda t: t) if dtype == sae.dtype else (lambda t: t.to(dtype).contiguous())
        threshold = (cast(sae.threshold) if sae.threshold is not None
                     else torch.zeros(0, dtype=dtype, device=sae.device))
        out = cls(cast(sae.W_enc), cast(sae.b_enc), cast(sae.W_dec), cast(sae.b_dec), threshold,
                  activation=L.ACTIVATIONS[sae.activation], k=sae.k or 0,
                  in_scale=sae.input_scale, apply_b_dec=sae.apply_b_dec_to_input,
                  name=_sae_name(sae))
        cls._full_cache[sae] = out
        return out

    def on(self, device: torch.device) -> tuple:
        """(w_enc, b_enc, w_dec, b_dec, threshold) on ``device`` (a copy when elsewhere)."""
        return tuple(t if t.device == device else t.to(device)
                     for t in (self.w_enc, self.b_enc, self.w_dec, self.b_dec, self.threshold))


def _sae_name(sae) -> str:
    where = f"{sae.site}[{sae.layer}]" if sae.site else (sae.hook_name or "?")
    return f"SAE(d_sae={sae.d_sae}, {sae.activation}, at {where})"


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN/inf; expected finite SAE weights")


# --------------------------------------------------------------------------- host plan

@dataclass
class SAEStagePlan:
    """One stage of a point (host tensors, sized for ``n_slots``)."""
    weights: SAEWeights
    edit_feat: torch.Tensor     # int32 [S, K]
    edit_code: torch.Tensor     # int32 [S, K]
    edit_val: torch.Tensor      # float32 [S, K, 2]
    keep_error: torch.Tensor    # uint8 [S]
    remap: torch.Tensor         # int32 [S + 1]: slot + 1 -> slot, or -1 (not in this stage)


@dataclass
class SAEPointPlan:
    stages: list[SAEStagePlan]
    slot_has_edits: list[bool]


def plan_sae_point(per_slot: dict, n_slots: int) -> SAEPointPlan:
    """Group one point's SAE replaces (``{slot: [SAEReplaceEdit, ...]}``) into stages."""
    order: list[tuple[int, int]] = []              # stage keys (j, id(weights)), first-seen
    members: dict[tuple[int, int], dict[int, object]] = {}
    weights: dict[tuple[int, int], SAEWeights] = {}
    for s, items in per_slot.items():
        for j, e in enumerate(items):
            key = (j, id(e.weights))
            if key not in members:
                order.append(key)
                members[key] = {}
                weights[key] = e.weights
            members[key][s] = e
    order.sort(key=lambda key: key[0])             # stable: first-seen order within each j
    stages = []
    for key in order:
        entries = members[key]
        n_k = max(1, max(len(e.edits) for e in entries.values()))
        feat = torch.full((n_slots, n_k), -1, dtype=torch.int32)
        code = torch.zeros(n_slots, n_k, dtype=torch.int32)
        val = torch.zeros(n_slots, n_k, 2, dtype=torch.float32)
        keep = torch.ones(n_slots, dtype=torch.uint8)
        remap = torch.full((n_slots + 1,), -1, dtype=torch.int32)
        d_sae = weights[key].d_sae
        for s, e in entries.items():
            for j, (f, op, v, hi) in enumerate(e.edits):
                if not 0 <= f < d_sae:       # lowering checked; never hand the op a bad id
                    raise ValueError(f"feature: id {f} out of range 0..{d_sae - 1}")
                feat[s, j], code[s, j] = f, op
                val[s, j, 0], val[s, j, 1] = v, hi
            keep[s] = int(bool(e.keep_error))
            remap[s + 1] = s
        if not bool(torch.isfinite(val).all()):
            raise ValueError("value: SAE edit values must be finite")
        stages.append(SAEStagePlan(weights[key], feat, code, val, keep, remap))
    has = [bool(per_slot.get(s)) for s in range(n_slots)]
    return SAEPointPlan(stages, has)


# --------------------------------------------------------------------------- device side

class _Stage:
    """Device buffers of one stage; capacity may exceed the plan (unused slots skip)."""

    def __init__(self, plan: SAEStagePlan, tensors: tuple, device: torch.device,
                 slots: int, edits: int):
        self.weights = plan.weights
        self.tensors = tensors
        self.edit_feat = torch.full((slots, edits), -1, dtype=torch.int32, device=device)
        self.edit_code = torch.zeros(slots, edits, dtype=torch.int32, device=device)
        self.edit_val = torch.zeros(slots, edits, 2, dtype=torch.float32, device=device)
        self.keep_error = torch.ones(slots, dtype=torch.uint8, device=device)
        # global slot + 1 -> stage slot; one more entry than slots, always -1, catches
        # every slot beyond the capacity (a kept stage meets later plans with more slots)
        self.remap = torch.full((slots + 2,), -1, dtype=torch.int32, device=device)

    def fits(self, plan: SAEStagePlan) -> bool:
        s, k = plan.edit_feat.shape
        return plan.weights is self.weights and s <= self.edit_feat.shape[0] and \
            k <= self.edit_feat.shape[1]

    def write(self, plan: SAEStagePlan) -> None:
        """Overwrite in place (storage and pointers stay: captured graphs keep working)."""
        s, k = plan.edit_feat.shape
        self.edit_feat.fill_(-1)
        self.edit_code.zero_()
        self.edit_val.zero_()
        self.keep_error.fill_(1)
        self.remap.fill_(-1)
        self.edit_feat[:s, :k].copy_(plan.edit_feat)
        self.edit_code[:s, :k].copy_(plan.edit_code)
        self.edit_val[:s, :k].copy_(plan.edit_val)
        self.keep_error[:s].copy_(plan.keep_error)
        self.remap[:s + 1].copy_(plan.remap)


class SAEStages:
    """What one carrier runs before its steer edits: the stages of its point, in order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stages: list[_Stage] = []

    def fits(self, plan: SAEPointPlan) -> bool:
        """Can ``plan`` be written into the existing buffers (same SAEs in the same order,
        within their slot and edit capacity)?"""
        return len(plan.stages) == len(self.stages) and \
            all(st.fits(p) for st, p in zip(self.stages, plan.stages))

    def skip_all(self) -> None:
        """Keep the buffers but let every row skip every stage (a captured graph that
        runs them then leaves h unchanged)."""
        for st in self.stages:
            st.remap.fill_(-1)

    def write(self, plan: SAEPointPlan) -> None:
        if not self.fits(plan):
            # device copies of the weights, once per (carrier, SAE): reuse the ones held
            held = {id(st.weights): st.tensors for st in self.stages}
            stages = []
            for p in plan.stages:
                tensors = held.get(id(p.weights)) or p.weights.on(self.device)
                held[id(p.weights)] = tensors
                s, k = p.edit_feat.shape
                stages.append(_Stage(p, tensors, self.device, max(s, 4), k))
            self.stages = stages
        for st, p in zip(self.stages, plan.stages):
            st.write(p)

    def apply_(self, h: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor,
               backend: str | None) -> None:
        """Run every stage on ``h`` [..., D] in place (autograd-aware, like the steer edits)."""
        grad = torch.is_grad_enabled() and h.requires_grad
        index = slot.long() + 1
        for st in self.stages:
            w = st.weights
            stage_slot = st.remap.index_select(0, index.clamp(0, st.remap.numel() - 1))
            args = (stage_slot, gate, *st.tensors, st.edit_feat, st.edit_code, st.edit_val,
                    st.keep_error)
            if grad:
                # out of place in the differentiable reference, written back with copy_
                # (which autograd records), as the steer edits do
                rows = h.reshape(-1, h.shape[-1])
                new = reference_sae_replace(rows, *args, w.activation, w.k, w.in_scale,
                                            w.apply_b_dec)
                h.copy_(new.view_as(h))
                continue
            target = h if h.is_contiguous() else h.contiguous()
            ops._sae_replace_fast_(target, *args, activation=w.activation, k=w.k,
                                   in_scale=w.in_scale, apply_b_dec_to_input=w.apply_b_dec,
                                   backend=backend)
            if target is not h:
                h.copy_(target)


def sync_sae_stages(current: SAEStages | None, plan: SAEPointPlan | None,
                    device: torch.device, keep: bool = False) -> SAEStages | None:
    """The carrier's stages after a `Steerer.set`: updated in place when the structure is
    unchanged, rebuilt otherwise, None (weights released) when the point has none -- or,
    with ``keep`` (always-armed carriers, whose buffers a captured graph may hold), kept
    with every row skipping them."""
    if plan is None or not plan.stages:
        if keep and current is not None:
            current.skip_all()
            return current
        return None
    stages = current if current is not None else SAEStages(device)
    stages.write(plan)
    return stages
