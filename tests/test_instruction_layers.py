"""Instruction steering's procedure on tiny models: per-block responses against a hook
reference, the layer search's selection rule, its errors, and composition."""
import math

import pytest
import torch

import fasteer as fs
from fasteer.evaluate import responses as responses_mod
from fasteer.evaluate.fluency import repetition_rate
from fasteer.evaluate.responses import Responses, generate_responses
from fasteer.extract.instruction_layers import (
    compose, make_intervention, score_responses, search_layer, stolfo_layers)
from hook_reference import HookReference, RefEdit, branch_path, component_paths, one_thread  # noqa: F401
from test_fgaa import llama, prompts, tiny_gpt2, tiny_llama  # noqa: F401 (llama: a fixture)

EOS = 2


def _steering(model, tok, layers=(0, 1, 2)):
    with_i = [p + " very happy" for p in prompts(12, seed=3)]
    without = [p for p in prompts(12, seed=3)]
    return fs.extract.instruction(model, tok, with_i, without, layers=list(layers),
                                  progress=False)


def _hook_greedy(model, tok, texts, edits, max_new_tokens):
    """Greedy ids per row with plain hooks applying ``edits`` (RefEdits) to every row."""
    from fasteer.extract.activations import encode_prompts, pad_batch
    from fasteer.sites import decoder_layers
    ids, mask = pad_batch(encode_prompts(tok, texts), tok.pad_token_id, "left")
    arch = "llama" if "Llama" in type(model).__name__ else "gpt2"
    ref = HookReference(model, decoder_layers(model), branch_path(arch),
                        [list(edits) for _ in texts], components=component_paths(arch))
    with ref, torch.no_grad():
        ref.begin(mask)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        at = next((t for t, x in enumerate(row) if x == EOS), None)
        rows.append(row if at is None else row[:at + 1])
    return rows


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_blocks_match_hook_reference(builder):
    """Each block's steering reaches exactly its own rows: ids equal a separate hook run per
    block (Clamp on all positions, Add on prompt positions, two edits composed, none)."""
    model, tok = builder()
    steering = _steering(model, tok)
    u = steering.vector.directions
    texts_a, texts_b = prompts(5, seed=11), prompts(4, seed=12)
    c1 = steering.targets[1] + 3.0
    blocks = [
        (texts_a, None),
        (texts_a, make_intervention(steering, 1, "clamp", c1, "all")),
        (texts_b, make_intervention(steering, 2, "add", 4.0, "prompt")),
        (texts_b, [make_intervention(steering, 0, "add", -3.0, "all"),
                   make_intervention(steering, 2, "clamp", -1.5, "all")]),
    ]
    refs = [
        [],
        [RefEdit("clamp", [1], "resid_post", u, c1, "all")],
        [RefEdit("add", [2], "resid_post", u, 4.0, "prompt")],
        [RefEdit("add", [0], "resid_post", u, -3.0, "all"),
         RefEdit("clamp", [2], "resid_post", u, -1.5, "all")],
    ]
    got = generate_responses(model, tok, blocks, max_new_tokens=6, chat_template=False,
                             batch_rows=7, progress=False)      # chunks cut across blocks
    for b, ((texts, _), edits) in enumerate(zip(blocks, refs)):
        want = _hook_greedy(model, tok, texts, edits, 6)
        assert [r.tolist() for r in got[b].ids] == want, f"block {b}"
    # the steered blocks differ from the unsteered one (the test could fail)
    assert [r.tolist() for r in got[1].ids] != [r.tolist() for r in got[0].ids]


def test_response_measurements(llama):
    """nll = the unsteered model's mean NLL of the kept ids; repetition on the ids without
    eos; truncation; texts decoded from the ids."""
    model, tok = llama
    steering = _steering(model, tok)
    texts = prompts(6, seed=21)
    (plain, steered) = generate_responses(
        model, tok, [(texts, None), (texts, make_intervention(steering, 1, "add", 6.0, "all"))],
        max_new_tokens=7, chat_template=False, progress=False)
    for resp in (plain, steered):
        for i, text in enumerate(texts):
            ids = resp.ids[i]
            prompt = torch.tensor(tok(text)["input_ids"])
            full = torch.cat([prompt, ids])[None]
            with torch.no_grad():
                logits = model(full).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            n = len(prompt)
            want = -float(torch.stack([logp[n - 1 + t, full[0, n + t]]
                                       for t in range(len(ids))]).mean())
            assert math.isclose(float(resp.nll[i]), want, rel_tol=1e-4, abs_tol=1e-5)
            stopped = int(ids[-1]) == EOS
            assert bool(resp.truncated[i]) == (not stopped)
            assert len(ids) == 7 or stopped
            content = ids[:-1] if stopped else ids
            assert float(resp.repetition[i]) == pytest.approx(
                float(repetition_rate(content[None])[0]) if len(content) else 0.0)
            assert resp.texts[i] == tok.decode(ids, skip_special_tokens=True).strip()


