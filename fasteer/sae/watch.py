"""Monitoring: record a few SAE features' activations for every token while the model runs.

``w = st.watch(sae, features=[12, 40], max_tokens=64)`` then ``model.generate(...)``:
``w.values()`` is a ``[batch, n, K]`` float32 tensor, token ``t`` of row ``b`` in
``[b, t]``, in the order the tokens were fed -- for ``tokens="all"`` the same columns as
``generate``'s output sequence (its last token is never fed back, so ``n`` is one less),
padding positions included (they hold whatever the model computed there). ``tokens=
"generated"`` keeps only tokens fed after the prompt.

Two values per feature (``value=`` picks which are recorded; docs/watch.md has the math):

* **edited** (``w.edited_values()``; what ``w.values()`` returns unless ``value="encoded"``):
  the latent *as the edit set it*. Let h_in be the stream at the watch's point before
  fasteer's edits there (after all upstream steering). For a watched feature k that a
  ``FeatureEdit`` / ``SAEReplace`` of this SAE edits at this same point, on the tokens where
  that edit applied (its rows, ``positions=``, ``when=``, padding): the op's output
  ``op(z_k)`` -- ``FeatureEdit(sae, k, "set", 40)`` reads 40 there. Everywhere else:
  ``z_k(h_in)``. When several edits of the same feature apply to a token, the last one's
  output; an edit reads the stream as the edits before it at this point left it (as the
  carrier does), so ``op`` sees the same z_k the carrier's op saw.
* **encoded** (``w.encoded_values()``): ``z_k(h_out)``, the SAE re-encoding the stream after
  fasteer's edits here, i.e. what the SAE reads from the stream later layers see. It
  differs from the edited value whenever ``u_k . w_k != 1`` (encoder column and decoder row
  of k are not dual) or the change along other features' decoder rows (or other edits at
  the point) leaks into ``u_k``: ``z_k(h_out) = act(z_pre_k(h_in) + sum_j dz_j u_k.w_j +
  u_k.(other edits))``.

Which edits are "of this SAE": fused ``FeatureEdit`` entries (ReLU / JumpReLU / linear SAEs)
are recognised by their encoder column and decoder row being bitwise those of a watched
feature; full-SAE entries (TopK ``FeatureEdit``, ``SAEReplace``) by their SAE weights (the
same `fasteer.SAE` object, or equal W_enc / W_dec). The edited value is computed by replaying
the point's slot tables on h_in in float32 (`fasteer.ops.reference` math), so rows,
positions, conditions and the order of edits are exactly the carrier's; a ``when=``
condition sitting exactly on its threshold may resolve differently in float32 than in the
fused kernel (measure zero in practice).

How h_in is read (`fasteer.sae.site_reader`): a forward pre-hook (``norm`` and ``input``
points; it runs before the fused norm's forward and, prepended, before an ``input``
carrier's pre-hook) or a prepended forward hook (``output`` points, before the carrier's
hook) on the carrier's module; h_out as before, after the module / at the end of the base
model's forward.

Cost, per forward of N = batch x tokens rows, at one site:
* ReLU / JumpReLU / linear SAEs: ``pre = h @ U^T + b`` with only the K watched encoder
  columns (folded: b_dec and input scaling inside U and b, `fasteer.SAE.feature_encoder`),
  an activation and a copy of N x K floats into the buffer: O(N D K) flops, K x D floats of
  weights read -- for K = 16, D = 4096 about 0.1 MFLOP per token, nothing next to the model.
  ``value="both"`` does it twice (h_in and h_out); where no edit runs at the point, once.
* TopK SAEs: the watched features' values depend on every feature, so the full encode runs
  (O(N D F)); exact, but priced like the SAE itself (twice for ``"both"``).
* Only where an edit of a watched feature runs at this point: a float32 replay of that
  point's edits on the recorded rows (O(N D E) for E edits per slot, the fused kernel's own
  work once more; plus one SAE encode per full-SAE stage of this SAE), and, once after each
  `Steerer.set`, a scan of the point's tables (one host sync).
No host sync with ``tokens="all"``; ``tokens="generated"`` outside ``generate`` reads the
cache length once per forward (as fasteer's metadata does). The buffers are allocated once
(``batch_size=`` or at the first forward) and written in place; the recording runs outside
``torch.compile`` (a graph break) because its cursor is a host integer, and is not meant
for CUDA-graph capture.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from ..metadata import _CACHE_NAMES, _past_length
from ..ops import layout as L
from .interventions import check_width, resolve_sae_placement
from .sae import SAE
from .site_reader import PointReader

TOKENS = ("all", "generated")
VALUES = ("edited", "encoded", "both")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _latent_op(op: torch.Tensor, z: torch.Tensor, val: torch.Tensor, hi: torch.Tensor):
    """The FEAT_* op ``op`` on latents z (all broadcast), as `fasteer.ops.layout` defines it."""
    return torch.where(op == L.FEAT_ADD, z + val,
           torch.where(op == L.FEAT_SET, val.expand_as(z),
           torch.where(op == L.FEAT_SCALE, z * val, torch.minimum(torch.maximum(z, val), hi))))


class Watch:
    """Recorded activations of some SAE features; made by `fasteer.Steerer.watch`."""

    def __init__(self, steerer, sae, features, *, max_tokens: int = 256, tokens: str = "all",
                 layer=None, site=None, batch_size: int | None = None, value: str = "edited"):
        if not isinstance(sae, SAE):
            raise TypeError(f"sae: expected a fasteer.SAE, got {type(sae).__name__}")
        ids, _ = sae._feature_index(features)
        self.features = [int(i) for i in ids.tolist()]
        if not self.features:
            raise ValueError("features: expected at least one feature id, got none")
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        if tokens not in TOKENS:
            raise ValueError(f"tokens: expected one of {TOKENS}, got {tokens!r}")
        self.tokens = tokens
        if not isinstance(value, str) or value not in VALUES:
            raise ValueError(f"value: expected one of {VALUES}, got {value!r}")
        self.value = value
        if batch_size is not None:
            batch_size = _positive_int(batch_size, "batch_size")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)):
            raise TypeError(f"layer: expected an int, got {layer!r}")
        layers, self.site = resolve_sae_placement(sae, layer, site, "watch")
        self.layer = layers[0]
        sites = steerer.sites
        check_width(sae, sites.hidden)
        key = sites.stream_point(self.layer, self.site)     # raises for a layer out of range
        self._key = key
        self.sae = sae
        point = sites.points[key]
        self.device = next((p.device for p in point.module.parameters()), None) or \
            next((p.device for p in sites.base.parameters()), torch.device("cpu"))
        K = len(self.features)
        if sae.activation == "topk":
            self._sae_here = sae.to(self.device)
            self._index = torch.tensor(self.features, device=self.device)
        else:
            enc = sae.feature_encoder(self.features, dtype=torch.float32)
            for name, t in (("W_enc/b_enc", enc.column), ("W_enc/b_enc", enc.bias)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"sae: {name} of the watched features contains NaN/inf")
            self._columns = enc.column.to(self.device).T.contiguous()       # [D, K]
            self._bias = enc.bias.to(self.device)
            self._theta = (enc.threshold.to(self.device).clamp_min(0)
                           if enc.threshold is not None else None)
        self._K = K
        self._fid = torch.tensor(self.features, device=self.device)         # [K] feature ids
        self._record_edited = value in ("edited", "both")
        self._record_encoded = value in ("encoded", "both")
        self._buffers: dict[str, torch.Tensor | None] = {"edited": None, "encoded": None}
        if batch_size is not None:
            for name in self._kinds():
                self._buffers[name] = torch.zeros(batch_size, self.max_tokens, K,
                                                  device=self.device)
        self._cursor = 0
        self._overflow_warned = False
        self._n_prompt: int | None = None
        self._steerer = steerer
        self._pending: tuple[torch.Tensor | None, bool] | None = None
        self._scan: tuple | None = None       # (requests list, per-commit match tables)
        self._reader = PointReader(sites, key, self._record,
                                   before=self._before if self._record_edited else None)
        self._phase_handle = None
        if tokens == "generated":
            # registered after fasteer's metadata hook, so the generation tracker is current
            self._phase_handle = sites.base.register_forward_pre_hook(self._phase,
                                                                      with_kwargs=True)
        self.removed = False

    # -- public ------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens recorded per row so far."""
        return self._cursor

    def values(self) -> torch.Tensor:
        """``[batch, n_tokens, K]`` float32 (a view into the buffer: ``.clone()`` to keep it
        across `clear`); column j is feature ``features[j]``. The edited latents
        (`edited_values`), or the re-encoded ones for a watch made with ``value="encoded"``."""
        return self._view("encoded" if self.value == "encoded" else "edited")

    def edited_values(self) -> torch.Tensor:
        """The latents as fasteer's edits at this point set them: ``op(z_k)`` on the tokens
        where a FeatureEdit / SAEReplace of this SAE edited feature k here, ``z_k(h_in)`` (the
        stream before the edits at this point) elsewhere. ``[batch, n_tokens, K]``."""
        if not self._record_edited:
            raise RuntimeError("watch: made with value='encoded', so the edited latents are not "
                               "recorded; use value='edited' or 'both'")
        return self._view("edited")

    def encoded_values(self) -> torch.Tensor:
        """The SAE's encoding of the stream after fasteer's edits at this point (what later
        layers see): ``z_k(h_out)``. ``[batch, n_tokens, K]``."""
        if not self._record_encoded:
            raise RuntimeError("watch: made with value='edited' (the default), so the re-encoded "
                               "latents are not recorded; use value='encoded' or 'both'")
        return self._view("encoded")

    def clear(self) -> "Watch":
        """Start recording from token 0 again (the buffers are kept)."""
        self._cursor = 0
        self._overflow_warned = False
        self._pending = None
        return self

    def remove(self) -> None:
        """Stop recording and take the hooks out of the model (idempotent)."""
        if self.removed:
            return
        self._reader.remove()
        if self._phase_handle is not None:
            self._phase_handle.remove()
        watches = self._steerer.__dict__.get("_watches")
        if watches is not None and self in watches:
            watches.remove(self)
        self._pending = None
        self._scan = None
        self.removed = True

    def __repr__(self):
        return (f"Watch(features={self.features}, at {self.site}[{self.layer}], "
                f"tokens={self.tokens!r}, value={self.value!r}, "
                f"{self._cursor}/{self.max_tokens} recorded)")

    # -- internals ---------------------------------------------------------------------
    def _kinds(self) -> list[str]:
        return [n for n, on in (("edited", self._record_edited),
                                ("encoded", self._record_encoded)) if on]

    def _view(self, name: str) -> torch.Tensor:
        buf = self._buffers[name]
        if buf is None:
            return torch.zeros(0, 0, self._K, device=self.device)
        return buf[:, :self._cursor]

    # back-compat: the buffer of what values() returns
    @property
    def _buffer(self) -> torch.Tensor | None:
        return self._buffers["encoded" if self.value == "encoded" else "edited"]

    def _phase(self, module, args, kwargs):
        """How many of this forward's tokens belong to the prompt."""
        meta, tracker = self._steerer.metadata, self._steerer.tracker
        ids = meta._arg(args, kwargs, "input_ids")
        x = ids if isinstance(ids, torch.Tensor) else meta._arg(args, kwargs, "inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            self._n_prompt = None
            return None
        T = int(x.shape[1])
        if tracker.in_generate and tracker.prompt_len is not None:
            start = tracker.position - T
            self._n_prompt = min(max(tracker.prompt_len - start, 0), T)
        else:
            cache = None
            for name in _CACHE_NAMES:
                cache = meta._arg(args, kwargs, name)
                if cache is not None:
                    break
            self._n_prompt = T if int(_past_length(cache)) == 0 else 0
        return None

    def _activations(self, x: torch.Tensor) -> torch.Tensor:
        """Watched activations [N, K] of float rows x [N, D]."""
        if self.sae.activation == "topk":
            return self._sae_here.encode(x).index_select(-1, self._index).float()
        pre = x @ self._columns + self._bias
        if self.sae.activation == "relu":
            return pre.clamp_min(0)
        if self.sae.activation == "jumprelu":
            return torch.where(pre > self._theta, pre, torch.zeros_like(pre))
        return pre

    def _span(self, B: int, T: int) -> tuple[int, int]:
        """(first token, count) of this forward's tokens to record (count <= 0: none);
        does not move the cursor or warn."""
        first = 0
        if self.tokens == "generated":
            if self._n_prompt is None:
                return 0, 0
            first = self._n_prompt
        n = min(T - first, self.max_tokens - self._cursor)
        return first, n

    # -- the edited latents ------------------------------------------------------------
    def _carrier(self):
        """The carrier at this point if it edits in this forward, else None."""
        c = self._steerer.carriers.get(self._key)
        if c is None or not c.installed or not c.armed[self._steerer.state.phase]:
            return None
        return c

    def _same_sae(self, weights) -> bool:
        from .carrier import SAEWeights
        if weights is SAEWeights._full_cache.get(self.sae):
            return True
        sae = self.sae
        try:
            if tuple(weights.w_enc.shape) != tuple(sae.W_enc.shape) or \
                    tuple(weights.w_dec.shape) != tuple(sae.W_dec.shape):
                return False
            dev = weights.w_enc.device
            return bool(torch.equal(weights.w_enc.float(), sae.W_enc.to(dev).float()) and
                        torch.equal(weights.w_dec.float(), sae.W_dec.to(dev).float()))
        except AttributeError:
            return False

    def _scan_tables(self, carrier):
        """Per `Steerer.set`: which bank rows of the point's tables are a watched feature's
        encoder column / decoder row, and whether any fused edit or SAE stage here edits a
        watched feature of this SAE. Cached until the next set (one host sync)."""
        requests = self._steerer._requests
        if self._scan is not None and self._scan[0] is requests and \
                self._scan[1] is carrier.tables.bank and self._scan[2] is carrier.sae_stages:
            return self._scan[3]
        t = carrier.tables
        bank = t.bank.float()
        fid_u = torch.full((bank.shape[0],), -1, dtype=torch.long, device=bank.device)
        fid_w = fid_u.clone()
        fused_hit = False
        if self.sae.activation != "topk" and bank.shape[0]:
            for k in sorted(set(self.features)):
                u = self.sae.feature_encoder(k, dtype=torch.float32).column.to(bank.device)
                w = self.sae.feature_decoder(k, dtype=torch.float32).to(bank.device)
                fid_u = torch.where((bank == u).all(-1), k, fid_u)
                fid_w = torch.where((bank == w).all(-1), k, fid_w)
            meta = t.meta.long()
            kind = meta[..., L.M_CODE] & 0xFF
            fu = fid_u[meta[..., L.M_U].clamp(0, bank.shape[0] - 1)]
            fw = fid_w[meta[..., L.M_W].clamp(0, bank.shape[0] - 1)]
            fused_hit = bool(((kind == L.FEATURE) & (fu >= 0) & (fu == fw)).any())
        stages = carrier.sae_stages.stages if carrier.sae_stages is not None else []
        stage_hit = [self._same_sae(st.weights) for st in stages]
        scan = (fid_u, fid_w, fused_hit, stage_hit)
        self._scan = (requests, t.bank, carrier.sae_stages, scan)
        return scan

    def _edited(self, h_in: torch.Tensor, x: torch.Tensor, first: int, n: int,
                carrier) -> torch.Tensor:
        """Edited latents [B*n, K] of the rows x (= h_in's recorded tokens, float32)."""
        z_in = self._activations(x)
        fid_u, fid_w, fused_hit, stage_hit = self._scan_tables(carrier)
        if not fused_hit and not any(stage_hit):
            return z_in
        B, T = int(h_in.shape[0]), int(h_in.shape[1])
        slot, gate = self._steerer.state.tokens(h_in.device)
        slot = slot.reshape(B, T)[:, first:first + n].reshape(-1).to(x.device)
        gate = gate.reshape(B, T)[:, first:first + n].reshape(-1).to(x.device)
        out = z_in.clone()
        x = x.clone()
        # 1. full-SAE stages, in order (each reads the previous one's result)
        if carrier.sae_stages is not None:
            from ..ops.reference.sae_replace import sae_replace
            index = slot.long() + 1
            for st, hit in zip(carrier.sae_stages.stages, stage_hit):
                stage_slot = st.remap.index_select(0, index.clamp(0, st.remap.numel() - 1))
                n_slots = st.edit_feat.shape[0]
                active = (gate != 0) & (stage_slot >= 0) & (stage_slot < n_slots)
                if hit:
                    out = self._stage_latents(out, self._activations(x), stage_slot, active, st)
                w = st.weights
                x = sae_replace(x, stage_slot, gate, *st.tensors, st.edit_feat, st.edit_code,
                                st.edit_val, st.keep_error, w.activation, w.k, w.in_scale,
                                w.apply_b_dec).float()
        # 2. the steer edits, replayed (the reference math of `fasteer.ops.layout`)
        if fused_hit:
            t = carrier.tables
            out = self._replay(out, x, slot, gate, t.meta, t.params, t.bank.float(), fid_u, fid_w)
        return out

    def _stage_latents(self, out, z, stage_slot, active, st) -> torch.Tensor:
        """Watched latents after a full-SAE stage's latent edits (applied in order)."""
        n_slots = st.edit_feat.shape[0]
        s = stage_slot.long().clamp(0, max(n_slots - 1, 0))
        feats = st.edit_feat[s].long()              # [N, E]
        codes = st.edit_code[s].long()
        vals = st.edit_val[s].float()               # [N, E, 2]
        cur = z
        hit = torch.zeros_like(out, dtype=torch.bool)
        for j in range(feats.shape[1]):
            use = active.unsqueeze(-1) & (feats[:, j:j + 1] == self._fid)     # [N, K]
            new = _latent_op(codes[:, j:j + 1], cur, vals[:, j, 0:1], vals[:, j, 1:2])
            cur = torch.where(use, new, cur)
            hit |= use
        return torch.where(hit, cur, out)

    def _replay(self, out, x, slot, gate, meta, params, bank, fid_u, fid_w) -> torch.Tensor:
        """Replay the point's steer edits on rows x [N, D]; where a FEATURE edit of a
        watched feature applies, its op's output replaces the column in ``out``."""
        n_slots, n_edits = meta.shape[0], meta.shape[1]
        if n_slots == 0 or n_edits == 0 or x.shape[0] == 0:
            return out
        active = (gate != 0) & (slot >= 0) & (slot < n_slots)
        s = slot.long().clamp(0, n_slots - 1)
        row_meta = meta[s].long()                   # [N, E, 4]
        row_params = params[s].float()              # [N, E, 8]
        V = bank.shape[0]

        def gather(index):
            return bank[index.clamp(0, V - 1)] if V else torch.zeros_like(x)

        def dot(a, b):
            return (a * b).sum(-1)

        x_in = x
        norm_in = torch.linalg.vector_norm(x_in, dim=-1)
        x_read = x
        for e in range(n_edits):
            code = row_meta[:, e, L.M_CODE]
            kind = code & 0xFF
            p = row_params[:, e]
            # condition, on the row entering the point's steer edits
            cond = (code >> 16) & 0xF
            c = gather(row_meta[:, e, L.M_C])
            proj = dot(x_in, c)
            denom = norm_in * torch.linalg.vector_norm(c, dim=-1)
            cosine = torch.where(denom > 0, proj / torch.where(denom > 0, denom,
                                                               torch.ones_like(denom)),
                                 torch.zeros_like(proj))
            passes = torch.where(cond == L.COND_COSINE, cosine >= p[:, L.P_COND_THRESH],
                                 torch.where(cond == L.COND_PROJ,
                                             proj + p[:, L.P_COND_BIAS] >= p[:, L.P_COND_THRESH],
                                             torch.ones_like(active)))
            joint = ((code & L.JOINT) != 0).unsqueeze(-1)
            x_read = torch.where(joint, x_read, x)
            a = p[:, L.P_A:L.P_A + 1]
            u = gather(row_meta[:, e, L.M_U])
            w = gather(row_meta[:, e, L.M_W])
            hu = dot(x_read, u).unsqueeze(-1)
            pre = hu + a
            act = ((code >> 12) & 0xF).unsqueeze(-1)
            thr = p[:, L.P_B:L.P_B + 1]
            z = torch.where(act == L.ACT_JUMPRELU, torch.where(pre > thr, pre, torch.zeros_like(pre)),
                            torch.where(act == L.ACT_RELU, pre.clamp_min(0), pre))
            fop = ((code >> 8) & 0xF).unsqueeze(-1)
            z_new = _latent_op(fop, z, p[:, L.P_C:L.P_C + 1], p[:, L.P_D:L.P_D + 1])
            dyn = a + p[:, L.P_B:L.P_B + 1] * hu
            k = kind.unsqueeze(-1)
            edited = torch.where(k == L.ADD, x + a * u,
                     torch.where(k == L.CLAMP, x + (a - hu) * u,
                     torch.where(k == L.ABLATE, x - hu * u,
                     torch.where(k == L.SCALE, a * x,
                     torch.where(k == L.FEATURE, x + (z_new - z) * w,
                     torch.where(k == L.DYN_SCALE, dyn * x, x))))))
            preserve = ((code & L.PRESERVE_NORM) != 0).unsqueeze(-1)
            before = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            after = torch.linalg.vector_norm(edited, dim=-1, keepdim=True)
            safe = torch.where(after > 0, after, torch.ones_like(after))
            edited = torch.where(preserve & (after > 0), edited * (before / safe), edited)
            apply = active & passes & (kind != L.NONE)
            # a FEATURE edit of watched feature f: its op's output is the edited latent
            fu = fid_u[row_meta[:, e, L.M_U].clamp(0, max(V - 1, 0))] if V else \
                torch.full_like(kind, -1)
            fw = fid_w[row_meta[:, e, L.M_W].clamp(0, max(V - 1, 0))] if V else fu
            f = torch.where((kind == L.FEATURE) & (fu >= 0) & (fu == fw), fu,
                            torch.full_like(fu, -1))
            use = (apply & (f >= 0)).unsqueeze(-1) & (f.unsqueeze(-1) == self._fid)   # [N, K]
            out = torch.where(use, z_new.expand_as(out), out)
            x = torch.where(apply.unsqueeze(-1), edited, x)
        return out

    # -- hooks -------------------------------------------------------------------------
    @torch.compiler.disable
    def _before(self, h: torch.Tensor) -> None:
        """h_in, the stream before fasteer's edits at this point: the edited latents."""
        self._pending = None
        if h.dim() == 2:
            h = h.unsqueeze(0)
        B, T = int(h.shape[0]), int(h.shape[1])
        first, n = self._span(B, T)
        if n <= 0:
            return
        with torch.no_grad():
            x = h[:, first:first + n].reshape(B * n, h.shape[-1]).float()
            carrier = self._carrier()
            if carrier is None:
                # nothing edits here in this forward: h_out == h_in, read it once afterwards
                self._pending = (None, False)
                return
            self._pending = (self._edited(h, x, first, n, carrier).view(B, n, self._K), True)

    @torch.compiler.disable
    def _record(self, h: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        if h.dim() == 2:
            h = h.unsqueeze(0)
        B, T = int(h.shape[0]), int(h.shape[1])
        first, n = self._span(B, T)
        if self.tokens == "generated" and self._n_prompt is None:
            return
        if T - first <= 0:
            return
        kinds = self._kinds()
        ref = self._buffers[kinds[0]]
        if ref is None or (ref.shape[0] != B and self._cursor == 0):
            for name in kinds:
                self._buffers[name] = torch.zeros(B, self.max_tokens, self._K, device=self.device)
        elif ref.shape[0] != B:
            raise RuntimeError(f"watch: recorded {self._cursor} tokens of a batch of "
                               f"{ref.shape[0]} rows and now sees {B} rows; call "
                               "watch.clear() between batches of different sizes")
        if n < T - first:
            if not self._overflow_warned:
                warnings.warn(f"watch: buffer full ({self.max_tokens} tokens); later tokens are "
                              "not recorded (raise max_tokens or call clear())", RuntimeWarning,
                              stacklevel=2)
                self._overflow_warned = True
            if n <= 0:
                return
        with torch.no_grad():
            sl = slice(self._cursor, self._cursor + n)
            encoded = None
            if self._record_encoded or pending is None or not pending[1]:
                x = h[:, first:first + n].reshape(B * n, h.shape[-1]).float()
                encoded = self._activations(x).view(B, n, self._K)
            if self._record_encoded:
                self._buffers["encoded"][:, sl].copy_(encoded)
            if self._record_edited:
                # no pending value: the point had no edits in this forward (h_in == h_out)
                edited = pending[0] if pending is not None and pending[1] else encoded
                self._buffers["edited"][:, sl].copy_(edited)
        self._cursor += n
