"""Threads: one patched model, several threads.

The per-forward state (every token's slot, where the prompt ends) belongs to the patched
model, so fasteer runs one forward (or ``generate`` call, or ``decoding`` loop) of a patched
model at a time: a second thread gets ``RuntimeError("fasteer: this patched model is already
running a forward in another thread; ...")`` instead of reading the first thread's slots.
Every result a thread does get equals the same call run alone, bit for bit.
"""
import threading

import pytest
import torch

import fasteer as fs
from hook_reference import cached_model, one_thread, prompt_batch  # noqa: F401 (autouse)

D = 32
BUSY = "fasteer: this patched model is already running a forward in another thread"


def _vec(seed):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def _steer_rows(st):
    """Different steering for batch rows 0 and 1 and a default for the others."""
    st.set_many([(fs.Add(_vec(1), 4.0, layers=[0, 2]), None),
                 ([fs.Add(_vec(2), -3.0, layers=[1]),
                   fs.Add(_vec(5), 6.0, layers=[2], positions="generated")], [0]),
                 ([fs.Scale(1.5, layers=[1]), fs.Add(_vec(3), 2.0, layers=[2]),
                   fs.Ablate(_vec(4), layers=[0, 1, 2], positions="prompt")], [1])])


def _jobs():
    """(kind, ids, mask): forwards and generate calls of different and equal shapes."""
    out = []
    for i, (b, t) in enumerate([(4, 7), (2, 5), (4, 7), (3, 9), (2, 3), (4, 7)]):
        ids, mask = prompt_batch(b, t, "left", seed=10 + i)
        out.append(("forward" if i % 2 == 0 else "generate", ids, mask))
    return out


def _run(model, kind, ids, mask):
    with torch.no_grad():
        if kind == "forward":
            return model(input_ids=ids, attention_mask=mask).logits
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                              do_sample=False, pad_token_id=0)


@pytest.fixture
def patched():
    model = cached_model("llama")
    st = fs.patch(model)
    _steer_rows(st)
    yield model, st
    st.unpatch()


def test_threads_get_the_result_of_the_call_alone_or_the_documented_error(patched):
    model, st = patched
    jobs = _jobs()
    alone = [_run(model, *job) for job in jobs]
    n_rounds, n = 4, len(jobs)
    results = [[None] * n for _ in range(n_rounds)]
    barrier = threading.Barrier(n)

    def worker(i):
        for r in range(n_rounds):
            barrier.wait()
            for _ in range(3):
                try:
                    results[r][i] = _run(model, *jobs[i])
                except RuntimeError as exc:
                    results[r][i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    ok = 0
    for r in range(n_rounds):
        for i in range(n):
            got = results[r][i]
            if isinstance(got, RuntimeError):
                assert BUSY in str(got), got
            else:
                assert torch.equal(got, alone[i]), (r, i)
                ok += 1
    assert ok >= 1
    # the model is free again and still right
    for job, want in zip(jobs, alone):
        assert torch.equal(_run(model, *job), want)


def _blocking_layer(model):
    """A pre-hook on decoder layer 1 that parks the first thread reaching it until released."""
    entered, release = threading.Event(), threading.Event()
    state = {"armed": True}

    def hook(module, args):
        if state["armed"]:
            state["armed"] = False
            entered.set()
            assert release.wait(timeout=120)

    handle = model.model.layers[1].register_forward_pre_hook(hook)
    return entered, release, handle


@pytest.mark.parametrize("kind", ["forward", "generate"])
def test_a_second_thread_is_refused_while_a_call_runs_and_the_first_is_right(patched, kind):
    model, st = patched
    ids, mask = prompt_batch(4, 7, "left", seed=3)
    other_ids, other_mask = prompt_batch(2, 5, "left", seed=4)
    want = _run(model, kind, ids, mask)
    other_want = _run(model, "forward", other_ids, other_mask)
    entered, release, handle = _blocking_layer(model)
    out = {}

    def first():
        out["first"] = _run(model, kind, ids, mask)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert entered.wait(timeout=120)
        # another thread: forward, generate, decoding, set, clear, unpatch are all refused
        for call in (lambda: _run(model, "forward", other_ids, other_mask),
                     lambda: _run(model, "generate", other_ids, other_mask),
                     lambda: st.decoding(5).__enter__(),
                     lambda: st.set(fs.Scale(2.0)),
                     lambda: st.clear(),
                     lambda: st.unpatch()):
            with pytest.raises(RuntimeError, match=BUSY):
                call()
        assert st.patched
    finally:
        release.set()
        t.join(timeout=120)
        handle.remove()
    assert torch.equal(out["first"], want)
    assert torch.equal(_run(model, "forward", other_ids, other_mask), other_want)


def test_the_guard_is_given_back_when_a_forward_raises(patched):
    model, st = patched
    ids, mask = prompt_batch(2, 5, "left", seed=6)
    want = _run(model, "forward", ids, mask)
    # raises in fasteer's own pre-hook (row 1 steered, batch of 1) ...
    with pytest.raises(ValueError, match="rows: steering was set for row 1"):
        _run(model, "forward", ids[:1], mask[:1])
    # ... and inside the model
    def boom(module, args):
        raise KeyError("boom")

    handle = model.model.layers[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(KeyError, match="boom"):
            _run(model, "forward", ids, mask)
    finally:
        handle.remove()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _run(model, "forward", ids, mask)))
    t.start()
    t.join(timeout=120)
    assert torch.equal(out["r"], want)


def test_one_thread_may_nest_set_inside_generate(patched):
    """``generate`` runs many forwards in one thread, and a callback of that thread (a
    streamer, a logits processor) may call ``set`` between them."""
    model, st = patched
    ids, mask = prompt_batch(2, 5, "left", seed=8)
    calls = []

    class Streamer:
        def put(self, value):
            calls.append(value)
            st.set_many([(fs.Add(_vec(9), 1.0, layers=[0]), [0])])

        def end(self):
            pass

    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       pad_token_id=0, streamer=Streamer())
    assert len(calls) >= 2
    with st.decoding(5):
        with st.decoding(6):
            pass
    st.clear()


def test_patch_docs_state_the_rule():
    assert "thread" in fs.patch.__doc__
