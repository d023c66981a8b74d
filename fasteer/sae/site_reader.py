"""Read the residual stream at one stream point, as the model uses it (after fasteer's
edits there) and, optionally, as it arrives (before them).

Why hooks on the carrier's module and not on the decoder layer: a carrier edits the
stream *in place* inside the module that reads the point (the pre-norm, or a pre-hook on
a layer/MLP). A forward hook on that module runs after its forward, when the tensor it
received -- the stream itself -- already holds the edit; so a reader sees exactly what
the rest of the model sees, for ``resid_pre``, ``resid_mid`` and ``resid_post`` alike, and
whether or not a carrier is installed at the moment.

The exception is an ``output`` point (the last layer's output on architectures whose
final norm fasteer does not know): the carrier there is a forward hook on the same layer,
which may be registered after the reader's. The reader then only keeps a reference to the
output and reads it in a forward hook on the base model, after every layer hook ran.

``before=`` (the stream *before* fasteer's edits at the point, h_in), per carrier kind:

* ``norm``   -- a forward pre-hook on the norm: pre-hooks run before ``forward``, and the
  fused steer+norm edits inside ``forward``.
* ``input``  -- a forward pre-hook on the module, registered with ``prepend=True``: the
  carrier's own pre-hook is appended whenever it is (re)installed, so ours runs first.
* ``output`` -- a forward hook on the module, ``prepend=True``: it runs before the
  carrier's forward hook edits the output in place.

The ``before`` callback gets the live tensor, which the carrier edits right after it
returns: it must read what it needs then, not keep a reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..sites import ModelSites


class PointReader:
    """Call ``callback(h)`` with the stream ``h`` [B, T, D] at ``key`` on every forward, after
    fasteer's edits there; and ``before(h)``, if given, with the stream before them."""

    def __init__(self, sites: ModelSites, key: tuple[str, int],
                 callback: Callable[[torch.Tensor], None],
                 before: Callable[[torch.Tensor], None] | None = None):
        self.callback = callback
        self.before = before
        self._pending: torch.Tensor | None = None
        point = sites.points[key]
        if point.kind in ("norm", "input"):
            self.handles = [point.module.register_forward_hook(self._after_module,
                                                               with_kwargs=True)]
            if before is not None:
                self.handles.append(point.module.register_forward_pre_hook(
                    self._before_module, with_kwargs=True, prepend=True))
        else:
            self.handles = [point.module.register_forward_hook(self._stash),
                            sites.base.register_forward_hook(self._flush)]
            if before is not None:
                self.handles.append(point.module.register_forward_hook(self._before_output,
                                                                       prepend=True))

    @staticmethod
    def _input(args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        return h if isinstance(h, torch.Tensor) else None

    def _before_module(self, module, args, kwargs):
        h = self._input(args, kwargs)
        if h is not None:
            self.before(h)
        return None

    def _before_output(self, module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(h, torch.Tensor):
            self.before(h)
        return None

    def _after_module(self, module, args, kwargs, output):
        h = self._input(args, kwargs)
        if h is not None:
            self.callback(h)

    def _stash(self, module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        self._pending = h if isinstance(h, torch.Tensor) else None

    def _flush(self, module, args, output):
        h, self._pending = self._pending, None
        if h is not None:
            self.callback(h)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._pending = None
