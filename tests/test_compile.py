"""torch.compile and CUDA graphs: a patched model compiled with ``fullgraph=True`` (no graph
break from fasteer) gives the eager result, prefill and static-cache decode steps, with
the `reference` and `cpu` backends; changing α reuses the compiled graphs (tables are
updated in place) while arming other carriers or switching the backend recompiles;
carriers armed ahead with empty tables compute the unpatched model; a plan that outgrows
armed-ahead buffers is refused before anything changes; and a decode step captured as
a graph (`CpuGraph`, the self-test's emulation of a CUDA graph on the CPU) follows α and
per-row slot changes between replays.

Compiles use the ``aot_eager`` backend (Dynamo + AOTAutograd functionalization of the
in-place ops, the part that can break); inductor's code generation is slow on a 2-core
CPU and runs in ``python -m fasteer.selftest`` on a GPU.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fasteer as fs
from fasteer.selftest.model import (CpuGraph, StaticDecode, check_graph_replay, check_model,
                                    tiny_llama)
from hook_reference import one_thread, prompt_batch, random_vectors, tiny_model  # noqa: F401

D = 32
STEPS = 3


def _plan(st, alpha: float):
    """Per-row steering touching every token class: row 0 everything, row 1 prompt and
    generated tokens differently, row 2 only its last prompt token."""
    v = random_vectors(range(3), D, seed=301, scale=3.0)
    u = random_vectors(range(3), D, seed=302, scale=1.0)
    w = random_vectors(range(3), D, seed=303, scale=2.0)
    st.set(fs.Add(v, alpha, layers=[0, 2]), rows=[0])
    st.set(fs.Clamp(u, -2.0, layers=[1], site="resid_pre", positions="prompt"),
           fs.Add(w, 0.5 * alpha, layers=[0, 1], positions="generated"), rows=[1])
    st.set(fs.Add(v, 3.0, layers=[1], positions="last_prompt"), rows=[2])


def _run(model, fn, ids, mask, toks=None):
    """Prefill + STEPS decode steps on a static cache; returns (logits, tokens fed)."""
    dec = StaticDecode(model, ids, mask, max_len=ids.shape[1] + STEPS + 1)
    outs = [dec.prefill(fn)]
    full, fed = mask, []
    for s in range(STEPS):
        tok = outs[-1][:, -1:].argmax(-1) if toks is None else toks[s]
        fed.append(tok)
        full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
        outs.append(dec.step(tok, full, fn))
    return outs, fed


def _assert_close(got, want, atol=1e-5):
    for i, (g, w) in enumerate(zip(got, want)):
        err = float((g - w).abs().max())
        assert err <= atol, f"forward {i}: compiled differs from eager by {err:.3g}"


# (Llama with the cpu backend: test_selftest_model_checks_pass_on_the_cpu, "auto" here)
@pytest.mark.parametrize("arch,backend", [("llama", "reference"), ("gpt2", "cpu"),
                                          ("gemma3_text", "cpu")])
def test_fullgraph_compile_matches_eager_and_alpha_needs_no_recompile(arch, backend, monkeypatch):
    monkeypatch.setenv("FASTEER_BACKEND", backend)
    model = tiny_model(arch, seed=5)
    ids, mask = prompt_batch(3, 7, "left", seed=31)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with fs.patch(model) as st:
        compiled = torch.compile(model, fullgraph=True, backend=counter)   # raises on a break
        _plan(st, 2.0)
        eager, toks = _run(model, None, ids, mask)
        _assert_close(_run(model, compiled, ids, mask, toks)[0], eager)
        frames = counter.frame_count
        assert frames >= 2                       # prefill and decode graphs

        _plan(st, -3.0)                          # new α: same graphs, new values
        eager2, toks2 = _run(model, None, ids, mask)
        _assert_close(_run(model, compiled, ids, mask, toks2)[0], eager2)
        assert counter.frame_count == frames, "changing alpha recompiled"
        assert float((eager2[0] - eager[0]).abs().max()) > 1e-2
    effect = (eager2[0] - plain).abs().amax(dim=(1, 2))
    assert all(float(e) > 1e-3 for e in effect), effect      # every row is steered


def test_arming_other_carriers_or_switching_backend_recompiles_and_stays_right():
    model = tiny_model("llama", seed=6)
    ids, mask = prompt_batch(3, 7, "right", seed=32)
    v = random_vectors(range(3), D, seed=311, scale=3.0)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    with fs.patch(model) as st:
        compiled = torch.compile(model, fullgraph=True, backend=counter)

        def both():
            with torch.no_grad():
                return (compiled(input_ids=ids, attention_mask=mask).logits,
                        model(input_ids=ids, attention_mask=mask).logits)

        outs = []
        for step in ("layer0", "layer2", "backend", "cleared"):
            if step == "layer0":
                st.set(fs.Add(v, 2.0, layers=[0]))
            elif step == "layer2":
                st.set(fs.Add(v, 2.0, layers=[2]))   # carrier at layer 0 off, layer 2 on
            elif step == "backend":
                st.backend = "reference"
            else:
                st.clear()
            before = counter.frame_count
            got, want = both()
            assert float((got - want).abs().max()) <= 1e-5, step
            assert counter.frame_count == before + 1, f"{step}: expected one recompile"
            outs.append(want)
        assert float((outs[0] - outs[1]).abs().max()) > 1e-2
        with pytest.raises(ValueError, match="backend: expected one of"):
            st.backend = "gpu"


def test_armed_ahead_with_empty_tables_is_the_unpatched_model():
    model = tiny_model("llama", seed=7)
    ids, mask = prompt_batch(3, 7, "left", seed=33)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    v = random_vectors(range(3), D, seed=321, scale=3.0)
    with fs.patch(model, sites=["resid_pre", "resid_mid"], slots=3, always_armed=True) as st:
        assert all(c.installed for c in st.carriers.values())
        calls = []
        handles = [c.module.register_forward_hook(lambda *a: calls.append(1))
                   for c in st.carriers.values()]
        for stage in ("fresh", "set", "cleared"):
            if stage == "set":
                st.set(fs.Add(v, 2.0, layers=[1]), rows=[0])
            elif stage == "cleared":
                st.clear()
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
            rel = float((got - plain).abs().max() / plain.abs().max())
            if stage == "set":
                assert rel > 1e-3
            else:
                assert rel <= 1e-6, f"{stage}: {rel:.3g}"
        for h in handles:
            h.remove()
        assert len(calls) == 3 * len(st.carriers)       # every armed carrier ran each time


def test_set_beyond_the_armed_capacity_raises_and_changes_nothing():
    model = tiny_model("llama", seed=8)
    v = random_vectors(range(3), D, seed=331, scale=1.0)
    w = random_vectors(range(3), D, seed=332, scale=1.0)
    with fs.patch(model, slots=2, always_armed=True, edits=1, vectors=2) as st:
        st.set(fs.Add(v, 1.5, layers=[1]), rows=[0])

        def live():
            tables, routing = st.carriers[("pre", 2)].tables, st.metadata.routing
            return [tables.meta, tables.params, tables.bank, routing.lut, routing.rows]

        before = [(t.data_ptr(), t.clone()) for t in live()]
        too_many_slots = [(fs.Add(v, float(a), layers=[1]), [r]) for r, a in enumerate((1, 2, 3))]
        with pytest.raises(ValueError, match=r"slots: .*3 slots.*room for 2 slots.*CUDA graphs"):
            st.set_many(too_many_slots)
        with pytest.raises(ValueError, match=r"edits: .*2 edits per slot.*room for 2 slots, 1 "):
            st.set(fs.Add(v, 1.0, layers=[1]), fs.Add(w, 1.0, layers=[1]))
        conditioned = fs.Add(w, 1.0, layers=[1], when=fs.Cosine(random_vectors([1], D, 333), 0.1))
        with pytest.raises(ValueError, match=r"vectors: .*3 vectors.*2 vectors"):
            st.set_many([(fs.Add(v, 1.0, layers=[1]), [0]), (conditioned, [1])])
        with pytest.raises(ValueError, match="rows: row 5000 is beyond"):
            st.set(fs.Add(v, 1.0, layers=[1]), rows=[5000])
        for t, (ptr, old) in zip(live(), before):
            assert t.data_ptr() == ptr and torch.equal(t, old)
        st.set_many([(fs.Add(v, 1.0, layers=[1]), [0]), (fs.Add(w, 2.0, layers=[1]), [1])])
        assert [t.data_ptr() for t in live()] == [p for p, _ in before]      # fits: in place
    with fs.patch(model, slots=2) as st:          # not armed ahead: the tables grow instead
        st.set_many(too_many_slots)
        assert st.carriers[("pre", 2)].tables.meta.shape[0] >= 3


def test_selftest_model_checks_pass_on_the_cpu():
    """The self-test's model checks as `python -m fasteer.selftest` runs them, on the CPU:
    eager vs reference, fullgraph compile vs eager, and a decode step captured (emulated)
    with nothing set, replayed after st.set, an α change and moving the steering."""
    recs = {r["check"]: r for r in check_model(print, "cpu", hidden=48, layers=2)}
    assert set(recs) == {"eager_vs_reference", "compile_fullgraph", "graph_replay"}
    assert all(r["ok"] for r in recs.values()), recs
    replay = recs["graph_replay"]
    assert replay["add_row0"]["changed_rows"] == [0]
    assert replay["alpha_changed"]["changed_rows"] == [0]
    assert replay["rows_moved"]["changed_rows"] == [0, 1, 2]
    assert recs["compile_fullgraph"]["new_frames_alpha_-3"] == 0


def test_selftest_graph_check_catches_a_stale_table(monkeypatch):
    """Control: if set() reallocated the tables (a captured graph would keep reading the
    old ones), the replay check must fail."""
    from fasteer.plan import SlotTables
    real_write = SlotTables.write

    def reallocating_write(self, t):
        self.__init__(self.hidden, self.device, *self.meta.shape[:2], self.bank.shape[0])
        real_write(self, t)

    monkeypatch.setattr(SlotTables, "write", reallocating_write)
    model = tiny_llama(48, 2, torch.float32, "cpu", seed=3)
    rec = check_graph_replay(model, torch.float32, "cpu", print, backend="reference")
    assert not rec["ok"] and not rec["tables_kept_their_address"]
    assert rec["add_row0"]["rel_err_vs_eager"] > 1e-3


def test_emulated_capture_refuses_a_host_sync():
    """Control for the test above: the host path (not armed ahead) reads a static cache's
    length outside generate, a device sync; capturing it must fail, not pass silently."""
    model = tiny_model("llama", seed=9)
    ids, _ = prompt_batch(3, 5, "none", seed=34)
    v = random_vectors(range(3), D, seed=341, scale=1.0)
    with fs.steer(model, fs.Add(v, 1.0, positions="generated")):
        dec = StaticDecode(model, ids, None, max_len=8)
        dec.prefill()
        with pytest.raises(RuntimeError, match="host sync"):
            with CpuGraph().capture():
                dec.step(torch.tensor([[4], [5], [6]]))


def test_compiled_generate_matches_eager_generate():
    """generate() with a compiled forward: the prompt length reaches the compiled graphs
    as a device scalar, so prompt-only and generated-only steering split correctly."""
    model = tiny_model("llama", seed=10)
    ids, mask = prompt_batch(3, 6, "left", seed=35)
    v = random_vectors(range(3), D, seed=351, scale=3.0)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static",
              return_dict_in_generate=True, output_logits=True)
    with fs.steer(model, fs.Add(v, 2.0, layers=[0], positions="prompt"),
                  fs.Add(v, -2.0, layers=[2], positions="generated")):
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **kw)
        torch._dynamo.reset()
        original = model.forward
        model.forward = torch.compile(original, fullgraph=True, backend="aot_eager")
        try:
            with torch.no_grad():
                got = model.generate(input_ids=ids, attention_mask=mask, **kw)
        finally:
            model.forward = original
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        assert float((g - w).abs().max()) <= 1e-5


def test_full_sae_stages_stay_put_when_armed_ahead():
    """Always armed: a point's full-SAE stages keep their buffers across sets (edits, values,
    rows change in place; a clear leaves them with every row skipping); a plan with other
    SAEs there is refused before anything changes."""
    from sae_reference import random_sae
    model = tiny_model("llama", seed=9)
    topk = random_sae(D, 41, "topk", seed=5, layer=1, k=6)
    other = random_sae(D, 41, "relu", seed=6, layer=1)
    ids, mask = prompt_batch(2, 6, "left", seed=7)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with fs.patch(model) as free:                 # not armed: the reference numbers
            free.set(fs.SAEReplace(topk, {3: 2.0}, keep_error=False), rows=[0])
            want = model(input_ids=ids, attention_mask=mask).logits
        with fs.patch(model, always_armed=True) as st:
            st.set(fs.SAEReplace(topk, {7: 1.0}, keep_error=False), rows=[0])
            stages = st.carriers[("pre", 2)].sae_stages
            buffers = [t.data_ptr() for s in stages.stages for t in (s.edit_feat, s.remap)]
            st.set(fs.SAEReplace(topk, {3: 2.0}, keep_error=False), rows=[0])
            got = model(input_ids=ids, attention_mask=mask).logits
            assert st.carriers[("pre", 2)].sae_stages is stages
            assert [t.data_ptr() for s in stages.stages for t in (s.edit_feat, s.remap)] == buffers
            assert float((got - want).abs().max()) <= 1e-5
            assert float((got[0] - plain[0]).abs().max()) > 1e-2
            remap = stages.stages[0].remap.clone()
            with pytest.raises(ValueError, match=r"sae: with always_armed=True the full-SAE "
                                                 r"stages at \('pre', 2\) are fixed"):
                st.set(fs.SAEReplace(other, {3: 2.0}), rows=[0])
            assert torch.equal(stages.stages[0].remap, remap)     # refused before any change
            st.clear()
            assert st.carriers[("pre", 2)].sae_stages is stages   # kept, every row skips
            cleared = model(input_ids=ids, attention_mask=mask).logits
            assert float((cleared - plain).abs().max()) <= 1e-5
