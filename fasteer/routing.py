"""Per-row routing on the device: which slot a token of a batch row uses.

A compiled plan (`fasteer.plan`) says, for every request (one `Steerer.set` call), which
slot a token of each *class* (prompt / last prompt token / generated, plus explicit
position-mask bits) uses: ``lut[request, class]``; and which request each batch row
belongs to. `Routing` keeps both in two device buffers that live as long as the
`Steerer`:

``lut``   int32 [R + 1, C]   slot of (lut row, class code); the last row is all -1
                             ("untouched"); C = 48 (every class code with 4 mask bits)
                             times 1 + the prompt positions of position-indexed edits
``rows``  int64 [N]          lut row of batch row b for b < N - 1; entry N - 1 is the
                             lut row of every row not named in a ``set`` (the default)

Why buffers and not Python values: a graph compiled by `torch.compile`, or captured as a
CUDA graph, reads tensors by address and bakes Python values in. The per-token slot
computation of `fasteer.metadata` reads ``lut`` and ``rows`` as tensors, and
`Steerer.set` rewrites them in place, so changing which rows use which slot between two
replays needs neither a recompile nor a re-capture.

Only requests that use at least one slot get a lut row (a ``set([], rows=...)`` routes
those rows to the all -1 row), so R never exceeds the slot count. With ``fixed=True``
(``fasteer.patch(..., always_armed=True)``) the buffers are never reallocated: a plan
that needs more lut rows or names a batch row beyond the table raises a ValueError
before anything is written; otherwise they grow (doubling) outside any forward.
"""
from __future__ import annotations

import torch

from .plan import CODES

# Fixed buffers (armed ahead) hold room for position-indexed plans of this many prompt
# positions (`fasteer.plan.MAX_POSITIONS`): one int32 column per class code and index.
ARMED_POSITIONS = 64


class Routing:
    """The ``lut``/``rows`` buffers (see the module docstring)."""

    def __init__(self, device: torch.device, requests: int = 4, rows: int = 64,
                 fixed: bool = False):
        self.device, self.fixed = torch.device(device), fixed
        self.request_row: list[int] = []    # plan request index -> lut row
        self._alloc(requests, rows, CODES * (ARMED_POSITIONS + 1) if fixed else CODES)

    def _alloc(self, requests: int, rows: int, codes: int) -> None:
        self.lut = torch.full((requests + 1, codes), -1, dtype=torch.int32, device=self.device)
        self.rows = torch.full((rows,), requests, dtype=torch.long, device=self.device)
        if self.fixed:
            _mark_static(self.lut, self.rows)

    @property
    def none_row(self) -> int:
        return self.lut.shape[0] - 1

    @property
    def max_named_row(self) -> int:
        """The largest batch row index a ``set(..., rows=...)`` may name."""
        return self.rows.shape[0] - 2

    # -- planning (host side, outside any forward) ---------------------------------------
    @staticmethod
    def _needs(compiled) -> tuple[list[int], int]:
        """(requests that use a slot, largest named row) of a compiled plan."""
        if compiled is None:
            return [], -1
        used = torch.nonzero((compiled.lut[:-1] >= 0).any(dim=1)).flatten().tolist()
        return used, max(compiled.row_requests, default=-1)

    def check(self, compiled) -> None:
        """Raise if ``compiled`` does not fit fixed buffers (nothing is modified)."""
        if not self.fixed:
            return
        used, max_row = self._needs(compiled)
        if len(used) > self.none_row:
            raise ValueError(
                f"slots: this plan routes {len(used)} distinct steering requests but "
                f"fasteer.patch(..., always_armed=True) armed room for {self.none_row}; the "
                "routing table is fixed so that captured CUDA graphs stay valid: patch again "
                "with a larger slots=")
        if max_row > self.max_named_row:
            raise ValueError(
                f"rows: row {max_row} is beyond the {self.max_named_row + 1} batch rows the fixed "
                "routing table of fasteer.patch(..., always_armed=True) can name")
        if compiled is not None and compiled.lut.shape[1] > self.lut.shape[1]:
            raise ValueError(
                f"positions: this plan has per-position values for {compiled.n_positions} prompt "
                f"positions, but the fixed routing table of fasteer.patch(..., "
                f"always_armed=True) has room for {ARMED_POSITIONS}")

    def write(self, compiled) -> None:
        """Route ``compiled`` (None: every row untouched), in place when it fits."""
        self.check(compiled)
        used, max_row = self._needs(compiled)
        requests, rows, codes = self.none_row, self.rows.shape[0], self.lut.shape[1]
        while requests < len(used):
            requests *= 2
        while rows - 2 < max_row:
            rows *= 2
        if compiled is not None:
            codes = max(codes, compiled.lut.shape[1])
        if (requests, rows, codes) != (self.none_row, self.rows.shape[0], self.lut.shape[1]):
            self._alloc(requests, rows, codes)
        none = self.none_row
        self.request_row = [none] * (0 if compiled is None else compiled.lut.shape[0] - 1)
        self.lut.fill_(-1)
        if compiled is None:
            self.rows.fill_(none)
            return
        n_codes = compiled.lut.shape[1]
        for k, r in enumerate(used):
            self.request_row[r] = k
        if used:
            src = compiled.lut[used].to(self.device)
            self.lut[:len(used), :n_codes].copy_(src)
        d = compiled.default_request
        default = none if d < 0 else self.request_row[d]
        host = torch.full((self.rows.shape[0],), default, dtype=torch.long)
        for row, r in compiled.row_requests.items():
            host[row] = self.request_row[r]
        self.rows.copy_(host.to(self.device))

    # -- forward side (tensor ops only: traceable, capturable) ----------------------------
    def requests_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """lut row of each of ``batch`` rows, int64 [batch]."""
        idx = torch.arange(batch, device=self.device).clamp_(max=self.rows.shape[0] - 1)
        rr = self.rows[idx]
        return rr if rr.device == device else rr.to(device)

    def slots(self, rr: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Slots int32 [B * T] of tokens with lut rows ``rr`` [B] and class codes ``cls``
        [B, T] (or [1, T])."""
        lut = self.lut if self.lut.device == rr.device else self.lut.to(rr.device)
        B, T = rr.shape[0], cls.shape[-1]
        return lut[rr.view(B, 1), cls.expand(B, T)].reshape(-1).contiguous()


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell `torch.compile`'s CUDA-graph trees that these buffers keep their address (they
    are updated in place), so replays read them directly instead of copying them in."""
    if not all(t.is_cuda for t in tensors):
        return
    try:
        import torch._dynamo
        for t in tensors:
            torch._dynamo.mark_static_address(t)
    except Exception:  # noqa: BLE001 - an optimisation hint only
        pass
