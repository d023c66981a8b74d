"""Steering latency against the peers: fasteer vs plain hooks, steering-vectors, repeng,
pyvene and nnsight, each against the unsteered Hugging Face model of the same run.

What is measured. Tiny random-weight Llama configs (built from `LlamaConfig`, no
download). A *session* is a prefill forward over the prompt followed by N greedy decode
steps on a `DynamicCache` -- the inner loop of ``generate`` without its sampling and
stopping code, which costs every method the same and would only dilute the ratios. The
prefill time is reported per forward (and per prompt token), the decode time per step
(= per generated token of every row).

Why the design is what it is:
* Every method (the baseline too) gets its own deep copy of the same model, so no
  method's hooks or wrappers can leak into another's timing. A method is *activated*
  (hooks registered, ``ControlModel`` wrapping, an ``IntervenableModel`` built, ...)
  before each timed session and removed after it, outside the timed region, as a server
  would do once per batch; fasteer is patched once and keeps a case set between its
  sessions (``Steerer.set`` happens when the case changes), which is how it is meant to
  be served.
* Interleaved rounds (each round runs every candidate once, in a rotating order) and
  medians; every ratio divides by the unsteered baseline's median from the same run.
* Nothing is timed before it is checked: with teacher-forced tokens, every method's
  logits must differ from the unsteered logits by a margin (so nobody times a no-op) and
  match the plain-hook reference (fasteer to 1e-4, the peers as well: a peer whose edit
  lands elsewhere is reported, not timed).
* Methods without per-row steering run a mixed batch the way their users would: one
  sub-batch per distinct configuration, one after the other (switching included in the
  time).

    python benchmarks/bench_peers.py             # the CPU set (see benchmarks/README.md)
    python benchmarks/bench_peers.py --quick     # smaller, for a smoke run
    bash benchmarks/run_cpu.sh                   # the same in the peers' environment
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, markdown_table, write_results  # noqa: E402

# Thresholds of the checks (see the module docstring).
CHANGE_MARGIN = 1e-2        # max|steered - unsteered| / max|unsteered| must exceed this
MATCH_TOL = 1e-4            # max|method - hooks| (absolute, fp32 logits) must not exceed this


# --------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Workload:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    prompt: int
    decode: int
    cases: tuple[str, ...] = ("add_1", "add_all", "clamp_all")
    mixed_k: int = 0            # >0: the mixed per-row case with K distinct configs

    def label(self) -> str:
        return (f"{self.layers}L D={self.hidden}, batch {self.batch}, prompt {self.prompt}, "
                f"decode {self.decode}")


# Sized so the whole CPU set (checks, warm-up, interleaved rounds of ~50 candidates) runs
# in about 3 minutes on 2 idle cores; `--budget` caps it on a busy machine.
CPU_WORKLOADS = (
    Workload("L24_D256_b1", 24, 256, 688, 8, 2, 32000, 1, 64, 24,
             cases=("add_1", "add_all", "clamp_all", "features", "sae_replace")),
    Workload("L24_D256_b8", 24, 256, 688, 8, 2, 32000, 8, 32, 16, cases=("add_all",)),
    Workload("L8_D512_b1", 8, 512, 1376, 8, 2, 32000, 1, 128, 32, cases=("add_all",)),
    Workload("L8_D512_b8", 8, 512, 1376, 8, 2, 32000, 8, 64, 16, cases=("add_1", "add_all")),
    Workload("L8_D256_b64_mixed", 8, 256, 688, 8, 2, 32000, 64, 16, 8, cases=(), mixed_k=8),
)
QUICK_WORKLOADS = (
    Workload("L6_D128_b2", 6, 128, 344, 4, 2, 4096, 2, 16, 8,
             cases=("add_1", "add_all", "clamp_all", "features", "sae_replace")),
    Workload("L4_D128_b16_mixed", 4, 128, 344, 4, 2, 4096, 16, 8, 4, cases=(), mixed_k=4),
)


def build_model(w: Workload, seed: int = 0, dtype=torch.float32, device="cpu"):
    """A random-weight Llama of the workload's shape, eval mode, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=w.hidden, intermediate_size=w.intermediate,
                      num_hidden_layers=w.layers, num_attention_heads=w.heads,
                      num_key_value_heads=w.kv_heads, vocab_size=w.vocab,
                      max_position_embeddings=max(256, w.prompt + w.decode + 8),
                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager" if device == "cpu" else "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


# --------------------------------------------------------------------------- steering cases

class CaseUnavailable(Exception):
    """A steering case this fasteer (or machine) cannot build yet."""


@dataclass(frozen=True)
class Edit:
    """One intervention: ``add`` (h + scalar*v), ``clamp`` (pin h.u/|u| to scalar) or
    ``feature`` (set SAE features ``features`` of ``sae`` to scalar at the one layer of
    ``vectors``, error term kept: h + (scalar - z_k) W_dec[k])."""
    kind: str
    vectors: dict  # layer -> float32 [D] CPU tensor (feature: layer -> None)
    scalar: float
    sae: object = None
    features: tuple = ()


@dataclass(frozen=True)
class Group:
    rows: tuple[int, ...] | None   # None: every row
    edits: tuple[Edit, ...]


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    groups: tuple[Group, ...]

    @property
    def per_row(self) -> bool:
        return any(g.rows is not None for g in self.groups)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for g in self.groups for e in g.edits for l in e.vectors}))