def _fake_responses(texts, repetition, nll=1.0):
    n = len(texts)
    return Responses(list(texts), [torch.tensor([5])] * n,
                     torch.full((n,), nll, dtype=torch.float64),
                     torch.tensor(repetition, dtype=torch.float64), torch.zeros(n, dtype=bool))


def test_selection_rule(llama, monkeypatch):
    """The search's rule on scripted responses: compliance wins, degenerate candidates are
    disqualified relative to no steering, ties go to fewer degenerate then the earlier
    layer, and nothing is chosen when no candidate beats no steering."""
    model, tok = llama
    steering = _steering(model, tok)
    seen = {}
    script = {}

    def fake(model_, tok_, blocks, **kw):
        seen["blocks"] = blocks
        return [script[(None if ivs is None else (ivs.layers[0], type(ivs).__name__,
                                                  ivs.positions))]
                for _, ivs in blocks]

    monkeypatch.setattr(responses_mod, "generate_responses", fake)
    ok, no = "yes", "no"
    script.update({
        None: _fake_responses([no, no, no, ok], [0.0, 0.0, 0.0, 0.0]),       # 0.25, 0 degenerate
        (0, "Clamp", "all"): _fake_responses([ok] * 4, [0.9, 0.9, 0.0, 0.0]),  # 1.0 but loops
        (1, "Clamp", "all"): _fake_responses([ok, ok, ok, no], [0.6, 0.0, 0.0, 0.0]),  # 0.75, 1/4
        (2, "Clamp", "all"): _fake_responses([ok, ok, ok, no], [0.0] * 4),     # 0.75, clean
        (0, "Clamp", "prompt"): _fake_responses([ok, ok, no, no], [0.0] * 4),
        (1, "Clamp", "prompt"): _fake_responses([ok, ok, ok, no], [0.0] * 4),  # ties layer 2
        (2, "Clamp", "prompt"): _fake_responses([no] * 4, [0.0] * 4),
    })
    check = lambda r: r == ok                                                   # noqa: E731
    choice = search_layer(model, tok, steering, ["a", "b", "c", "d"], check, layers=[0, 1, 2],
                          positions=("all", "prompt"), degenerate_tolerance=0.2,
                          progress=False)
    by = {(c.layer, c.positions): c for c in choice.candidates}
    assert by[(0, "all")].disqualified and by[(1, "all")].disqualified is True
    assert not by[(2, "all")].disqualified
    assert (choice.layer, choice.positions) == (1, "prompt")      # tie with (2, all): layer
    assert choice.value == pytest.approx(steering.targets[1])     # clamp value = stored mean
    assert choice.baseline.compliance == 0.25 and choice.baseline.layer is None
    assert len(seen["blocks"]) == 7 and seen["blocks"][0][1] is None
    iv = choice.intervention()
    assert isinstance(iv, fs.Clamp) and iv.layers == (1,) and iv.positions == "prompt"
    assert "chosen" in choice.table() and choice.to_dict()["layer"] == 1

    # a tolerance of 0.25 lets (1, all) back in; it ties (2, all) on compliance, loses on
    # degenerate share, and the earlier layer of the clean ones still wins
    choice = search_layer(model, tok, steering, ["a", "b", "c", "d"], check, layers=[0, 1, 2],
                          positions=("all", "prompt"), degenerate_tolerance=0.25,
                          progress=False)
    assert not {c.layer: c for c in choice.candidates if c.positions == "all"}[1].disqualified
    assert (choice.layer, choice.positions) == (1, "prompt")

    # nothing beats no steering -> no layer, no intervention
    script[None] = _fake_responses([ok] * 4, [0.0] * 4)
    choice = search_layer(model, tok, steering, ["a", "b", "c", "d"], check, layers=[0, 1, 2],
                          positions=("all", "prompt"), progress=False)
    assert choice.layer is None and choice.intervention() is None
    assert "chosen (no steering)" in choice.table()
    assert compose(choice) == []
    with pytest.raises(TypeError, match="LayerChoice"):
        compose(choice, iv)


