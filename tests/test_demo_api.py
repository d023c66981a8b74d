"""`fasteer.demo` from Python: the model, the pairs (in code and as the shipped file), the
prompts, the checker and the SAE, each equal to what `fasteer demo` itself uses."""
from __future__ import annotations

import json

import pytest
import torch

import fasteer as fs
from fasteer import demo
from fasteer.demo import language, world
from fasteer.extract.files import read_pairs_file


@pytest.fixture(scope="module")
def loaded():
    return demo.load_model()


def test_load_model_is_the_demo_model(loaded):
    model, tok = loaded
    ref, _ = world.load_demo_model()
    assert model.config.num_hidden_layers == 4 and not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = tok(["the food was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert demo.LAYER < model.config.num_hidden_layers


def test_load_model_dtype():
    model, _ = demo.load_model(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pairs_file_equals_the_pairs_in_code():
    """The shipped file is exactly the demo's pairs, so `fasteer extract --pairs` on it
    reproduces the vector `fasteer demo` extracts."""
    positive, negative = demo.pairs()
    assert (positive, negative) == read_pairs_file(demo.PAIRS_FILE)
    assert len(positive) == world.DEMO_PAIRS
    made = language.contrastive_pairs(world.DEMO_PAIRS)
    assert positive == [p for p, _ in made] and negative == [n for _, n in made]
    rows = [json.loads(line) for line in demo.PAIRS_FILE.read_text().splitlines()]
    assert all(set(r) == {"positive", "negative"} for r in rows)
    # mirrored pairs: same length, differ in at least one (sentiment) word
    for p, n in zip(positive, negative):
        assert len(p.split()) == len(n.split()) and p != n


def test_pairs_other_sizes_and_seeds():
    pos, neg = demo.pairs(5, seed=7)
    assert len(pos) == len(neg) == 5
    assert demo.pairs(5, seed=7) == (pos, neg)
    assert demo.pairs(5, seed=8) != (pos, neg)
    with pytest.raises(ValueError):
        demo.pairs(0)


def test_extract_from_file_equals_extract_in_code(loaded):
    model, tok = loaded
    positive, negative = demo.pairs()
    a = fs.extract.caa(model, tok, positive, negative, layers=[demo.LAYER], progress=False)
    b = fs.extract.extract_from_files(model, tok, "caa", pairs=demo.PAIRS_FILE,
                                      layers=[demo.LAYER], progress=False)
    assert torch.allclose(a[demo.LAYER], b[demo.LAYER], rtol=0, atol=1e-6)


def test_continue_and_score_match_the_demo_command(loaded):
    """continue_prompts + score are the numbers `fasteer demo` prints: steering positive
    raises the attribute score over the unsteered continuations."""
    model, tok = loaded
    prompts = demo.neutral_prompts(6)
    assert prompts == language.neutral_prompts(6)
    plain = demo.continue_prompts(model, tok, prompts, max_new_tokens=12, greedy=True)
    again = world.generate_continuations(model, tok, prompts, do_sample=False,
                                         max_new_tokens=12)
    assert plain == again
    vec = fs.extract.caa(model, tok, *demo.pairs(), layers=[demo.LAYER], progress=False)
    with fs.steer(model, fs.Add(vec, alpha=demo.ALPHA)):
        steered = demo.continue_prompts(model, tok, prompts, max_new_tokens=12, greedy=True)
    base, up = demo.score(prompts, plain), demo.score(prompts, steered)
    assert base == world.evaluate(prompts, plain)
    assert up["attribute"] > base["attribute"]
    assert set(up) >= {"attribute", "grammaticality", "n"}


def test_sample_is_seeded(loaded):
    model, tok = loaded
    prompts = demo.neutral_prompts(3)
    a = demo.continue_prompts(model, tok, prompts, max_new_tokens=8, seed=3)
    b = demo.continue_prompts(model, tok, prompts, max_new_tokens=8, seed=3)
    assert a == b


def test_sae_and_its_notes(loaded):
    model, _ = loaded
    sae = demo.load_sae()
    info = demo.sae_info()
    assert sae.d_in == model.config.hidden_size
    assert 0 <= info["positive_feature"] < sae.d_sae
    assert len(info["density"]) == sae.d_sae
