"""Self-checking carriers for model types fasteer's table does not know.

For a model whose ``config.model_type`` is not in `fasteer.sites.ARCHITECTURES`,
`probe_sites` tries the table's carrier *shapes* on the live model, in table order, one
per distinct (``resid_pre`` carrier, final carrier) pair (llama-like, gemma-like,
gemma2-like, olmo2, gpt2, gpt_neox, falcon, and the families of `fasteer.site_families`):

1. resolve the shape (the modules must exist and the norms must be of the flavour the
   fused op computes -- `fasteer.sites._SpecMismatch` otherwise; no forward is run);
2. probe: one forward of the module that takes the tokens (batch 2, 5 random token ids, or
   ``inputs_embeds`` where the forward takes no ids) in eval mode without gradients,
   steered with a different random ``Add`` at every stream point -- ``resid_pre`` of each
   layer and ``resid_post`` of the last (each vector half the RMS of the stream at its
   point) -- once through fasteer's carriers of that shape and once through plain forward
   hooks that define the truth (a pre-hook on each layer adds to its input; a hook on the
   last layer adds to its output), plus one unsteered forward;
3. keep the shape if ``max|carriers - hooks| <= tol * max|hooks|`` (tol: float32 1e-4,
   float16 1e-2, bfloat16 3e-2) and the steering moved the output by more than
   ``3 * tol * max|hooks|`` (so the check is not vacuous); else try the next one, else
   the caller falls back to hooks.

A shape that passes gives the fused carriers for ``resid_pre``/``resid_post`` and the
final norm; ``resid_mid`` and the component outputs (``attn_out``/``mlp_out``) stay
unavailable, because nothing outside the layer defines a reference for them. The verdict
is cached per (model class, model type, layer path) for the process (`clear_cache`): a
cached shape is still resolved against each new instance (and probed again if it does not
fit). The caller
(`fasteer.sites.model_sites`) reports it in one warning and in ``sites.verdict``.
``FASTEER_PROBE=0`` (or ``fasteer.carrier_probe.ENABLED = False``) turns the probe off:
unknown types then get hooks at once.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.nn as nn

ENABLED = os.environ.get("FASTEER_PROBE", "1").strip().lower() not in ("0", "false", "no", "off")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
BATCH, TOKENS = 2, 5

# (model class, model type, layers path) -> (table key of the accepted shape or None, reason)
_CACHE: dict[tuple[type, str, str], tuple[str | None, str]] = {}

_NO_MID = ("the carriers of this unknown model type were checked by a probe at the layer "
           "boundaries only; the point after attention lies inside the layer, where nothing "
           "defines a reference for it")
_NO_COMPONENTS = ("which module's output an unknown architecture adds to the stream is known "
                  "only for architectures in fasteer.sites.ARCHITECTURES (a probe checks the "
                  "layer boundaries only)")


class _Unprobable(Exception):
    pass


def clear_cache() -> None:
    """Forget every cached probe verdict (the next `model_sites` call probes again)."""
    _CACHE.clear()


def candidates(config) -> list[tuple[str, object]]:
    """(table key, probed spec) for each distinct carrier shape of the table, in order."""
    from .sites import _LAYER_INPUT, ARCHITECTURES, ArchSpec
    out, seen = [], set()
    for key, make in list(ARCHITECTURES.items()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # builders may warn about foreign configs
                spec = make(config)
        except Exception:  # noqa: BLE001 - a builder that cannot read this config: no shape
            continue
        shape = (spec.resid_pre, spec.final)
        if shape in seen or (spec.resid_pre == _LAYER_INPUT and spec.final is None):
            continue
        seen.add(shape)
        out.append((key, ArchSpec(f"{spec.name} carriers (probed)", spec.resid_pre, None,
                                  spec.final, _NO_MID, no_component_reason=_NO_COMPONENTS)))
    return out


def _describe(spec) -> str:
    def one(c):
        if c is None:
            return "an output hook on the last layer"
        if c.kind == "norm":
            return f"norm {c.path}"
        return f"{c.kind} hook on {c.path or 'the layer'}"
    return f"resid_pre: {one(spec.resid_pre)}, final: {one(spec.final)}"


def probe_sites(common: dict, owner: nn.Module, config):
    """(`ModelSites` of the first table shape that passes the probe, reason) or
    (None, reason) -- ``common`` holds `ModelSites`' arguments but the spec."""
    from .sites import ModelSites, _SpecMismatch
    model, layers, model_type = common["model"], common["layers"], common["model_type"]
    why = f"model type {model_type!r} is not in fasteer.sites.ARCHITECTURES"
    if not ENABLED:
        return None, f"{why} (the carrier probe is off: FASTEER_PROBE=0)"
    patched = _patched_sites(layers)
    if patched is not None:          # already patched: the probe ran then (or its verdict)
        if patched.is_fallback:
            return None, patched.verdict.split("; steering through forward hooks")[0]
        return ModelSites(spec=patched.spec, owner=owner, source=patched.source,
                          verdict=patched.verdict, **common), patched.verdict
    key = (type(model), model_type, common["layers_path"])
    shapes = candidates(config)
    cached = _CACHE.get(key)
    if cached is not None:
        chosen, reason = cached
        for name, spec in shapes:
            if name == chosen:
                try:
                    return ModelSites(spec=spec, owner=owner, source="probe", verdict=reason,
                                      **common), reason
                except _SpecMismatch:
                    break            # this instance differs: probe it afresh
        else:
            if chosen is None:
                return None, reason
    rejected = []
    probe = None
    for name, spec in shapes:
        try:
            sites = ModelSites(spec=spec, owner=owner, source="probe", verdict="", **common)
        except _SpecMismatch as exc:
            rejected.append(f"{name}: {exc}")
            continue
        try:
            if probe is None:
                probe = _Probe(model, sites)
            ok, detail = probe.check(sites)
        except _Unprobable as exc:
            reason = f"{why}, and the carrier probe cannot run it ({exc})"
            _CACHE[key] = (None, reason)
            return None, reason
        if ok:
            reason = (f"{why}; a probe forward matched the {name!r} carrier shape ({_describe(spec)}) "
                      f"to forward hooks on the layers ({detail}): fused carriers for "
                      "resid_pre/resid_post; resid_mid, attn_out and mlp_out unavailable")
            sites.verdict = reason
            _CACHE[key] = (name, reason)
            return sites, reason
        rejected.append(f"{name}: probe failed, {detail}")
    if not shapes:
        reason = f"{why}, and no table carrier shape applies"
    elif any("probe failed" in r for r in rejected):
        reason = (f"{why}, and no table carrier shape passed the probe ("
                  + "; ".join(r for r in rejected if "probe failed" in r) + ")")
    else:
        reason = f"{why}, and no table carrier shape fits its modules"
    _CACHE[key] = (None, reason)
    return None, reason