def test_compose_keeps_order(llama, monkeypatch):
    model, tok = llama
    steering = _steering(model, tok)

    def fake(model_, tok_, blocks, **kw):
        return [_fake_responses(["no" if ivs is None else "yes"] * 2, [0.0, 0.0])
                for _, ivs in blocks]

    monkeypatch.setattr(responses_mod, "generate_responses", fake)
    a = search_layer(model, tok, steering, ["x", "y"], lambda r: r == "yes", layers=[2],
                     progress=False)
    b = search_layer(model, tok, steering, ["x", "y"], lambda r: r == "yes", layers=[0],
                     mode="add", weights=[3.0], progress=False)
    ivs = compose(b, a)
    assert [type(iv).__name__ for iv in ivs] == ["Add", "Clamp"]
    assert ivs[0].layers == (0,) and ivs[1].layers == (2,)


def test_add_mode_searches_layers_times_weights(llama, monkeypatch):
    model, tok = llama
    steering = _steering(model, tok)
    seen = []

    def fake(model_, tok_, blocks, **kw):
        seen.extend(ivs for _, ivs in blocks)
        out = []
        for _, ivs in blocks:
            win = ivs is not None and ivs.layers == (2,) and ivs.alpha == -2.0
            out.append(_fake_responses(["yes" if win else "no"] * 3, [0.0] * 3))
        return out

    monkeypatch.setattr(responses_mod, "generate_responses", fake)
    choice = search_layer(model, tok, steering, ["a", "b", "c"], lambda r: r == "yes",
                          layers=[1, 2], mode="add", weights=[-2, 5], progress=False)
    assert len(seen) == 5 and all(isinstance(iv, fs.Add) for iv in seen[1:])
    assert (choice.layer, choice.value, choice.mode) == (2, -2.0, "add")
    assert isinstance(choice.intervention(), fs.Add)


def test_score_responses_flags():
    resp = _fake_responses(["a b", "c", "d e f"], [0.0, 0.7, 0.1])
    resp.nll = torch.tensor([1.0, 1.0, 1.0 + math.log(4.0) + 0.01], dtype=torch.float64)
    cols = score_responses(resp, lambda r: len(r) > 1, nll_reference=1.0)
    assert cols["compliance"].tolist() == [1.0, 0.0, 1.0]
    assert cols["looping"].tolist() == [0.0, 1.0, 0.0]
    assert cols["degenerate"].tolist() == [0.0, 1.0, 1.0]       # the third is too unlikely
    assert cols["words"].tolist() == [2.0, 1.0, 3.0]


def test_default_grid_is_the_papers():
    assert stolfo_layers(30) == list(range(6, 30, 2))
    assert stolfo_layers(26) == list(range(5, 26, 2))


def test_real_search_end_to_end(llama):
    """Unscripted: evidence has one candidate per setting, and re-generating with the
    chosen intervention reproduces that candidate's compliance."""
    model, tok = llama
    steering = _steering(model, tok)
    texts = prompts(6, seed=31)
    (plain,) = generate_responses(model, tok, [(texts, None)], max_new_tokens=5,
                                  chat_template=False, progress=False)
    unsteered = set(plain.texts)

    def check(r):                   # "answers differently": no steering scores 0 by design
        return r not in unsteered

    choice = search_layer(model, tok, steering, texts, check, layers=[0, 1, 2],
                          positions=("all", "prompt"), max_new_tokens=5, chat_template=False,
                          degenerate_tolerance=1.0, progress=False)
    assert len(choice.candidates) == 6
    assert {(c.layer, c.positions) for c in choice.candidates} == {
        (l, p) for l in (0, 1, 2) for p in ("all", "prompt")}
    assert choice.baseline.compliance == 0.0
    assert choice.layer is not None
    (resp,) = generate_responses(model, tok, [(texts, choice.intervention())],
                                 max_new_tokens=5, chat_template=False, progress=False)
    got = sum(check(t) for t in resp.texts) / len(texts)
    won = [c for c in choice.candidates
           if (c.layer, c.positions) == (choice.layer, choice.positions)][0]
    assert got == pytest.approx(won.compliance) and won.compliance > 0
    assert won.compliance == max(c.compliance for c in choice.candidates)