def stream_scale(model, ids) -> float:
    """Mean norm of the residual stream at the decoder-layer outputs (sets vector sizes)."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    return float(torch.stack([h.float().norm(dim=-1).mean() for h in hs]).mean())


def make_case(name: str, w: Workload, scale: float, seed: int = 1, model=None) -> Case:
    """Vectors of norm ~``scale``: big enough to move the logits, like a real steering vector."""
    g = torch.Generator().manual_seed(seed)
    if name in ("features", "features_65k"):
        return feature_case(w, scale, g, model, wide=name == "features_65k")
    if name == "sae_replace":
        return sae_replace_case(w, scale, g, model)
    L, D = w.layers, w.hidden

    def vec():
        v = torch.randn(D, generator=g)
        return v / v.norm() * scale

    if name == "add_1":
        mid = L // 2
        return Case(name, f"Add at 1 layer ({mid})", (Group(None, (Edit("add", {mid: vec()}, 2.0),)),))
    if name == "add_all":
        return Case(name, f"Add at all {L} layers",
                    (Group(None, (Edit("add", {l: vec() for l in range(L)}, 0.5),)),))
    if name == "clamp_all":
        return Case(name, f"Clamp at all {L} layers",
                    (Group(None, (Edit("clamp", {l: vec() for l in range(L)}, 0.5 * scale),)),))
    if name == "mixed":
        k = w.mixed_k
        rows = [tuple(range(i, w.batch, k)) for i in range(k)]
        groups = tuple(Group(r, (Edit("add", {l: vec() for l in range(L)}, 0.25 + 0.25 * i),))
                       for i, r in enumerate(rows))
        return Case(name, f"mixed per-row: K={k} distinct Add configs (all {L} layers) "
                    f"in a batch of {w.batch}", groups)
    raise ValueError(f"case: unknown {name!r}")


def cases_for(w: Workload, scale: float, model=None) -> tuple[list[Case], dict[str, str]]:
    """The workload's cases, and {name: why} for those that cannot be built here."""
    out, missing = [], {}
    names = list(w.cases) + (["mixed"] if w.mixed_k else [])
    for i, n in enumerate(names):
        try:
            out.append(make_case(n, w, scale, seed=i + 1, model=model))
        except CaseUnavailable as exc:
            missing[n] = str(exc)
    return out, missing


def random_sae(D: int, F: int, layer: int, device, dtype, seed: int):
    """A random JumpReLU SAE (unit decoder rows) made directly on ``device``: a 65k-wide
    SAE for D=4096 is 0.5 G weights, too slow to draw on the host."""
    import fasteer as fs
    g = torch.Generator(device=device).manual_seed(seed)
    W_enc = torch.randn(D, F, generator=g, device=device) / D ** 0.5
    W_dec = torch.randn(F, D, generator=g, device=device)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return fs.SAE(W_enc, torch.zeros(F, device=device), W_dec, torch.zeros(D, device=device),
                  activation="jumprelu", threshold=torch.full((F,), 0.05, device=device),
                  layer=layer, site="resid_post", dtype=dtype)


def sae_width(w: Workload, wide: bool = False) -> int:
    if w.hidden >= 4096:
        return 65536 if wide else 16384
    return (32 if wide else 8) * w.hidden


def feature_case(w: Workload, scale: float, g: torch.Generator, model, *, wide: bool = False,
                 n_layers: int = 4, per_layer: int = 2) -> Case:
    """8 sparse SAE features at 4 evenly spaced layers (2 each) set to a high activation,
    with random JumpReLU SAEs (16k features at D=4096, or 65k with ``wide``; 8*D / 32*D on
    small models)."""
    import fasteer as fs
    if not hasattr(fs, "FeatureEdit") or not hasattr(fs, "SAE"):
        raise CaseUnavailable("fasteer.FeatureEdit does not exist yet")
    p = next(model.parameters())
    D, L, F = w.hidden, w.layers, sae_width(w, wide)
    layers = sorted({round(i * (L - 1) / max(n_layers - 1, 1)) for i in range(n_layers)})
    edits = []
    for l in layers:
        sae = random_sae(D, F, l, p.device, p.dtype, seed=int(torch.randint(1 << 30, (1,), generator=g)))
        feats = tuple(int(i) for i in torch.randperm(F, generator=g)[:per_layer])
        edits.append(Edit("feature", {l: None}, float(scale), sae=sae, features=feats))
    name = "features_65k" if wide else "features"
    return Case(name, f"{per_layer * len(layers)} SAE features (JumpReLU, {F} wide) at "
                f"{len(layers)} layers {layers}, set", (Group(None, tuple(edits)),))


def sae_replace_case(w: Workload, scale: float, g: torch.Generator, model) -> Case:
    """SAEReplace at the middle layer: full encode -> set 2 features -> decode, error kept."""
    import fasteer as fs
    if not hasattr(fs, "SAEReplace"):
        raise CaseUnavailable("fasteer.SAEReplace does not exist yet")
    p = next(model.parameters())
    D, F, mid = w.hidden, sae_width(w), w.layers // 2
    sae = random_sae(D, F, mid, p.device, p.dtype, seed=int(torch.randint(1 << 30, (1,), generator=g)))
    feats = tuple(int(i) for i in torch.randperm(F, generator=g)[:2])
    return Case("sae_replace", f"SAEReplace at layer {mid} (JumpReLU, {F} wide; 2 features set, "
                "error kept)", (Group(None, (Edit("sae_replace", {mid: None}, float(scale), sae=sae,
                                                   features=feats),)),))


def sub_case(case: Case, group: Group) -> Case:
    """One group of a mixed case, applied to every row of its own sub-batch."""
    return Case(case.name, case.label, (Group(None, group.edits),))


def unit(v: torch.Tensor) -> torch.Tensor:
    # float64 norm, as fasteer normalises directions on the host
    return (v.double() / torch.linalg.vector_norm(v.double())).float()


# --------------------------------------------------------------------------- methods

def cache_kwargs(model, cache, attention_mask, position_ids) -> dict:
    """Keyword arguments of one forward as ``generate`` makes them: the cache, the 2-D
    attention mask and position ids (repeng's padding logic reads ``position_ids``), and
    logits of the last position only.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns); the
    name is taken from the model's signature so older versions work too.
    """
    return {_cache_arg(type(model)): cache, "attention_mask": attention_mask,
            "position_ids": position_ids, "use_cache": True, "logits_to_keep": 1}


_CACHE_ARG: dict = {}


def _cache_arg(cls) -> str:
    name = _CACHE_ARG.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = _CACHE_ARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name


