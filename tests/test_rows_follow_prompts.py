"""``rows=`` index prompts inside ``generate``: with num_return_sequences / num_beams the
batch is expanded k times, and steering rows R applies to expanded rows r*k .. r*k+k-1.

Checked against (a) generating the steered prompt alone under ``fs.steer`` with the same
settings, (b) the unpatched model for the unsteered prompt, (c) plain hooks that add the
vector to the expanded rows of the same batch while sampling with the same seed."""
from __future__ import annotations

import pytest
import torch

import fasteer as fs
from fasteer.patch import generate_expansion
from fasteer.sites import decoder_layers
from test_fgaa import D, gpt2, llama  # noqa: F401  (fixtures)

LAYER = 1


def _vec(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g) * 3


def _ids(n, length, seed, vocab, pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :2] = 0
        ids[0, :2] = 0
        ids[0, 2] = 1
    return ids, mask


def _gen(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                             pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                             **kw)
    return out.sequences, torch.stack(out.scores, 1)


SETTINGS = {
    "sample3": dict(do_sample=True, top_k=1, num_return_sequences=3),
    "beam2": dict(do_sample=False, num_beams=2),
    "beam3_ret2": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_rows_name_prompts_in_generate(which, setting, request):
    model, _ = request.getfixturevalue(which)
    kw = SETTINGS[setting]
    n_ret = kw.get("num_return_sequences", 1)
    ids, mask = _ids(2, 5, 3, model.config.vocab_size)
    v = _vec(4)
    plain_seq, _ = _gen(model, ids, mask, **kw)
    st = fs.patch(model)
    try:
        st.set(fs.Add(v, 4.0, layers=[LAYER]), rows=[1])
        seq, scores = _gen(model, ids, mask, **kw)
    finally:
        st.unpatch()
    with fs.steer(model, fs.Add(v, 4.0, layers=[LAYER])):
        alone_seq, alone_scores = _gen(model, ids[1:], mask[1:], **kw)
    assert seq.shape[0] == 2 * n_ret
    # prompt 0: every sequence as unpatched; prompt 1: every sequence as steered alone
    assert torch.equal(seq[:n_ret], plain_seq[:n_ret])
    assert torch.equal(seq[n_ret:], alone_seq)
    assert not torch.equal(seq[n_ret:], plain_seq[n_ret:])
    if "num_beams" not in kw:
        assert torch.allclose(scores[n_ret:], alone_scores, atol=1e-4)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_sampling_matches_hooks_on_expanded_rows(which, request):
    """Real sampling (same seed): fasteer with rows=[0, 2] of 3 left-padded prompts equals
    plain hooks adding the vector to expanded rows 0..k-1 and 2k..3k-1."""
    model, _ = request.getfixturevalue(which)
    k = 3
    ids, mask = _ids(3, 7, 5, model.config.vocab_size, pad=True)
    v = _vec(6)
    kw = dict(do_sample=True, num_return_sequences=k, temperature=1.3)
    rows = [r * k + j for r in (0, 2) for j in range(k)]

    def hook(m, a, o):
        h = o[0] if isinstance(o, (tuple, list)) else o
        h[rows] += 2.5 * v
        return o
    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
    try:
        torch.manual_seed(7)
        ref_seq, ref_scores = _gen(model, ids, mask, **kw)
    finally:
        handle.remove()
    with fs.steer(model, fs.Add(v, 2.5, layers=[LAYER]), rows=[0, 2]):
        torch.manual_seed(7)
        seq, scores = _gen(model, ids, mask, **kw)
    assert torch.equal(seq, ref_seq)
    fin = torch.isfinite(ref_scores)
    assert torch.equal(fin, torch.isfinite(scores))
    assert torch.allclose(scores[fin], ref_scores[fin], atol=1e-4)


def test_forward_calls_keep_batch_rows(llama):
    """Outside generate, rows index the batch: rows=[1] of a 6-row batch edits row 1 only,
    also right after a generate call that expanded the rows."""
    model, _ = llama
    ids, mask = _ids(6, 5, 8, model.config.vocab_size)
    v = _vec(9)

    def hook(m, a, o):
        h = o[0] if isinstance(o, (tuple, list)) else o
        h[1] += 4.0 * v
        return o
    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    with fs.steer(model, fs.Add(v, 4.0, layers=[LAYER]), rows=[1]):
        for _ in range(2):
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
            assert torch.allclose(got, ref, atol=1e-4)
            _gen(model, ids[:2], mask[:2], do_sample=True, num_return_sequences=3)


def test_generation_config_and_precedence(llama):
    model, _ = llama
    ids, mask = _ids(2, 5, 10, model.config.vocab_size)
    v = _vec(11)
    gc = model.generation_config
    saved = (gc.num_beams, gc.num_return_sequences, gc.do_sample)
    try:
        gc.num_beams, gc.do_sample = 2, False
        assert generate_expansion(model, (), {}) == 2
        assert generate_expansion(model, (), {"num_beams": 1}) == 1          # kwarg wins
        assert generate_expansion(model, (), {"num_beams": 1, "num_return_sequences": 4}) == 4
        other = type(gc)(num_beams=3)
        assert generate_expansion(model, (), {"generation_config": other}) == 3
        assert generate_expansion(model, (ids, other), {}) == 3
        # beams from model.generation_config: rows still follow prompts
        with fs.steer(model, fs.Add(v, 4.0, layers=[LAYER]), rows=[1]):
            seq, _ = _gen(model, ids, mask)
        with fs.steer(model, fs.Add(v, 4.0, layers=[LAYER])):
            alone, _ = _gen(model, ids[1:], mask[1:])
        plain, _ = _gen(model, ids, mask)
        assert torch.equal(seq[1:], alone) and torch.equal(seq[:1], plain[:1])
    finally:
        gc.num_beams, gc.num_return_sequences, gc.do_sample = saved
    assert generate_expansion(model, (), {}) == 1


def test_unpatch_restores_generate(llama):
    model, _ = llama
    cls_generate = type(model).generate
    assert "generate" not in model.__dict__
    st = fs.patch(model)
    assert "generate" in model.__dict__
    st.set(fs.Add(_vec(12), 1.0, layers=[LAYER]), rows=[0])
    ids, mask = _ids(1, 4, 13, model.config.vocab_size)
    _gen(model, ids, mask, do_sample=True, num_return_sequences=2)
    assert st.requests[0].rows == (0,)          # the user's rows, not the expanded ones
    st.unpatch()
    assert "generate" not in model.__dict__
    assert model.generate.__func__ is cls_generate


def test_fixed_tables_refuse_an_expansion_that_does_not_fit(llama):
    model, _ = llama
    st = fs.patch(model, sites=["resid_post"], slots=2, always_armed=True)
    try:
        limit = st.metadata.routing.max_named_row
        r = limit // 2 + 1                    # rows 2r, 2r + 1 are beyond the fixed table
        st.set(fs.Add(_vec(14), 1.0, layers=[LAYER]), rows=[r])
        ids, mask = _ids(r + 1, 3, 15, model.config.vocab_size)
        with pytest.raises(ValueError, match="beyond"):
            _gen(model, ids, mask, do_sample=True, num_return_sequences=2)
        assert st.requests[0].rows == (r,) and st._row_expand == 1
        assert not st.tracker.in_generate
        with torch.no_grad():                 # the tables still route batch row r
            got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        st.unpatch()
    with torch.no_grad():
        unpatched = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[:r], unpatched[:r], atol=1e-4)
    assert not torch.allclose(got[r], unpatched[r], atol=1e-3)
