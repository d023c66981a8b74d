"""Lowering interventions to slot tables.

Every intervention (`fasteer.interventions`, later SAE feature edits) lowers, through one
protocol -- ``intervention.lower(ctx) -> list[Edit]`` -- to *edits*: one entry of the
`fasteer.ops.layout` tables at one (layer, site). The plan then

1. gives every request (one `Steerer.set` call) its *slots*. A token carries one slot,
   but interventions of one request may have different position rules, so a request gets
   one slot per distinct set of interventions that can be active on a token: the token
   *class* (prompt / last prompt token / generated, plus one bit per explicit position
   mask) picks the slot through a small lookup table ``lut[request, class]`` that the
   per-token metadata reads once per forward;
2. writes, for every stream point, the edits of every slot in the order the
   interventions were given (``meta``/``params``), with the vectors they read stored once
   (``bank``; an alpha sweep over 256 rows stores its vector once). Full-SAE replaces
   (`SAEReplaceEdit`, from ``SAEReplace`` and some ``FeatureEdit``s) get their own per-point
   tables (`fasteer.sae.carrier`) and run before the point's steer edits.

Compiling is pure (host tensors, nothing of the model touched), so `Steerer.set`
validates everything before any live table changes. `SlotTables` are the preallocated
device buffers a carrier reads; they are overwritten in place and only reallocated when
a plan outgrows them (outside any forward), so a captured graph keeps its pointers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ops import layout as L
from .ops import validate_tables

# Token classes (the low part of the class code; explicit-mask bits sit above).
CLASS_PROMPT = 0        # a prompt token that is not the row's last prompt token
CLASS_LAST_PROMPT = 1   # the last non-pad prompt token of its row
CLASS_GENERATED = 2     # a token fed after the prompt forward (decode steps)
N_CLASSES = 3
MAX_MASKS = 4           # explicit position masks per request (2**4 classes each)
CODES = N_CLASSES << MAX_MASKS     # class codes of one position index (the lut's stride)
# Position-indexed edits (per-prompt-position scalars or vectors, `Edit.position`): a
# token's *index* i is its place in its row's prompt counting real (non-pad) tokens from
# 0, i.e. the position id Hugging Face gives it. The class code of a token is
#     code = class + N_CLASSES * mask_bits + CODES * pidx,   pidx = i + 1 if i < P else 0
# where P is the plan's largest indexed length: each index gets its own slot, whose
# tables hold that index's edits, so the kernels need nothing new (a slot per position).
MAX_POSITIONS = 512

POSITION_RULES = ("all", "prompt", "generated", "last_prompt")


@dataclass(frozen=True)
class LoweredCondition:
    """Condition of one edit: COND_COSINE or COND_PROJ against ``vector``."""
    kind: int
    vector: torch.Tensor      # float32 [D], CPU
    threshold: float
    bias: float = 0.0


@dataclass(frozen=True)
class Edit:
    """One lowered edit: what a slot does at (layer, site). The lowering target.

    ``u``/``w`` are float32 [D] CPU vectors (bank rows); ``p`` are params p0..p3 (see
    `fasteer.ops.layout`). Feature edits (SAE) set ``kind=L.FEATURE`` with ``feature_op``
    and ``activation``.
    """
    layer: int
    site: str
    kind: int
    u: torch.Tensor | None = None
    w: torch.Tensor | None = None
    p: tuple[float, ...] = ()
    feature_op: int = 0
    activation: int = 0
    preserve_norm: bool = False
    condition: LoweredCondition | None = None
    joint: bool = False       # reads the row the previous edit read (layout.JOINT)
    position: int | None = None   # only the prompt token at this index (position-indexed)

    def code(self) -> int:
        cond = L.COND_NONE if self.condition is None else self.condition.kind
        return L.pack_code(self.kind, feature_op=self.feature_op, activation=self.activation,
                           condition=cond, preserve_norm=self.preserve_norm, joint=self.joint)


@dataclass(frozen=True)
class SAEReplaceEdit:
    """One lowered full-SAE replace at (layer, site): encode -> latent edits -> decode.

    The second lowering target next to `Edit`, for what the sparse FEATURE edits cannot do
    exactly (TopK SAEs, dropping the error term).
    ``weights`` is a `fasteer.sae.carrier.SAEWeights`; ``edits`` are ``(feature, op, value,
    hi)`` tuples (op a `fasteer.ops.layout` FEAT_* code). A carrier runs the SAE replaces of
    a point before its steer edits (`fasteer.sae.carrier`).
    """
    layer: int
    site: str
    weights: object
    edits: tuple = ()
    keep_error: bool = True


@dataclass(frozen=True)
class LoweringContext:
    """What an intervention may know about the model when it lowers."""
    n_layers: int
    hidden: int
    model_type: str


@dataclass
class Request:
    """One `Steerer.set` call: interventions for some rows (None = every row)."""
    interventions: tuple
    rows: tuple[int, ...] | None


@dataclass
class PointTables:
    """Host tables for one stream point."""
    meta: torch.Tensor        # int32 [S, E, 4]
    params: torch.Tensor      # float32 [S, E, 8]
    bank: torch.Tensor        # float32 [V, D]
    slot_has_edits: list[bool]


@dataclass
class CompiledPlan:
    n_slots: int
    n_mask_bits: int
    lut: torch.Tensor                          # int32 [R + 1, N_CLASSES << bits]; last row: -1
    default_request: int                       # request index for rows not named (-1 none)
    row_requests: dict[int, int]               # explicit row -> request index
    masks: list[list[torch.Tensor]]            # per request: explicit masks, bit order
    points: dict[tuple[str, int], PointTables]
    # per stream point, whether any slot reachable in a prompt / generated token has edits
    armed: dict[tuple[str, int], tuple[bool, bool]] = field(default_factory=dict)
    active_prompt: bool = False
    active_generated: bool = False
    edits_layer0_input: bool = False           # ("pre", 0) edited: clone user inputs_embeds
    # per stream point: the full-SAE replaces (`fasteer.sae.carrier.SAEPointPlan`)
    sae_points: dict = field(default_factory=dict)
    # P: the largest prompt index + 1 of position-indexed edits (0: none); the lut then has
    # CODES * (P + 1) columns
    n_positions: int = 0


def rule_passes(rule, cls: int, bits: int, mask_index: dict[int, int]) -> bool:
    """Does a position rule select a token of class ``cls`` with mask bits ``bits``?"""
    if isinstance(rule, str):
        if rule == "all":
            return True
        if rule == "prompt":
            return cls in (CLASS_PROMPT, CLASS_LAST_PROMPT)
        if rule == "generated":
            return cls == CLASS_GENERATED
        if rule == "last_prompt":
            return cls == CLASS_LAST_PROMPT
        raise ValueError(f"positions: expected one of {POSITION_RULES} or a bool mask, got {rule!r}")
    bit = mask_index[id(rule)]
    return cls != CLASS_GENERATED and bool((bits >> bit) & 1)


def compile_plan(requests: list[Request], sites, ctx: LoweringContext,
                 lower=None) -> CompiledPlan:
    """Lower ``requests`` for the model described by ``sites`` (a `ModelSites`).

    ``lower(intervention) -> list[Edit]`` defaults to ``intervention.lower(ctx)``; the
    `Steerer` passes a memoised one, so re-planning after a `set` does not lower again.
    """
    lower = lower or (lambda iv: iv.lower(ctx))
    # 1. lower every intervention once, mapping each edit to its stream point
    lowered: list[list[list[tuple[tuple[str, int], Edit]]]] = []
    for req in requests:
        per_iv = []
        for iv in req.interventions:
            edits = lower(iv)
            mapped = []
            for e in edits:
                if not isinstance(e, (Edit, SAEReplaceEdit)):
                    raise TypeError(f"{type(iv).__name__}.lower: expected Edit entries, "
                                    f"got {type(e).__name__}")
                point = sites.stream_point(e.layer, e.site)
                mapped.append((point, e))
            per_iv.append(mapped)
        lowered.append(per_iv)

    # position-indexed interventions: the number of prompt indices each one edits
    indexed: list[dict[int, int]] = []          # per request: iv index -> P
    for r, per_iv in enumerate(lowered):
        sizes = {}
        for i, mapped in enumerate(per_iv):
            pos = [e.position for _, e in mapped if getattr(e, "position", None) is not None]
            if pos:
                rule = requests[r].interventions[i].positions
                if not (isinstance(rule, str) and rule in ("all", "prompt")):
                    raise ValueError(
                        f"positions: {type(requests[r].interventions[i]).__name__} with "
                        "per-position values edits prompt tokens by their index; its position "
                        f"rule must be 'prompt' (or 'all'), got {_rule_name(rule)}")
                sizes[i] = max(pos) + 1
        indexed.append(sizes)
    n_positions = max((p for sizes in indexed for p in sizes.values()), default=0)
    if n_positions > MAX_POSITIONS:
        raise ValueError(f"positions: per-position values cover {n_positions} prompt positions; "
                         f"fasteer supports up to {MAX_POSITIONS}")

    # 2. slots: one per distinct non-empty set of active interventions per request (and,
    #    for position-indexed ones, per prompt index)
    masks: list[list[torch.Tensor]] = []
    n_bits = 0
    for req in requests:
        req_masks = []
        for iv in req.interventions:
            rule = iv.positions
            if not isinstance(rule, str) and all(rule is not m for m in req_masks):
                req_masks.append(rule)
        if len(req_masks) > MAX_MASKS:
            raise ValueError(f"positions: at most {MAX_MASKS} distinct explicit masks per set() "
                             f"call, got {len(req_masks)}")
        masks.append(req_masks)
        n_bits = max(n_bits, len(req_masks))
    n_codes = N_CLASSES << n_bits
    width = CODES * (n_positions + 1) if n_positions else n_codes
    lut = torch.full((len(requests) + 1, width), -1, dtype=torch.int32)
    # slot -> (request, iv indices, prompt index + 1 or 0)
    slot_members: list[tuple[int, tuple[int, ...], int]] = []
    slot_prompt: list[bool] = []
    slot_generated: list[bool] = []
    for r, req in enumerate(requests):
        mask_index = {id(m): j for j, m in enumerate(masks[r])}
        seen: dict[tuple, int] = {}
        sizes = indexed[r]
        for pidx in range(max(sizes.values(), default=0) + 1):
            for code in range(n_codes):
                cls, bits = code % N_CLASSES, code // N_CLASSES
                if bits >> len(masks[r]):
                    continue     # bits this request has no mask for never occur in its rows
                members = tuple(
                    i for i, iv in enumerate(req.interventions)
                    if rule_passes(iv.positions, cls, bits, mask_index) and
                    (i not in sizes or (cls != CLASS_GENERATED and 0 < pidx <= sizes[i])))
                if not members:
                    continue
                key = (members, pidx if any(i in sizes for i in members) else 0)
                if key not in seen:
                    seen[key] = len(slot_members)
                    slot_members.append((r, *key))
                    slot_prompt.append(False)
                    slot_generated.append(False)
                s = seen[key]
                lut[r, code + CODES * pidx] = s
                if cls == CLASS_GENERATED:
                    slot_generated[s] = True
                else:
                    slot_prompt[s] = True
        if n_positions:
            # indices past this request's own ones read as "no index" (pidx 0)
            base = lut[r, :CODES]
            for pidx in range(max(sizes.values(), default=0) + 1, n_positions + 1):
                lut[r, CODES * pidx:CODES * (pidx + 1)] = base
    n_slots = len(slot_members)

    # 3. per stream point: entries per slot, in intervention order, with a shared bank
    entries: dict[tuple[str, int], dict[int, list[Edit]]] = {}
    sae_entries: dict[tuple[str, int], dict[int, list[SAEReplaceEdit]]] = {}
    for s, (r, members, pidx) in enumerate(slot_members):
        for i in members:
            for point, e in lowered[r][i]:
                if getattr(e, "position", None) is not None and e.position != pidx - 1:
                    continue
                if isinstance(e, SAEReplaceEdit):
                    _check_sae_order(entries, point, s, requests[r].interventions[i])
                    sae_entries.setdefault(point, {}).setdefault(s, []).append(e)
                else:
                    entries.setdefault(point, {}).setdefault(s, []).append(e)
    points: dict[tuple[str, int], PointTables] = {}
    armed: dict[tuple[str, int], tuple[bool, bool]] = {}
    for point, per_slot in entries.items():
        points[point] = _point_tables(per_slot, n_slots, ctx.hidden)
        has = points[point].slot_has_edits
        armed[point] = (any(has[s] and slot_prompt[s] for s in range(n_slots)),
                        any(has[s] and slot_generated[s] for s in range(n_slots)))

    sae_points = _plan_sae_points(sae_entries, n_slots, slot_prompt, slot_generated, armed)

    default_request = -1
    row_requests: dict[int, int] = {}
    for r, req in enumerate(requests):
        if req.rows is None:
            default_request = r
        else:
            for row in req.rows:
                row_requests[row] = r
    return CompiledPlan(
        n_slots=n_slots, n_mask_bits=n_bits, lut=lut, default_request=default_request,
        row_requests=row_requests, masks=masks, points=points, armed=armed,
        active_prompt=any(a[0] for a in armed.values()),
        active_generated=any(a[1] for a in armed.values()),
        edits_layer0_input=any(armed.get(("pre", 0), (False, False))),
        sae_points=sae_points, n_positions=n_positions)


def _rule_name(rule) -> str:
    return repr(rule) if isinstance(rule, str) else "an explicit mask"


def _check_sae_order(entries, point, slot: int, intervention) -> None:
    """A carrier runs a point's SAE replaces before its steer edits: refuse a plan that
    asks for the opposite order instead of silently reordering it."""
    if entries.get(point, {}).get(slot):
        raise ValueError(
            f"interventions: {type(intervention).__name__} runs the full SAE op, which fasteer "
            f"applies before the other edits at the same site ({point}); list it before the "
            "interventions (Add, Clamp, single-feature FeatureEdit, ...) at that site")


def _plan_sae_points(sae_entries, n_slots, slot_prompt, slot_generated, armed) -> dict:
    """Host tables of the full-SAE replaces per stream point; arms their points."""
    if not sae_entries:
        return {}
    from .sae.carrier import plan_sae_point   # the SAE package builds on this module

    out = {}
    for point, per_slot in sae_entries.items():
        out[point] = plan = plan_sae_point(per_slot, n_slots)
        has = plan.slot_has_edits
        prompt, generated = armed.get(point, (False, False))
        armed[point] = (prompt or any(has[s] and slot_prompt[s] for s in range(n_slots)),
                        generated or any(has[s] and slot_generated[s] for s in range(n_slots)))
    return out


def _point_tables(per_slot: dict[int, list[Edit]], n_slots: int, hidden: int) -> PointTables:
    n_edits = max((len(x) for x in per_slot.values()), default=0)
    meta = [[0, -1, -1, -1]] * (n_slots * n_edits)
    params = [[0.0] * L.PARAM_WIDTH] * (n_slots * n_edits)
    bank_rows: list[torch.Tensor] = []
    by_id: dict[int, int] = {}       # the same tensor object: no need to hash its bytes
    by_bytes: dict[bytes, int] = {}

    def row_of(v: torch.Tensor | None) -> int:
        if v is None:
            return -1
        row = by_id.get(id(v))
        if row is not None:
            return row
        t = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if t.shape != (hidden,):
            raise ValueError(f"vector: expected shape [{hidden}] (the model's hidden size), "
                             f"got {tuple(t.shape)}")
        key = t.numpy().tobytes()
        row = by_bytes.get(key)
        if row is None:
            row = by_bytes[key] = len(bank_rows)
            bank_rows.append(t)
        by_id[id(v)] = row           # v stays alive (held by its Edit) while this runs
        return row

    for s, edits in per_slot.items():
        for e_idx, e in enumerate(edits):
            if len(e.p) > 4:
                raise ValueError(f"Edit.p: expected at most 4 edit scalars, got {len(e.p)}")
            cond = e.condition
            k = s * n_edits + e_idx
            meta[k] = [e.code(), row_of(e.u), row_of(e.w),
                       -1 if cond is None else row_of(cond.vector)]
            p = [float(x) for x in e.p] + [0.0] * (L.PARAM_WIDTH - len(e.p))
            if cond is not None:
                p[L.P_COND_THRESH] = float(cond.threshold)
                p[L.P_COND_BIAS] = float(cond.bias)
            params[k] = p
    meta_t = torch.tensor(meta, dtype=torch.int32).view(n_slots, n_edits, L.META_WIDTH)
    params_t = torch.tensor(params, dtype=torch.float32).view(n_slots, n_edits, L.PARAM_WIDTH)
    bank = torch.stack(bank_rows) if bank_rows else torch.zeros(0, hidden, dtype=torch.float32)
    validate_tables(meta_t, params_t, bank, hidden)
    has = [False] * n_slots
    for s, edits in per_slot.items():
        has[s] = len(edits) > 0
    return PointTables(meta_t, params_t, bank, has)


class SlotTables:
    """The device buffers one carrier reads: meta, params, bank, grown only when needed.

    Unused slots/edits are kind NONE (zeros), unused bank rows zeros; the buffers are
    overwritten in place by `write`, so their storage (and a captured graph's pointers)
    survives every `Steerer.set` that fits.
    """

    def __init__(self, hidden: int, device: torch.device, slots: int = 1, edits: int = 1,
                 bank_rows: int = 1):
        self.hidden, self.device = hidden, device
        self.meta = torch.zeros(slots, edits, L.META_WIDTH, dtype=torch.int32, device=device)
        self.params = torch.zeros(slots, edits, L.PARAM_WIDTH, dtype=torch.float32, device=device)
        self.bank = torch.zeros(bank_rows, hidden, dtype=torch.float32, device=device)

    def fits(self, t: PointTables | None) -> bool:
        if t is None:
            return True
        s, e = t.meta.shape[:2]
        return s <= self.meta.shape[0] and e <= self.meta.shape[1] and \
            t.bank.shape[0] <= self.bank.shape[0]

    def grow_for(self, t: PointTables, min_slots: int = 0) -> None:
        """Reallocate (doubling) so that ``t`` fits; drops the old contents."""
        s, e = t.meta.shape[:2]
        slots = max(self.meta.shape[0], min_slots)
        while slots < s:
            slots *= 2
        edits = max(self.meta.shape[1], e)
        rows = self.bank.shape[0]
        while rows < t.bank.shape[0]:
            rows *= 2
        self.__init__(self.hidden, self.device, slots, edits, rows)

    def write(self, t: PointTables | None) -> None:
        """Overwrite the buffers in place with ``t`` (None: clear)."""
        self.meta.zero_()
        self.params.zero_()
        self.bank.zero_()
        if t is None:
            return
        s, e = t.meta.shape[:2]
        self.meta[:s, :e].copy_(t.meta)
        self.params[:s, :e].copy_(t.params)
        self.bank[:t.bank.shape[0]].copy_(t.bank)