def _out_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_out(output, h):
    if isinstance(output, tuple):
        return (h,) + tuple(output[1:])
    if isinstance(output, list):
        return [h] + list(output[1:])
    return h


class Method:
    """A way to steer. ``activate`` installs a case on the method's own model copy."""
    name = "?"
    per_row = False           # can one batch carry different steering per row
    package: str | None = None  # the peer's distribution name (for versions)

    def __init__(self, model):
        self.model = model

    def supports(self, case: Case) -> str | None:
        """None if supported, else why not."""
        return None

    def activate(self, case: Case, batch: int) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        pass

    def close(self) -> None:
        """Undo what the constructor installed."""

    def forward(self, input_ids, cache, attention_mask, position_ids):
        return self.model(input_ids=input_ids, **cache_kwargs(self.model, cache, attention_mask, position_ids)).logits


class Unsteered(Method):
    name = "unsteered"

    def activate(self, case, batch):
        pass


def layer_edit_fns(case: Case, batch: int, device, dtype) -> dict[int, Callable]:
    """Per layer, a function h -> edited h implementing the case with plain tensor math.

    Uniform cases use the [D] vector directly (what a user writes); per-row cases build a
    [B, 1, D] table per layer with zeros on rows a group does not steer.
    """
    fns: dict[int, list[Callable]] = {}
    if not case.per_row:
        for e in case.groups[0].edits:
            for l, v in e.vectors.items():
                fns.setdefault(l, []).append(_uniform_fn(e, v, device, dtype))
        return {l: _chain(fs_) for l, fs_ in fns.items()}
    for l in case.layers:
        delta = torch.zeros(batch, 1, case.groups[0].edits[0].vectors[l].numel())
        for g in case.groups:
            for e in g.edits:
                if e.kind != "add":
                    raise ValueError("per-row hook reference: only add edits")
                delta[list(g.rows), 0] += e.scalar * e.vectors[l]
        delta = delta.to(device=device, dtype=dtype)
        fns[l] = [lambda h, d=delta: h + d]
    return {l: _chain(fs_) for l, fs_ in fns.items()}


def _uniform_fn(e: Edit, v: torch.Tensor, device, dtype):
    if e.kind == "add":
        d = (e.scalar * v).to(device=device, dtype=dtype)
        return lambda h: h + d
    if e.kind == "clamp":
        u = unit(v).to(device=device, dtype=dtype)
        c = e.scalar
        return lambda h: h + (c - h @ u).unsqueeze(-1) * u
    if e.kind == "feature":
        enc = e.sae.feature_encoder(list(e.features), dtype=torch.float32)
        col, bias = enc.column.to(device), enc.bias.to(device)       # [K, D], [K]
        thr = None if enc.threshold is None else enc.threshold.to(device)
        dec = e.sae.feature_decoder(list(e.features), dtype=torch.float32).to(device)  # [K, D]
        c = e.scalar

        def feature_fn(h):
            pre = h.float() @ col.T + bias
            z = torch.relu(pre) if thr is None else torch.relu(pre) * (pre > thr)
            return (h.float() + (c - z) @ dec).to(h.dtype)
        return feature_fn
    if e.kind == "sae_replace":
        sae, c = e.sae, e.scalar
        feats = torch.tensor(e.features, device=device)   # on the device: capturable

        def replace_fn(h):
            # h <- dec(z') + (h - dec(z)): the full SAE, as an SAELens-style hook runs it
            z = sae.encode(h)
            z_new = z.index_fill(-1, feats, c)
            return (h.float() + (sae.decode(z_new).float() - sae.decode(z).float())).to(h.dtype)
        return replace_fn
    raise ValueError(f"edit kind: unknown {e.kind!r}")


def _chain(fns):
    if len(fns) == 1:
        return fns[0]

    def f(h):
        for fn in fns:
            h = fn(h)
        return h
    return f


