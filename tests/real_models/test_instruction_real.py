"""Instruction steering raises compliance on SmolLM2-135M-Instruct, on held-out requests,
without looping -- the claim of benchmarks/results/instructions/, at a test's size.

Vectors come from the first 32 train requests (the benchmark uses 64); the settings are the
ones the benchmark's layer search chose on the validation requests (see its report); the
test requests are the first 16 of the test split (topics unseen in extraction and search),
answered greedily, 40 new tokens. Measured in this test's own batch: title 0.00 -> 0.81,
short (at most 30 words) 0.12 -> 0.94, looping 0.00 for both (the benchmark, 48 requests
and 80 tokens: title 0.00 -> 0.85, short 0.00 -> 0.83). With 16 binary verdicts the standard
error of a share near 0.8 is about 0.1, so the required gain of 0.5 passes with room while
"did nothing" (a gain near 0) fails. Looping (4-gram repetition > 0.5) is 0.00 at these
settings; title clamped on every position (the paper's rule) at the same layer loops in 0.54 (validation
table in report.md); the ceiling 0.2 separates the two.
"""
from __future__ import annotations

import pytest
import torch

import fasteer as fs
from _load import load
from fasteer.evaluate.instructions import get_instruction, load_requests
from fasteer.evaluate.responses import generate_responses
from fasteer.extract.instruction_layers import make_intervention, score_responses

# instruction -> (mode, layer, positions, value (None: the stored clamp target))
SETTINGS = {
    "title": ("clamp", 24, "prompt", None),
    "short": ("add", 14, "all", 32.0),
}
GAIN = 0.5
LOOPING_CEILING = 0.2
N_TRAIN, N_TEST, NEW_TOKENS = 32, 16, 40


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2")


@pytest.fixture(scope="module")
def steered(smollm2):
    """Per instruction: (no steering, steering) responses on the test requests, one generate
    batch for all."""
    model, tok = smollm2
    train = load_requests("train", N_TRAIN)
    test = load_requests("test", N_TEST)
    blocks, names = [(test, None)], []
    for name, (mode, layer, positions, value) in SETTINGS.items():
        ins = get_instruction(name)
        steering = fs.extract.instruction(model, tok, ins.apply_all(train), train,
                                          layers=[layer], chat_template=True, progress=False)
        value = steering.targets[layer] if value is None else value
        blocks.append((test, make_intervention(steering, layer, mode, value, positions)))
        names.append(name)
    out = generate_responses(model, tok, blocks, max_new_tokens=NEW_TOKENS, batch_rows=48,
                             progress=False)
    return {name: (out[0], resp) for name, resp in zip(names, out[1:])}


def test_at_least_two_instructions_are_tested():
    assert len(SETTINGS) >= 2


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_steering_raises_compliance_without_looping(steered, name):
    plain, resp = steered[name]
    check = get_instruction(name).check
    ref = float(plain.nll.median())
    before = score_responses(plain, check, nll_reference=ref)
    after = score_responses(resp, check, nll_reference=ref)
    gain = float(after["compliance"].mean() - before["compliance"].mean())
    looping = float(after["looping"].mean())
    assert gain >= GAIN, (name, gain, resp.texts[:3])
    assert looping <= LOOPING_CEILING, (name, looping, resp.texts[:3])


def test_steered_rows_equal_hook_reference(smollm2):
    """The benchmark's per-block generation on the real model equals plain hooks: a Clamp on
    prompt positions at layer 24 and the unsteered rows, greedy, 12 tokens."""
    from fasteer.extract.activations import encode_prompts, pad_batch
    from fasteer.sites import decoder_layers
    from hook_reference import HookReference, RefEdit, branch_path
    model, tok = smollm2
    train = load_requests("train", 16)
    ins = get_instruction("title")
    steering = fs.extract.instruction(model, tok, ins.apply_all(train), train, layers=[24],
                                      chat_template=True, progress=False)
    texts = load_requests("test", 3)
    iv = make_intervention(steering, 24, "clamp", steering.targets[24], "prompt")
    plain, resp = generate_responses(model, tok, [(texts, None), (texts, iv)],
                                     max_new_tokens=12, progress=False)
    ids, mask = pad_batch(encode_prompts(tok, texts, chat_template=True), tok.pad_token_id,
                          "left")
    edit = RefEdit("clamp", [24], "resid_post", steering.vector.directions,
                   steering.targets[24], "prompt")
    for edits, got in (([], plain), ([edit], resp)):
        ref = HookReference(model, decoder_layers(model), branch_path("llama"),
                            [list(edits) for _ in texts])
        with ref, torch.no_grad():
            ref.begin(mask)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=12, pad_token_id=tok.pad_token_id)
        for row, want in zip(got.ids, out[:, ids.shape[1]:]):
            assert row.tolist() == want[:len(row)].tolist()
    assert [r.tolist() for r in resp.ids] != [r.tolist() for r in plain.ids]
