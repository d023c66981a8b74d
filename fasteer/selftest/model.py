"""Model-level checks of the self-test: a patched Llama, compiled and captured.

Three checks per dtype, each a result record (``check``, ``ok``, errors and numbers):

* ``eager_vs_reference`` -- per-row steering (an ``Add`` on row 0, a prompt-only ``Clamp``
  and a ``Scale`` on row 1, row 2 untouched) with the automatic backend against the same
  steering with ``backend="reference"``;
* ``compile_fullgraph`` -- ``torch.compile(model, fullgraph=True)`` of the patched model,
  prefill plus decode steps with a static cache, against eager; then α changed in place:
  the compiled model must follow without compiling anything again;
* ``graph_replay`` -- the model armed ahead (``fs.patch(..., always_armed=True,
  slots=4)``), one decode step with a static cache captured as a CUDA graph *before*
  anything is steered, then replayed after ``st.set`` (steer row 0), after an α change and
  after moving the steering to other rows: each replay must equal an eager step with the
  same steering, and must change exactly the rows whose steering changed.

On a machine without CUDA the same checks run on the CPU (tests call them with a small
model): the backends are ``cpu``/``reference``, compile uses a light Dynamo backend, and
the CUDA graph is emulated by `CpuGraph`, which records the aten ops of one step and
re-runs them on the same tensors -- Python is not re-run, exactly as in a graph replay --
and refuses host syncs while recording. It runs the `reference` backend, whose ops it can
see (the C++ kernel is opaque to it).
"""
from __future__ import annotations

import contextlib
import inspect
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import fasteer as fs

# Relative tolerances, |a - b|max / |b|max. A wrong slot or a lost edit moves a steered
# row's logits by about their own size; bf16 rounding at different points (the fused
# kernel vs the reference, inductor's fused float32 math vs eager) by a few percent
# (2.4e-2 measured for inductor vs eager on the CPU).
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2}
# a replay runs the eager step's kernels on the same data
REPLAY_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


# --------------------------------------------------------------------------- graphs

class CpuGraph(TorchDispatchMode):
    """CUDA-graph capture emulated on any device: ``with g.capture(): out = step()``
    records (and runs) the aten ops of ``step``; ``g.replay()`` runs the same ops again
    on the same tensors -- tensors made during the capture are made again, everything
    else (parameters, caches, fasteer's tables) is read where it lives -- and returns
    the new ``out``. Python values are baked in, as in a real graph."""

    _SYNCS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select",
              "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim")

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.result = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in self._SYNCS:
            raise RuntimeError(f"host sync ({func}) while capturing a graph")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    @contextlib.contextmanager
    def capture(self):
        with self:
            yield

    def replay(self):
        env: dict[int, torch.Tensor] = {}

        def sub(x):
            return env.get(id(x), x) if isinstance(x, torch.Tensor) else x

        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                res = func(*tree_map(sub, args), **tree_map(sub, kwargs))
                for old, new in zip(tree_leaves(out), tree_leaves(res)):
                    if isinstance(old, torch.Tensor):
                        env[id(old)] = new
        return tree_map(sub, self.result)