class Hooks(Method):
    """The reference and the baseline a user writes by hand: one forward hook per layer."""
    name = "hooks"
    per_row = True

    def activate(self, case, batch):
        p = next(self.model.parameters())
        # kept after deactivate: a captured CUDA graph still reads these tensors
        self.fns = layer_edit_fns(case, batch, p.device, p.dtype)
        layers = decoder_layers(self.model)
        self.handles = [layers[l].register_forward_hook(
            lambda m, a, out, fn=fn: _replace_out(out, fn(_out_tensor(out))))
            for l, fn in self.fns.items()]

    def deactivate(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class Fasteer(Method):
    """fasteer: ``fs.patch`` once, ``Steerer.set`` per group of rows.

    ``persistent`` (the default; the method owns its model copy): patched once, and a case
    stays set until another one is activated, as a server keeps its steering between
    batches. Otherwise patched in ``activate`` and unpatched in ``deactivate`` (a model
    shared with other methods).
    """
    name = "fasteer"
    per_row = True
    package = "fasteer"

    def __init__(self, model, persistent: bool = True, **patch_kw):
        super().__init__(model)
        import fasteer as fs
        self.fs = fs
        self.patch_kw = patch_kw
        self.persistent = persistent
        self.st = fs.patch(model, **patch_kw) if persistent else None
        self.current = None

    def interventions(self, group: Group):
        fs = self.fs
        out = []
        for e in group.edits:
            if e.kind == "add":
                out.append(fs.Add(dict(e.vectors), e.scalar))
            elif e.kind == "clamp":
                out.append(fs.Clamp(dict(e.vectors), e.scalar))
            elif e.kind == "feature":
                out.append(feature_edit(fs, e))
            elif e.kind == "sae_replace":
                (layer,) = tuple(e.vectors)
                out.append(fs.SAEReplace(e.sae, {k: e.scalar for k in e.features}, layers=[layer]))
            else:
                raise ValueError(f"edit kind: unknown {e.kind!r}")
        return out

    def activate(self, case, batch):
        if self.st is None:
            self.st = self.fs.patch(self.model, **self.patch_kw)
        elif self.current is case:
            return
        self.current = None
        self.st.clear()
        if hasattr(self.st, "set_many"):
            # one plan for all groups: K set() calls would re-plan K times
            self.st.set_many([(self.interventions(g), g.rows) for g in case.groups])
        else:
            for g in case.groups:
                self.st.set(*self.interventions(g), rows=g.rows)
        self.current = case

    def deactivate(self):
        if self.st is None or self.persistent:
            return
        self.st.unpatch()
        self.st = None
        self.current = None

    def close(self):
        if self.st is not None:
            self.st.unpatch()
            self.st = None
            self.current = None


def feature_edit(fs, e: Edit):
    """``fs.FeatureEdit`` for one feature edit (``op="set"`` of e.features to e.scalar)."""
    if not hasattr(fs, "FeatureEdit"):
        raise CaseUnavailable("fasteer.FeatureEdit does not exist yet")
    (layer,) = tuple(e.vectors)
    return fs.FeatureEdit(e.sae, feature=list(e.features), op="set", value=e.scalar, layers=[layer])


class SteeringVectorsPeer(Method):
    """steering-vectors: `SteeringVector(layer_activations, "decoder_block").patch_activations`
    (what ``.apply`` does inside its context manager); Clamp via its
    ``ablation_then_addition_operator`` with the vector c*u."""
    name = "steering-vectors"
    package = "steering-vectors"

    def __init__(self, model):
        super().__init__(model)
        import steering_vectors as sv
        self.sv = sv

    def supports(self, case):
        if any(e.kind not in ("add", "clamp") for g in case.groups for e in g.edits):
            return "no SAE edits"
        return None

    def activate(self, case, batch):
        sv = self.sv
        self.handles = []
        p = next(self.model.parameters())
        for e in case.groups[0].edits:
            if e.kind == "add":
                vec = sv.SteeringVector({l: v.to(p.device, p.dtype) for l, v in e.vectors.items()},
                                        layer_type="decoder_block")
                self.handles.append(vec.patch_activations(self.model, multiplier=e.scalar))
            else:
                from steering_vectors.steering_operators import ablation_then_addition_operator
                vec = sv.SteeringVector({l: (e.scalar * unit(v)).to(p.device, p.dtype)
                                         for l, v in e.vectors.items()}, layer_type="decoder_block")
                self.handles.append(vec.patch_activations(
                    self.model, operator=ablation_then_addition_operator(), multiplier=1.0))

    def deactivate(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class RepengPeer(Method):
    """repeng: `ControlModel(model, layer_ids)` + `ControlVector` / ``set_control`` (Add);
    Clamp via ``set_raw_control(..., operator=...)``. Wrapped per activation, unwrapped after."""
    name = "repeng"
    package = "repeng"

    def __init__(self, model):
        super().__init__(model)
        import repeng
        self.repeng = repeng
        self.cm = None

    def supports(self, case):
        if any(e.kind not in ("add", "clamp") for g in case.groups for e in g.edits):
            return "no SAE edits"
        if len(case.groups[0].edits) != 1:
            return "one control per layer"
        return None

    def activate(self, case, batch):
        e = case.groups[0].edits[0]
        p = next(self.model.parameters())
        self.cm = self.repeng.ControlModel(self.model, list(e.vectors))
        if e.kind == "add":
            cv = self.repeng.ControlVector(model_type=self.model.config.model_type,
                                           directions={l: v.numpy() for l, v in e.vectors.items()})
            self.cm.set_control(cv, coeff=e.scalar)
        else:
            ctl = {l: (e.scalar * unit(v)).to(p.device, p.dtype) for l, v in e.vectors.items()}

            def clamp(current, control):  # control = c*u (times repeng's position mask)
                u = control / control.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                return current - (current * u).sum(-1, keepdim=True) * u + control
            self.cm.set_raw_control(ctl, operator=clamp)

    def deactivate(self):
        if self.cm is not None:
            self.cm.unwrap()
            self.cm = None

    def forward(self, input_ids, cache, attention_mask, position_ids):
        return self.cm(input_ids=input_ids, **cache_kwargs(self.model, cache, attention_mask, position_ids)).logits


class PyvenePeer(Method):
    """pyvene: `IntervenableModel` with `AdditionIntervention` at each layer's
    ``block_output`` (Add) or a lambda intervention (Clamp), every position."""
    name = "pyvene"
    package = "pyvene"

    def __init__(self, model):
        super().__init__(model)
        import pyvene as pv
        self.pv = pv
        self.pm = None

    def activate(self, case, batch):
        pv = self.pv
        p = next(self.model.parameters())
        configs = []
        for e in case.groups[0].edits:
            for l, v in e.vectors.items():
                if e.kind == "add":
                    iv = pv.AdditionIntervention(embed_dim=v.numel(),
                                                 source_representation=(e.scalar * v).to(p.device, p.dtype))
                else:
                    fn = _uniform_fn(e, v, p.device, p.dtype)
                    iv = (lambda b, s, fn=fn: fn(b))
                configs.append({"layer": l, "component": "block_output", "intervention": iv})
        self.pm = pv.IntervenableModel(configs, model=self.model)

    def deactivate(self):
        self.pm = None

    def forward(self, input_ids, cache, attention_mask, position_ids):
        _, out = self.pm(base={"input_ids": input_ids, **cache_kwargs(self.model, cache, attention_mask, position_ids)})
        return out.logits


class NNsightPeer(Method):
    """nnsight: ``with model.trace(...)`` per forward, assigning each layer's edited output
    (``layer.output = f(layer.output)``; the common ``output[0][:] +=`` idiom edits only
    batch row 0 under transformers >= 5, whose decoder layers return a tensor)."""
    name = "nnsight"
    package = "nnsight"

    def __init__(self, model):
        super().__init__(model)
        import nnsight
        self.nm = nnsight.NNsight(model)
        self.fns = {}

    def activate(self, case, batch):
        p = next(self.model.parameters())
        self.fns = layer_edit_fns(case, batch, p.device, p.dtype)

    def deactivate(self):
        self.fns = {}

    def forward(self, input_ids, cache, attention_mask, position_ids):
        nm = self.nm
        with nm.trace(input_ids=input_ids, **cache_kwargs(self.model, cache, attention_mask, position_ids)):
            for l in sorted(self.fns):
                layer = nm.model.layers[l]
                layer.output = self.fns[l](layer.output)
            logits = nm.lm_head.output.save()
        return logits


PEERS = {"steering-vectors": ("steering_vectors", SteeringVectorsPeer),
         "repeng": ("repeng", RepengPeer),
         "pyvene": ("pyvene", PyvenePeer),
         "nnsight": ("nnsight", NNsightPeer)}


def peer_status(names) -> dict[str, dict]:
    """Which peers import here, with their versions (a failure is recorded, not raised)."""
    out = {}
    for name in names:
        module, cls = PEERS[name]
        try:
            importlib.import_module(module)
            out[name] = {"ok": True, "version": importlib.metadata.version(name), "cls": cls}
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "cls": cls}
    return out


# --------------------------------------------------------------------------- sessions

def new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:      # transformers < 4.56
        return DynamicCache()


def session(method: Method, ids: torch.Tensor, n_decode: int, sync=lambda: None,
            forced: torch.Tensor | None = None):
    """Prefill + ``n_decode`` decode steps.

    Returns (prefill s, mean decode s per step, logits, [s of each decode step]). Each step
    is timed on its own (``sync`` after it, as ``generate`` syncs for its stopping
    criteria), so a step hit by another process on a shared machine is one outlier among
    many for the median, not a slower session. ``forced`` [B, n_decode]: feed these tokens
    instead of the greedy ones (checks compare logits of different methods on the same
    token sequence).
    """
    logits_seen, steps = [], []
    with torch.inference_mode():
        cache = new_cache(method.model)
        B, T = ids.shape
        sync()
        t0 = time.perf_counter()
        mask = torch.ones(B, T, dtype=torch.long, device=ids.device)
        pos = torch.arange(T, device=ids.device).expand(B, T)
        logits = method.forward(ids, cache, mask, pos)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        prefill = t1 - t0
        logits_seen.append(logits[:, -1])
        for i in range(n_decode):
            if forced is not None:
                tok = forced[:, i:i + 1]
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            pos = pos[:, -1:] + 1
            logits = method.forward(tok, cache, mask, pos)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
            steps.append(t2 - t1)
            t1 = t2
            if forced is not None:
                logits_seen.append(logits[:, -1])
    return prefill, sum(steps) / max(n_decode, 1), logits_seen, steps


def run_case(method: Method, case: Case, ids, n_decode, sync=lambda: None, forced=None):
    """One session of ``case``: natively, or one sub-batch per group for methods
    without per-row steering (their times add up, step by step; activation between
    groups counts as prefill time)."""
    if not case.per_row or method.per_row:
        method.activate(case, ids.shape[0])
        try:
            return session(method, ids, n_decode, sync, forced)
        finally:
            method.deactivate()
    pre = 0.0
    steps = [0.0] * n_decode
    pieces = {}
    for g in case.groups:
        rows = list(g.rows)
        t0 = time.perf_counter()
        method.activate(sub_case(case, g), len(rows))
        t_act = time.perf_counter() - t0
        try:
            p, _, lg, st = session(method, ids[rows], n_decode, sync,
                                   None if forced is None else forced[rows])
        finally:
            t0 = time.perf_counter()
            method.deactivate()
            t_act += time.perf_counter() - t0
        pre += p + t_act
        steps = [a + b for a, b in zip(steps, st)]
        pieces[tuple(rows)] = lg
    order = [r for g in case.groups for r in g.rows]
    inv = torch.argsort(torch.tensor(order))
    logits = [torch.cat([pieces[tuple(g.rows)][s] for g in case.groups])[inv]
              for s in range(len(next(iter(pieces.values()))))]
    return pre, sum(steps) / max(n_decode, 1), logits, steps


def check_method(method: Method, case: Case, ids, forced, base_logits, hook_logits,
                 tol: float = MATCH_TOL, margin: float = CHANGE_MARGIN) -> dict:
    """Steered logits must move away from the unsteered ones and match the hooks."""
    try:
        lg = run_case(method, case, ids, forced.shape[1], forced=forced)[2]
    except Exception as exc:  # noqa: BLE001 - a peer that crashes is reported
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
    a = torch.stack([x.float() for x in lg])
    base = torch.stack([x.float() for x in base_logits])
    rec = {"change_vs_unsteered": float((a - base).abs().max() / base.abs().max().clamp_min(1e-30))}
    if hook_logits is not None:
        ref = torch.stack([x.float() for x in hook_logits])
        rec["max_abs_diff_vs_hooks"] = float((a - ref).abs().max())
    rec["changes_output"] = rec["change_vs_unsteered"] > margin
    rec["matches_hooks"] = hook_logits is None or rec["max_abs_diff_vs_hooks"] <= tol
    rec["ok"] = rec["changes_output"] and rec["matches_hooks"]
    if not rec["ok"]:
        why = []
        if not rec["changes_output"]:
            why.append(f"logits moved by only {rec['change_vs_unsteered']:.2e} (relative) from "
                       f"unsteered (margin {margin})")
        if not rec["matches_hooks"]:
            why.append(f"differs from the plain-hook steering by {rec['max_abs_diff_vs_hooks']:.2e} "
                       f"(tolerance {tol})")
        rec["error"] = "; ".join(why)
    return rec


def interleaved_sessions(candidates: dict[str, Callable[[], tuple]], rounds: int, warmup: int = 1,
                         budget_s: float | None = None) -> dict[str, dict]:
    """Median prefill and decode-step seconds of each candidate over interleaved rounds.

    A candidate is a callable returning (prefill s, decode s per step[, logits[, [s of each
    decode step]]]); called with ``warmup=True`` it may do a shorter run (first-call
    costs only). Each round runs every candidate once, the order rotating by one per
    round. The decode median is over every timed step of every round when the candidate
    reports steps (else over the rounds' per-step means); prefill is one sample a round.
    ``budget_s`` stops after the round that exceeds it (at least 2 rounds).
    """
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n](warmup=True)
    samples = {n: {"prefill": [], "decode": [], "decode_mean": []} for n in names}
    t_start = time.perf_counter()
    done = 0
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            out = candidates[n]()
            samples[n]["prefill"].append(out[0])
            samples[n]["decode_mean"].append(out[1])
            samples[n]["decode"].extend(out[3] if len(out) > 3 and out[3] else [out[1]])
        done += 1
        if budget_s is not None and done >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return {n: {"prefill_s": statistics.median(s["prefill"]), "decode_s": statistics.median(s["decode"]),
                "decode_mean_s": statistics.median(s["decode_mean"]), "rounds": done,
                "decode_samples": len(s["decode"]), "prefill_samples": s["prefill"]}
            for n, s in samples.items()}