def _forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(mode="steer"), ValueError, "mode"),
    (dict(mode="add"), ValueError, "weights"),
    (dict(mode="add", weights=[]), ValueError, "weights"),
    (dict(mode="add", weights=[0.0]), ValueError, "non-zero"),
    (dict(mode="add", weights=[float("nan")]), ValueError, "finite"),
    (dict(weights=[1.0]), ValueError, "only used with mode='add'"),
    (dict(layers=[5]), ValueError, "out of range"),
    (dict(layers=[]), ValueError, "empty"),
    (dict(positions="middle"), ValueError, "positions"),
    (dict(positions=()), ValueError, "positions"),
    (dict(max_repetition=0), ValueError, "max_repetition"),
    (dict(max_perplexity_ratio=-1), ValueError, "max_perplexity_ratio"),
    (dict(degenerate_tolerance=1.5), ValueError, "degenerate_tolerance"),
])
def test_bad_arguments_touch_nothing(llama, kwargs, err, match):
    model, tok = llama
    steering = _steering(model, tok)
    calls, handle = _forwards(model)
    try:
        with pytest.raises(err, match=match):
            search_layer(model, tok, steering, ["the cat"], lambda r: True, progress=False,
                         **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_missing_layer_and_bad_inputs(llama):
    model, tok = llama
    steering = _steering(model, tok, layers=(1,))
    with pytest.raises(ValueError, match="no direction at"):
        search_layer(model, tok, steering, ["the cat"], lambda r: True, layers=[0, 1])
    with pytest.raises(TypeError, match="InstructionSteering"):
        search_layer(model, tok, steering.vector, ["the cat"], lambda r: True)
    with pytest.raises(TypeError, match="check"):
        search_layer(model, tok, steering, ["the cat"], "yes")
    with pytest.raises(ValueError, match="blocks"):
        generate_responses(model, tok, [], chat_template=False)
    with pytest.raises(ValueError, match=r"blocks\[0\]"):
        generate_responses(model, tok, [(["", "x"], None)], chat_template=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tok, [(["the"], None)], max_new_tokens=0,
                           chat_template=False)


# --------------------------------------------------------------------------- composition

def _logits(model, tok, texts, ivs):
    from fasteer.extract.activations import encode_prompts, pad_batch
    ids, mask = pad_batch(encode_prompts(tok, texts), tok.pad_token_id, "left")
    with fs.steer(model, *ivs), torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_composition_cancels_and_amplifies(llama):
    """Adds along one direction compose linearly: +w then -w cancels (the unsteered logits),
    w twice amplifies (= 2w). Clamps do not commute unless their directions are orthogonal:
    the second sets its projection exactly and moves the first's by (c2 - h.u2) u1.u2."""
    model, tok = llama
    steering = _steering(model, tok)
    texts = prompts(4, seed=41)
    u = steering.vector
    plain = _logits(model, tok, texts, [])
    add = lambda w: fs.Add(u, w, layers=[1])                                     # noqa: E731
    cancel = _logits(model, tok, texts, [add(7.0), add(-7.0)])
    assert (cancel - plain).abs().max() < 1e-4
    twice = _logits(model, tok, texts, [add(5.0), add(5.0)])
    double = _logits(model, tok, texts, [add(10.0)])
    assert (twice - double).abs().max() < 1e-4
    assert (double - plain).abs().max() > 1e-2                      # the edit does something

    # two clamps at one layer, directions with cosine ~0.6: order matters
    d = u.directions[1].double()
    g = torch.Generator().manual_seed(5)
    r = torch.randn(d.shape, generator=g, dtype=torch.float64)
    r = r - (r @ d) * d
    u2 = (0.6 * d + 0.8 * r / r.norm()).float()
    v2 = fs.SteeringVector({1: u2})
    a = fs.Clamp(u, {1: 2.0}, layers=[1])
    b = fs.Clamp(v2, {1: -1.0}, layers=[1])
    ab, ba = _logits(model, tok, texts, [a, b]), _logits(model, tok, texts, [b, a])
    assert (ab - ba).abs().max() > 1e-3
    # orthogonal directions commute
    v3 = fs.SteeringVector({1: (r / r.norm()).float()})
    c = fs.Clamp(v3, {1: -1.0}, layers=[1])
    ac, ca = _logits(model, tok, texts, [a, c]), _logits(model, tok, texts, [c, a])
    assert (ac - ca).abs().max() < 1e-4

    # the algebra, float64: h -> clamp(u1,c1) -> clamp(u2,c2)
    h = torch.randn(5, d.numel(), generator=g, dtype=torch.float64)
    u1, w2 = d, u2.double() / u2.double().norm()
    h1 = h + (2.0 - h @ u1)[:, None] * u1
    h2 = h1 + (-1.0 - h1 @ w2)[:, None] * w2
    assert torch.allclose(h2 @ w2, torch.full((5,), -1.0, dtype=torch.float64))
    assert torch.allclose(h2 @ u1, 2.0 + (-1.0 - h1 @ w2) * (u1 @ w2))