def _patched_sites(layers):
    from .patch import _PATCHED
    st = _PATCHED.get(layers)
    return None if st is None else st.sites


# --------------------------------------------------------------------------- the probe

def _main_tensor(out):
    """The hidden-state tensor in a module's output (tensor, tuple/list, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        v = out.get("last_hidden_state")
        if isinstance(v, torch.Tensor):
            return v
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return _main_tensor(out[0])
    return None


def _with_main(out, new):
    """``out`` with its hidden-state tensor replaced by ``new``."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    _main_tensor(out).copy_(new)         # a ModelOutput / namedtuple: edit in place
    return out


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _Probe:
    """The probe forward, the unsteered and hook-steered references, for one model."""

    def __init__(self, model: nn.Module, sites):
        from .patch import _module_device
        self.model, self.layers, self.entry = model, sites.layers, sites.base
        self.n = len(self.layers)
        self.device = _module_device(self.entry)
        self.dtype = _float_dtype(self.layers)
        if self.dtype not in TOLERANCE:
            raise _Unprobable(f"its hidden states are {self.dtype}")
        self.tol = TOLERANCE[self.dtype]
        self.kwargs = self._inputs(sites)
        rms = self._stream_rms()
        g = torch.Generator().manual_seed(1234)
        self.vectors = [torch.randn(sites.hidden, generator=g) * 0.5 * r for r in rms]
        self.plain = self._run(None)
        self.reference = self._run(self._reference_hooks)

    def _inputs(self, sites) -> dict:
        try:
            params = inspect.signature(self.entry.forward).parameters
        except (TypeError, ValueError):
            params = {}
        g = torch.Generator().manual_seed(0)
        kwargs = {}
        emb = None
        try:
            emb = self.entry.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else \
            getattr(getattr(self.model, "config", None), "vocab_size", None)
        if "input_ids" in params and isinstance(vocab, int) and vocab > 0:
            kwargs["input_ids"] = torch.randint(0, vocab, (BATCH, TOKENS), generator=g
                                                ).to(self.device)
        elif "inputs_embeds" in params:
            kwargs["inputs_embeds"] = torch.randn(BATCH, TOKENS, sites.hidden, generator=g
                                                  ).to(self.device, self.dtype)
        else:
            raise _Unprobable(f"the forward of {type(self.entry).__name__} takes neither "
                              "input_ids nor inputs_embeds")
        if "use_cache" in params:
            kwargs["use_cache"] = False
        return kwargs

    def _forward(self) -> torch.Tensor:
        flags = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad():
                out = self.entry(**self.kwargs)
        except _Unprobable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: the probe cannot decide
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _Unprobable(f"{type(exc).__name__}: {first}") from None
        finally:
            for m, t in flags:
                m.training = t
        h = _main_tensor(out)
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise _Unprobable(f"{type(self.entry).__name__} returned no floating-point tensor")
        return h.detach().float().clone()

    def _run(self, install) -> torch.Tensor:
        handles = install() if install is not None else []
        try:
            return self._forward()
        finally:
            for h in handles:
                h.remove()

    def _stream_rms(self) -> list[float]:
        rms = [1.0] * (self.n + 1)

        def record(i, h):
            if isinstance(h, torch.Tensor) and h.is_floating_point() and h.numel():
                r = float(h.detach().float().pow(2).mean().sqrt())
                rms[i] = r if r > 0 and r == r and r != float("inf") else 1.0

        def pre(i):
            return lambda m, args, kwargs: record(i, args[0] if args else
                                                  kwargs.get("hidden_states"))
        handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(
            lambda m, a, out: record(self.n, _main_tensor(out))))
        try:
            self._forward()
        finally:
            for h in handles:
                h.remove()
        return rms

    def _add(self, h: torch.Tensor, i: int) -> torch.Tensor:
        return (h.float() + self.vectors[i].to(h.device)).to(h.dtype)

    def _reference_hooks(self):
        def pre(i):
            def hook(module, args, kwargs):
                if args:
                    return (self._add(args[0], i),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self._add(kwargs["hidden_states"], i)
                return args, kwargs
            return hook

        def post(module, args, out):
            h = _main_tensor(out)
            return _with_main(out, self._add(h, self.n))
        handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(post))
        return handles

    def check(self, sites) -> tuple[bool, str]:
        """Steer through ``sites``' carriers; (matches the hook reference?, the numbers)."""
        from .interventions import Add
        from .patch import Steerer
        n = self.n
        st = Steerer(self.model, _sites=sites)
        try:
            st.set(Add({l: self.vectors[l] for l in range(n)}, 1.0, layers=range(n),
                       site="resid_pre"),
                   Add({n - 1: self.vectors[n]}, 1.0, layers=[n - 1], site="resid_post"))
            try:
                got = self._forward()
            except _Unprobable as exc:
                return False, f"the steered forward raised ({exc})"
        finally:
            st.unpatch()
        ref = self.reference
        if got.shape != ref.shape:
            return False, f"output shape {tuple(got.shape)} != {tuple(ref.shape)}"
        scale = max(float(ref.abs().max()), 1e-6)
        err = float((got - ref).abs().max())
        effect = float((ref - self.plain).abs().max())
        numbers = (f"max diff {err:.2g} vs tolerance {self.tol:g} x max|output| {scale:.3g}, "
                   f"steering effect {effect:.3g}")
        if not err <= self.tol * scale:
            return False, numbers
        if not effect > 3 * self.tol * scale:
            return False, f"inconclusive, the probe's steering barely moved the output ({numbers})"
        return True, numbers