# --------------------------------------------------------------------------- one workload

def clone_sharing_weights(model):
    """Another module tree over the same parameter and buffer tensors: hooks, wrappers and
    patches installed on it stay its own, while the weights (and the memory traffic they
    cost) are the same for every candidate."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def session_steps(method: Method, ids: torch.Tensor, n_decode: int, sync=lambda: None):
    """A session as a generator, for lockstep timing: yields the prefill's seconds, then
    each decode step's. The caller holds ``torch.inference_mode`` (a context entered
    inside a generator would be left open across its yields)."""
    cache = new_cache(method.model)
    B, T = ids.shape
    sync()
    t0 = time.perf_counter()
    mask = torch.ones(B, T, dtype=torch.long, device=ids.device)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    tok = method.forward(ids, cache, mask, pos)[:, -1].argmax(-1, keepdim=True)
    sync()
    yield time.perf_counter() - t0
    for _ in range(n_decode):
        t0 = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        tok = method.forward(tok, cache, mask, pos)[:, -1].argmax(-1, keepdim=True)
        sync()
        yield time.perf_counter() - t0


@dataclass
class Candidate:
    """What is timed: one or more (method, rows) parts, each with its steering installed
    for the whole timing; a candidate's step is the sum of its parts' steps (K parts: the
    K sub-batches of a method without per-row steering)."""
    name: str
    parts: list


def lockstep(candidates: list[Candidate], ids: torch.Tensor, n_decode: int, rounds: int,
             warmup: int = 1, budget_s: float | None = None, sync=lambda: None) -> dict:
    """Interleave every candidate's session step by step.

    Each round starts a fresh session (prefill) of every candidate, then advances all of
    them one decode step at a time, in an order that rotates by one per round. A step of
    every candidate lies within a few tens of milliseconds of the same step of the
    baseline, so load that comes and goes on a shared machine hits all candidates alike.
    Returns per candidate the median prefill (one per round), the median decode step
    (every step of every round) and, against the first candidate (the baseline), the
    median of the paired per-step ratios.
    """
    names = [c.name for c in candidates]
    pre = {n: [] for n in names}
    steps = {n: [] for n in names}
    t_start = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for r in range(-warmup, rounds):
            n = 2 if r < 0 else n_decode
            order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
            gens = {}
            for c in order:
                gens[c.name] = [session_steps(m, ids if rows is None else ids[list(rows)], n, sync)
                                for m, rows in c.parts]
                t = sum(next(g) for g in gens[c.name])
                if r >= 0:
                    pre[c.name].append(t)
            for i in range(n):
                for c in order:
                    t = sum(next(g) for g in gens[c.name])
                    if r >= 0:
                        steps[c.name].append(t)
            if r >= 0:
                done += 1
                if budget_s is not None and done >= 2 and time.perf_counter() - t_start > budget_s:
                    break
    base = names[0]
    out = {}
    for n in names:
        paired = [a / b for a, b in zip(steps[n], steps[base])]
        out[n] = {"prefill_s": statistics.median(pre[n]), "decode_s": statistics.median(steps[n]),
                  "decode_paired_ratio": statistics.median(paired),
                  "prefill_paired_ratio": statistics.median(a / b for a, b in zip(pre[n], pre[base])),
                  "rounds": done, "decode_samples": len(steps[n])}
    return out


def _method_factory(name: str, peers: dict):
    if name == "hooks":
        return Hooks
    if name == "fasteer":
        return Fasteer
    if name in peers:
        if not peers[name]["ok"]:
            raise CaseUnavailable("not installed: " + peers[name]["error"])
        return peers[name]["cls"]
    raise ValueError(f"methods: unknown {name!r}")


def bench_workload(w: Workload, method_names: list[str], peers: dict, rounds: int, warmup: int,
                   budget_s: float | None, log=print, seed: int = 0) -> dict:
    """Check every (case, method), then time the ones that pass, all in one lockstep run
    against the unsteered model. Every candidate runs on its own module tree over shared
    weights (`clone_sharing_weights`) with its steering installed once."""
    base_model = build_model(w, seed)
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(1, w.vocab, (w.batch, w.prompt), generator=g)
    forced = torch.randint(1, w.vocab, (w.batch, min(w.decode, 4)), generator=g)
    scale = stream_scale(base_model, ids)
    cases, missing = cases_for(w, scale, base_model)
    for name, why in missing.items():
        log(f"  case {name}: not run ({why})")

    unsteered = Unsteered(clone_sharing_weights(base_model))
    factories, checkers, skipped = {}, {}, {}
    for name in method_names:
        try:
            factories[name] = _method_factory(name, peers)
            checkers[name] = factories[name](clone_sharing_weights(base_model))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot wrap the model is reported
            skipped[name] = (str(exc) if isinstance(exc, CaseUnavailable) else
                             f"setup failed: {type(exc).__name__}: {exc}")[:300]
    for name, why in skipped.items():
        log(f"  {name}: {why}")

    base_logits = session(unsteered, ids, forced.shape[1], forced=forced)[2]
    records, candidates, installed = [], [Candidate("unsteered", [(unsteered, None)])], []
    for case in cases:
        hook_logits = None
        if "hooks" in checkers:
            hook_logits = run_case(checkers["hooks"], case, ids, forced.shape[1], forced=forced)[2]
        for name in method_names:
            rec = {"case": case.name, "case_label": case.label, "method": name}
            records.append(rec)
            if name in skipped:
                rec.update(status="skipped", reason=skipped[name])
                continue
            m = checkers[name]
            why = m.supports(case)
            if why:
                rec.update(status="unsupported", reason=why)
                continue
            split = case.per_row and not m.per_row
            rec["mode"] = f"{len(case.groups)} sub-batches (no per-row API)" if split else "native"
            chk = check_method(m, case, ids, forced, base_logits,
                               None if name == "hooks" else hook_logits)
            rec["check"] = chk
            if not chk["ok"]:
                rec.update(status="failed check", reason=chk.get("error", ""))
                log(f"  {case.name:>9} {name:<16} FAILED CHECK: {chk.get('error')}")
                continue
            try:
                parts = []
                for grp in (case.groups if split else (None,)):
                    inst = factories[name](clone_sharing_weights(base_model))
                    installed.append(inst)
                    if grp is None:
                        inst.activate(case, w.batch)
                        parts.append((inst, None))
                    else:
                        inst.activate(sub_case(case, grp), len(grp.rows))
                        parts.append((inst, grp.rows))
            except Exception as exc:  # noqa: BLE001
                rec.update(status="failed", reason=f"install for timing: {type(exc).__name__}: {exc}"[:300])
                continue
            rec["status"] = "timed"
            candidates.append(Candidate(f"{case.name}/{name}", parts))
    log(f"  timing {len(candidates)} candidates in lockstep, up to {rounds} rounds")
    try:
        times = lockstep(candidates, ids, w.decode, rounds, warmup, budget_s)
    finally:
        for inst in installed:
            inst.deactivate()
            inst.close()
        for m in checkers.values():
            m.close()
    base = times["unsteered"]
    for rec in records:
        key = f"{rec['case']}/{rec['method']}"
        if key in times:
            t = times[key]
            rec.update(prefill_s=t["prefill_s"], decode_s=t["decode_s"], rounds=t["rounds"],
                       decode_steps_timed=t["decode_samples"],
                       prefill_ratio=t["prefill_s"] / base["prefill_s"],
                       decode_ratio=t["decode_s"] / base["decode_s"],
                       decode_paired_ratio=t["decode_paired_ratio"],
                       prefill_paired_ratio=t["prefill_paired_ratio"])
    return {"workload": asdict(w), "label": w.label(), "stream_norm": scale,
            "unavailable_cases": missing,
            "unsteered": {"prefill_s": base["prefill_s"], "decode_s": base["decode_s"],
                          "rounds": base["rounds"], "decode_steps_timed": base["decode_samples"]},
            "records": records}


# --------------------------------------------------------------------------- report

def _fmt_ratio(x):
    return f"{x:.3f}×"


def workload_table(res: dict) -> str:
    w = res["workload"]
    base = res["unsteered"]
    header = ["steering", "method", "decode ms/token", "decode × unsteered", "prefill ms",
              "prefill × unsteered", "check (Δ vs unsteered, Δ vs hooks)"]
    rows = [["none", "unsteered HF", f"{base['decode_s'] * 1e3:.3f}", "1.000×",
             f"{base['prefill_s'] * 1e3:.2f}", "1.000×", ""]]
    for r in res["records"]:
        chk = r.get("check", {})
        check = ""
        if "change_vs_unsteered" in chk:
            check = f"{chk['change_vs_unsteered']:.2f}"
            if "max_abs_diff_vs_hooks" in chk:
                check += f", {chk['max_abs_diff_vs_hooks']:.1e}"
        method = r["method"] + ("" if r.get("mode", "native") == "native" else f" ({r['mode']})")
        if r["status"] == "timed":
            rows.append([r["case"], method, f"{r['decode_s'] * 1e3:.3f}", _fmt_ratio(r["decode_ratio"]),
                         f"{r['prefill_s'] * 1e3:.2f}", _fmt_ratio(r["prefill_ratio"]), check])
        else:
            rows.append([r["case"], method, "—", r["status"], "—", "—",
                         (check + "; " if check else "") + r.get("reason", "")[:160]])
    return (f"### {res['label']}\n\n{w['layers']} layers, D={w['hidden']}, vocab {w['vocab']}; "
            f"medians of {base['rounds']} lockstep rounds (decode: of {base['decode_steps_timed']} "
            f"timed steps per candidate); unsteered: "
            f"{base['decode_s'] * 1e3:.3f} ms per decode step, {base['prefill_s'] * 1e3:.2f} ms "
            f"per prefill ({base['prefill_s'] / w['prompt'] * 1e6:.1f} µs per prompt token)\n\n"
            + markdown_table(header, rows)
            + "".join(f"\nNot run: {n} ({why})\n" for n, why in res.get("unavailable_cases", {}).items()))


TARGETS_CPU = [
    ("add_all", "fasteer", "decode", 1.00,
     "CPU: fasteer steering every layer ≤ 1.00× the unsteered model per decode token"),
]


def target_lines(results: list[dict], targets=TARGETS_CPU) -> list[str]:
    lines = []
    for case, method, phase, bar, text in targets:
        vals = [(res["label"], r[f"{phase}_ratio"]) for res in results for r in res["records"]
                if r["case"] == case and r["method"] == method and r["status"] == "timed"]
        if not vals:
            lines.append(f"- {text}: not measured")
            continue
        met = all(v <= bar for _, v in vals)
        detail = ", ".join(f"{v:.3f}× ({lab})" for lab, v in vals)
        lines.append(f"- {text}: {'met' if met else 'NOT met'} — {detail}")
    return lines


def render_markdown(payload: dict) -> str:
    info = payload["machine"]
    peers = payload["peers"]
    peer_line = ", ".join(f"{n} {p['version']}" if p["ok"] else f"{n} (unavailable: {p['error'][:80]})"
                          for n, p in peers.items())
    parts = [f"# Steering latency vs the peers ({payload['set']})\n",
             machine_line(info) + f" · transformers {info.get('transformers', '?')}\n",
             f"Peers: {peer_line or 'none'}\n",
             f"Load average (1/5/15 min) before: {payload['load_before']}, after: "
             f"{payload['load_after']} on {info['cpu_count']} cores\n",
             f"Command: `{payload['command']}`\n",
             "Decode = one forward of one new token per row on a DynamicCache (ms per step, "
             "the median over every timed step); prefill = one forward over the prompt (median "
             "over rounds). All candidates run in lockstep (each round: every candidate's "
             "prefill, then step 1 of every candidate, step 2, ..., the order rotating per "
             "round), on their own module trees over shared weights. Ratios: the median over "
             "the unsteered model's median from the same run. Check: relative change of the "
             "logits vs unsteered (must exceed "
             f"{CHANGE_MARGIN}) and max |Δlogits| vs the plain-hook steering (must be ≤ {MATCH_TOL}); "
             "a method failing either is reported, not timed.\n",
             "Targets (reported, not asserted):\n", "\n".join(target_lines(payload["results"],
                                                                          payload.get("targets_def", TARGETS_CPU))) + "\n"]
    parts += ["## Summary: decode time per token, × the unsteered model of the same run\n",
              summary_table(payload["results"]), "## Details\n"]
    parts += [workload_table(r) for r in payload["results"]]
    return "\n".join(parts)


def summary_table(results: list[dict]) -> str:
    """One row per (workload, case), one column per method: the decode ratio, or why not."""
    methods = []
    for res in results:
        for r in res["records"]:
            if r["method"] not in methods:
                methods.append(r["method"])
    rows = []
    for res in results:
        w = res["workload"]
        cases = []
        for r in res["records"]:
            if r["case"] not in cases:
                cases.append(r["case"])
        for case in cases:
            cells = []
            for m in methods:
                rec = next((r for r in res["records"] if r["case"] == case and r["method"] == m), None)
                if rec is None:
                    cells.append("")
                elif rec["status"] == "timed":
                    cells.append(f"{rec['decode_ratio']:.2f}×"
                                 + ("" if rec.get("mode", "native") == "native" else " (split)"))
                else:
                    cells.append(rec["status"])
            rows.append([f"{w['layers']}L D={w['hidden']} b{w['batch']}", case,
                         f"{res['unsteered']['decode_s'] * 1e3:.2f}"] + cells)
    return markdown_table(["model, batch", "steering", "unsteered ms/token"] + methods, rows) + \
        "\n(split): no per-row steering; the batch runs as one sub-batch per configuration.\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "cls"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny workloads, 2 rounds (smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole set (default 200): each workload gets an equal share "
                        "of what is left and stops after the round that passes it (>= 2 rounds)")
    p.add_argument("--methods", default="fasteer,hooks,steering-vectors,repeng,pyvene,nnsight")
    p.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the figures are per-token overheads, and on a "
                        "shared 2-core machine multi-threaded kernels under load give second-long "
                        "outliers; 0 keeps torch's default)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results, or $OUT)")
    p.add_argument("--stem", default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    workloads = QUICK_WORKLOADS if args.quick else CPU_WORKLOADS
    if args.workloads:
        want = args.workloads.split(",")
        workloads = tuple(w for w in CPU_WORKLOADS + QUICK_WORKLOADS if w.name in want)
    rounds = args.rounds or (2 if args.quick else 9)
    budget = args.budget if args.budget is not None else (None if args.quick else 200.0)
    method_names = [m for m in args.methods.split(",") if m]
    peers = peer_status([m for m in method_names if m in PEERS])

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    load_before = load_avg()
    print(machine_line(info), "| load", load_before, flush=True)
    for n, s in peers.items():
        print(f"  peer {n}: {s['version'] if s['ok'] else 'unavailable: ' + s['error']}")
    results = []
    t0 = time.time()
    # budget shares in proportion to the work a round of the workload does (a mixed
    # batch runs K sub-batches for every peer without per-row steering)
    weights = [len(w.cases) + (3 if w.mixed_k else 0) + 0.5 for w in workloads]
    for i, w in enumerate(workloads):
        print(f"[{w.name}] {w.label()}", flush=True)
        share = None if budget is None else \
            max(budget - (time.time() - t0), 0) * weights[i] / sum(weights[i:])
        res = bench_workload(w, method_names, peers, rounds, args.warmup, share)
        results.append(res)
        for r in res["records"]:
            if r["status"] == "timed":
                print(f"  {r['case']:>9} {r['method']:<17} decode {r['decode_s'] * 1e3:8.3f} ms "
                      f"({r['decode_ratio']:.3f}×)  prefill {r['prefill_s'] * 1e3:8.2f} ms "
                      f"({r['prefill_ratio']:.3f}×)", flush=True)
        print(f"  unsteered: decode {res['unsteered']['decode_s'] * 1e3:.3f} ms, prefill "
              f"{res['unsteered']['prefill_s'] * 1e3:.2f} ms  [{time.time() - t0:.0f} s]", flush=True)
    command = "python benchmarks/bench_peers.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                    " " + " ".join(sys.argv[1:] if argv is None else argv))
    payload = {"set": "CPU" + (" quick" if args.quick else ""), "machine": info,
               "peers": peers, "load_before": load_before, "load_after": load_avg(),
               "command": os.environ.get("FASTEER_BENCH_COMMAND", command),
               "seconds": time.time() - t0, "results": results,
               "thresholds": {"change_margin": CHANGE_MARGIN, "match_tol": MATCH_TOL}}
    md = render_markdown(payload)
    print()
    print(md)
    if not args.no_write:
        stem = args.stem or ("peers_cpu" + ("_quick" if args.quick else ""))
        out = args.out or os.environ.get("OUT")
        paths = _write(stem, _jsonable(payload), md, out)
        print("wrote", *paths)
    return 0


def _write(stem, payload, md, out):
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (d / f"{stem}.md").write_text(md)
        return d / f"{stem}.json", d / f"{stem}.md"
    return write_results(stem, payload, md)


if __name__ == "__main__":
    sys.exit(main())