class CudaGraph:
    """`torch.cuda.CUDAGraph` with the `CpuGraph` interface (warm-up on a side stream)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.result = None

    @contextlib.contextmanager
    def capture(self):
        with torch.cuda.graph(self.graph):
            yield

    def replay(self):
        self.graph.replay()
        torch.cuda.synchronize()
        return self.result


# --------------------------------------------------------------------------- the model

def tiny_llama(hidden: int, layers: int, dtype, device, seed: int = 0):
    """A random Llama with non-trivial norm weights (so a wrong norm flavour shows)."""
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None, initializer_range=0.15)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(device=device, dtype=dtype).eval()


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecode:
    """A static cache filled by one prompt, and decode steps that can be repeated from
    the same cache state (`restore`), so eager, compiled and replayed steps compare.

    Where the model's forward takes ``cache_position`` (older transformers) it is passed
    explicitly, as the graph-capture recipes do: derived from a static cache inside the
    model it would cost a host sync."""

    def __init__(self, model, ids, mask, max_len: int):
        import transformers as tf
        self.model, self.name = model, _cache_kwarg(model)
        self.cache = tf.StaticCache(config=model.config, max_cache_len=max_len)
        self.ids, self.mask = ids, mask
        self.position = 0
        self.pass_position = "cache_position" in inspect.signature(model.forward).parameters

    def _call(self, fn, ids, mask):
        kw = {self.name: self.cache, "use_cache": True}
        if mask is not None:
            kw["attention_mask"] = mask
        T = ids.shape[1]
        if self.pass_position:
            kw["cache_position"] = torch.arange(self.position, self.position + T,
                                                device=ids.device)
        self.position += T
        with torch.no_grad():
            return (self.model if fn is None else fn)(input_ids=ids, **kw).logits

    def prefill(self, fn=None):
        return self._call(fn, self.ids, self.mask)

    def step(self, tok, mask=None, fn=None):
        return self._call(fn, tok, mask)

    def tensors(self):
        for layer in getattr(self.cache, "layers", ()):
            for name, t in vars(layer).items():
                if isinstance(t, torch.Tensor):
                    yield layer, name, t

    def snapshot(self):
        return self.position, [(layer, name, t.clone()) for layer, name, t in self.tensors()]

    def restore(self, snap):
        self.position, saved = snap
        for layer, name, t in saved:
            getattr(layer, name).copy_(t)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _row_change(a, b) -> list[float]:
    return [float(x) for x in (a.float() - b.float()).abs().amax(dim=tuple(range(1, a.dim())))]


def _inputs(batch: int, length: int, vocab: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0          # row 1 left-padded
    ids[1, :2] = 0
    return ids.to(device), mask.to(device)


def _vectors(hidden: int, layers: int, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(hidden, generator=g) * scale for l in range(layers)}


def _plan(st, v, u, alpha: float, layers: int):
    """Row 0: Add; row 1: prompt-only Clamp then a Scale by 0.5; row 2: untouched."""
    st.set(fs.Add(v, alpha, layers=range(1, layers)), rows=[0])
    st.set(fs.Clamp(u, -1.5, layers=[0, layers - 1], positions="prompt"),
           fs.Scale(0.5, layers=[layers // 2], site="resid_mid"), rows=[1])


# --------------------------------------------------------------------------- checks

def check_eager_vs_reference(model, dtype, device, log, backend=None) -> dict:
    rec = dict(check="eager_vs_reference", dtype=str(dtype).split(".")[-1])
    cfg = model.config
    ids, mask = _inputs(3, 9, cfg.vocab_size, device, seed=1)
    v = _vectors(cfg.hidden_size, cfg.num_hidden_layers, 11, 3.0)
    u = _vectors(cfg.hidden_size, cfg.num_hidden_layers, 12, 1.0)
    with fs.patch(model, backend=backend) as st:
        _plan(st, v, u, 2.0, cfg.num_hidden_layers)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
            st.backend = "reference"
            ref = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    rec["backend"] = backend or "auto"
    rec["rel_err"] = _rel(got, ref)
    rec["steering_effect"] = _row_change(ref, plain)
    rec["ok"] = rec["rel_err"] <= TOL[dtype] and min(rec["steering_effect"][:2]) > 2 * TOL[dtype] \
        * float(plain.float().abs().max())
    return rec


def check_compile(model, dtype, device, log, compile_backend="inductor", steps=3,
                  backend=None) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend
    rec = dict(check="compile_fullgraph", dtype=str(dtype).split(".")[-1],
               compile_backend=compile_backend, backend=backend or "auto")
    cfg = model.config
    ids, mask = _inputs(3, 9, cfg.vocab_size, device, seed=2)
    v = _vectors(cfg.hidden_size, cfg.num_hidden_layers, 21, 3.0)
    u = _vectors(cfg.hidden_size, cfg.num_hidden_layers, 22, 1.0)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compile_backend)
    with fs.patch(model, backend=backend) as st:      # patch first, then compile
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        errs = []

        def run(fn, toks=None):
            dec = StaticDecode(model, ids, mask, max_len=ids.shape[1] + steps + 1)
            outs = [dec.prefill(fn)]
            full, tok, chosen = mask, None, []
            for s in range(steps):
                tok = outs[-1][:, -1:].argmax(-1) if toks is None else toks[s]
                chosen.append(tok)
                full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
                outs.append(dec.step(tok, full, fn))
            return outs, chosen

        for alpha in (2.0, -3.0):
            _plan(st, v, u, alpha, cfg.num_hidden_layers)
            eager, toks = run(None)
            t0 = time.time()
            frames = counter.frame_count
            got, _ = run(compiled, toks)
            rec[f"seconds_alpha_{alpha:g}"] = time.time() - t0
            rec[f"new_frames_alpha_{alpha:g}"] = counter.frame_count - frames
            errs.append(max(_rel(g, e) for g, e in zip(got, eager)))
    rec["rel_err"] = errs
    rec["frames"] = counter.frame_count
    # the second α must reuse every compiled graph: tables are updated in place
    rec["ok"] = max(errs) <= TOL[dtype] and rec["new_frames_alpha_-3"] == 0
    return rec


def check_graph_replay(model, dtype, device, log, backend=None) -> dict:
    rec = dict(check="graph_replay", dtype=str(dtype).split(".")[-1], backend=backend or "auto")
    cfg = model.config
    ids, _ = _inputs(3, 9, cfg.vocab_size, device, seed=3)
    v = _vectors(cfg.hidden_size, cfg.num_hidden_layers, 31, 3.0)
    tol = REPLAY_TOL[dtype]
    use_cuda = torch.device(device).type == "cuda"
    with fs.patch(model, slots=4, always_armed=True, backend=backend) as st:
        dec = StaticDecode(model, ids, None, max_len=ids.shape[1] + 2)
        dec.prefill()
        tok = torch.tensor([[5], [6], [7]], device=device)
        snap = dec.snapshot()
        graph = CudaGraph() if use_cuda else CpuGraph()
        if use_cuda:           # warm up on a side stream (lazy inits), as CUDA graphs want
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    dec.restore(snap)
                    dec.step(tok)
            torch.cuda.current_stream().wait_stream(side)
        dec.restore(snap)
        # captured with nothing steered: the armed carriers already hold the fused kernels
        with graph.capture():
            graph.result = dec.step(tok)

        def both():
            dec.restore(snap)
            replayed = graph.replay().clone()
            dec.restore(snap)
            return replayed, dec.step(tok)

        stages = [("unsteered", lambda: None),
                  ("add_row0", lambda: st.set(fs.Add(v, 2.0, layers=range(cfg.num_hidden_layers)),
                                              rows=[0])),
                  ("alpha_changed", lambda: st.set(fs.Add(v, -4.0,
                                                          layers=range(cfg.num_hidden_layers)),
                                                   rows=[0])),
                  ("rows_moved", lambda: st.clear().set(
                      fs.Add(v, -4.0, layers=range(cfg.num_hidden_layers)), rows=[1, 2]))]
        expect_changed = {"add_row0": {0}, "alpha_changed": {0}, "rows_moved": {0, 1, 2}}
        ptrs = [(c.tables.meta.data_ptr(), c.tables.params.data_ptr(), c.tables.bank.data_ptr())
                for c in st.carriers.values()]
        previous, ok = None, True
        for name, change in stages:
            change()
            replayed, eager = both()
            err = _rel(replayed, eager)
            stage = dict(rel_err_vs_eager=err)
            ok &= err <= tol
            if previous is not None:
                delta = _row_change(replayed, previous)
                scale = float(previous.float().abs().max())
                changed = {i for i, d in enumerate(delta) if d > 20 * tol * scale}
                stage["row_change"] = delta
                stage["changed_rows"] = sorted(changed)
                ok &= changed == expect_changed[name]
            rec[name] = stage
            previous = replayed
        rec["tables_kept_their_address"] = ptrs == [
            (c.tables.meta.data_ptr(), c.tables.params.data_ptr(), c.tables.bank.data_ptr())
            for c in st.carriers.values()]
        ok &= rec["tables_kept_their_address"]
    rec["ok"] = bool(ok)
    return rec


def check_model(log, device=None, *, hidden: int = 256, layers: int = 4, dtypes=None,
                compile_backend: str | None = None, backend: str | None = None) -> list[dict]:
    """Run the three checks (module docstring) for each dtype; returns result records."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if on_cuda else [torch.float32])
    compile_backend = compile_backend or ("inductor" if on_cuda else "aot_eager")
    records = []
    for dtype in dtypes:
        model = tiny_llama(hidden, layers, dtype, device)
        checks = [("eager_vs_reference", lambda: check_eager_vs_reference(model, dtype, device, log,
                                                                          backend)),
                  ("compile_fullgraph", lambda: check_compile(model, dtype, device, log,
                                                              compile_backend, backend=backend)),
                  # the emulated graph sees only ops it can record: the reference backend
                  ("graph_replay", lambda: check_graph_replay(
                      model, dtype, device, log, backend if on_cuda else "reference"))]
        for name, fn in checks:
            t0 = time.time()
            try:
                rec = fn()
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                rec = dict(check=name, dtype=str(dtype).split(".")[-1], ok=False,
                           error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            rec["seconds"] = time.time() - t0
            records.append(rec)
            log(f"    {'ok  ' if rec['ok'] else 'FAIL'} {name} {rec['dtype']}"
                + ("" if rec["ok"] else f": {_brief(rec)}"))
    return records


def _brief(rec: dict) -> str:
    return rec.get("error") or ", ".join(f"{k}={v}" for k, v in rec.items()
                                         if k not in ("check", "dtype", "ok", "traceback"))
