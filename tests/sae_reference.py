"""The reference SAE steering is tested against: plain forward hooks and the SAE's own
``encode``/``decode`` in float64.

`SAEHookReference` extends `hook_reference.HookReference`: per batch row, a list of edits
applied in order at each point of the stream; an `SAERef` does the full-SAE math of
DESIGN.md on the row in float64 -- ``z = enc(h)``, ``z'`` = the latent edits applied in
order, ``h' = h + dec(z') - dec(z)`` (error kept) or ``dec(z')`` -- with nothing of
fasteer's lowering, folding, tables or kernels. It can also record the stream at some
points after the edits (for the watch tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fasteer as fs
from hook_reference import HookReference, RefEdit, _apply, branch_path

INF = float("inf")


def random_sae(d: int, f: int, activation: str = "relu", *, seed: int = 0, layer: int = 1,
               site: str | None = "resid_post", k: int | None = None, apply_b_dec: bool = True,
               scale: float | None = None, hook_name: str | None = None, gain: float = 1.0):
    """A random SAE whose features fire on a fair share of tiny-model residual vectors."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if activation == "jumprelu":
        # some negative thresholds too: the lowering must fold them as max(theta, 0)
        kw["threshold"] = torch.rand(f, generator=g) * 0.8 - 0.1
    if activation == "topk":
        kw["k"] = k or max(1, f // 6)
    if scale is not None:
        kw.update(normalize_activations="expected_average_only_in", norm_scaling_factor=scale)
    return fs.SAE(torch.randn(d, f, generator=g) * gain / d ** 0.5,
                  torch.randn(f, generator=g) * 0.1,
                  torch.randn(f, d, generator=g) / f ** 0.5,
                  torch.randn(d, generator=g) * 0.1,
                  activation=activation, layer=layer, site=site, hook_name=hook_name,
                  apply_b_dec_to_input=apply_b_dec, **kw)


def latent_op(z: torch.Tensor, op: str, value: float, hi: float | None) -> torch.Tensor:
    if op == "add":
        return z + value
    if op == "set":
        return torch.full_like(z, value)
    if op == "scale":
        return z * value
    lo = -INF if value is None else value
    up = INF if hi is None else hi
    return z.clamp(lo, up)


def full_reference(sae: fs.SAE, h: torch.Tensor, edits, keep_error: bool = True) -> torch.Tensor:
    """Rows h [.., D] -> edited rows, float64: encode all, edit latents in order, decode."""
    s64 = sae.to(dtype=torch.float64)
    x = h.double()
    z = s64.encode(x)
    z2 = z.clone()
    for f, op, value, hi in edits:
        z2[..., f] = latent_op(z2[..., f], op, value, hi)
    if keep_error:
        return x + s64.decode(z2) - s64.decode(z)
    return s64.decode(z2)


@dataclass
class SAERef:
    """A full-SAE edit as the reference reads it (``edits``: (feature, op, value, hi))."""
    sae: fs.SAE
    edits: list
    layers: list
    site: str = "resid_post"
    keep_error: bool = True
    positions: object = "all"
    cond: object = None
    preserve_norm: bool = False

    def point(self, layer: int) -> tuple[str, int]:
        return RefEdit.point(self, layer)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return full_reference(self.sae, h, self.edits, self.keep_error)


def feature_pair(sae, feature, op, value, hi=None, *, layers=None, site=None, positions="all",
                 allow_other_site=False):
    """(fs.FeatureEdit, SAERef) for the same edit."""
    iv = fs.FeatureEdit(sae, feature, op, value, hi, layers=layers, site=site,
                        positions=positions, allow_other_site=allow_other_site)
    feats = [feature] if isinstance(feature, int) else list(feature)
    vals = iv.values
    his = iv.his if op == "clamp" else [None] * len(feats)
    edits = [(f, op, v, h) for f, v, h in zip(feats, vals, his)]
    return iv, SAERef(sae, edits, list(iv.layers), iv.site, True, positions)


def replace_pair(sae, edits, *, keep_error=True, layers=None, site=None, positions="all",
                 allow_other_site=False):
    """(fs.SAEReplace, SAERef); ``edits`` as (feature, op, value[, hi]) tuples."""
    iv = fs.SAEReplace(sae, edits, keep_error=keep_error, layers=layers, site=site,
                       positions=positions, allow_other_site=allow_other_site)
    items = [(f, "set", v) for f, v in edits.items()] if isinstance(edits, dict) else edits
    ref_edits = [(e[0], e[1], e[2], e[3] if len(e) == 4 else None) for e in items]
    return iv, SAERef(sae, ref_edits, list(iv.layers), iv.site, keep_error, positions)


@dataclass
class SAEHookReference(HookReference):
    """`HookReference` with float64 full-SAE edits and recording of the edited stream."""
    record_points: set = field(default_factory=set)

    def __post_init__(self):
        super().__post_init__()
        self.recorded: dict = {p: [] for p in self.record_points}

    def _steer(self, point, x):
        out = x.clone()
        for row, edits in enumerate(self.row_edits):
            todo = [(e, l) for e in edits for l in e.layers if e.point(l) == point]
            if not todo:
                continue
            h = x[row].double()
            for e, l in todo:
                sel = self._select(e, row, h.shape[0])
                new = e.apply(h) if isinstance(e, SAERef) else _apply(e, l, h.float()).double()
                h = torch.where(sel.unsqueeze(-1), new, h)
            out[row] = h.to(x.dtype)
        if point in self.recorded:
            self.recorded[point].append(out.detach().clone())
        return out


GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def run_reference(model, arch, row_edits, ids, mask, *, generate=True, record_points=()):
    """Logits of one forward and greedy tokens, with `SAEHookReference` steering."""
    from fasteer.sites import decoder_layers
    ref = SAEHookReference(model, decoder_layers(model), branch_path(arch), row_edits,
                           record_points=set(record_points))
    with ref, torch.no_grad():
        ref.begin(mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = None
        if generate:
            ref.begin(mask)
            tokens = model.generate(input_ids=ids, attention_mask=mask, **GENERATE)
    return logits, tokens, ref


def run_fasteer(model, sets, ids, mask, *, generate=True):
    """The same with fasteer: ``sets`` = [(interventions, rows)]; always unpatches."""
    st = fs.patch(model)
    try:
        for ivs, rows in sets:
            st.set(*ivs, rows=rows)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(input_ids=ids, attention_mask=mask, **GENERATE) \
                if generate else None
    finally:
        st.unpatch()
    return logits, tokens


def assert_close(fs_out, ref_out, atol=1e-4):
    (lf, tf), (lr, tr) = fs_out, ref_out[:2]
    diff = float((lf - lr).abs().max())
    assert diff <= atol, f"logits differ from the float64 hook reference by {diff:.3g}"
    if tr is not None:
        assert torch.equal(tf, tr), f"greedy tokens differ:\n{tf}\n{tr}"
