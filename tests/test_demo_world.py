"""The embedded demo world: language, exact checker, shipped model, and steering that works.

Steering here is the plain-hook reference of fasteer.demo.world (a forward hook adding
alpha * v to a decoder layer's output), so these tests pin the demo's behaviour
independently of fasteer's own carriers. Seeds are fixed; numbers have margins.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from fasteer.demo import language as L
from fasteer.demo import world as W


# ----------------------------------------------------------------------------------------
# Checker: exact on hand-written texts
# ----------------------------------------------------------------------------------------

GRAMMATICAL = [
    "the soup was tasty .",
    "the soup was very tasty and rather fresh .",
    "anna ate the soup at the cafe .",
    "yesterday , my uncle watched the movie with anna .",
    "luckily , the weather was sunny .",
    "we gladly visited the beautiful park on sunday .",
    "she loved the teacher because he was kind .",
    "ben said the concert was boring .",
    "they would avoid the hotel .",
    "our pilot was quite good .",  # any determiner + any noun: syntax, not style
    "the weather was tasty .",  # odd, but grammatical: topic is not syntax
    "we spent the morning outside . the sky was grey . i would recommend the beach .",
    "anna ate the soup with anna with ben in the evening .",
]
UNGRAMMATICAL = [
    "",
    "the soup was tasty",  # no full stop
    "the tasty was soup .",
    "the anna ate the soup .",
    "the soup was very very good .",
    "soup was good .",
    "anna the soup ate .",
    "we loved .",
    "the soup was tasty . .",
    "the soup was yummy .",  # not a word of the language
    "tasty tasty tasty tasty",
    "anna gladly gladly ate the soup .",
    "the soup was tasty and .",
]


@pytest.mark.parametrize("text", GRAMMATICAL)
def test_grammatical_texts_parse(text):
    assert L.is_grammatical(text)


@pytest.mark.parametrize("text", UNGRAMMATICAL)
def test_ungrammatical_texts_do_not_parse(text):
    assert not L.is_grammatical(text)


def test_prefix_mode():
    assert L.is_grammatical("the soup was", prefix=True)
    assert L.is_grammatical("anna ate the soup . the", prefix=True)
    assert L.is_grammatical("", prefix=True)
    assert not L.is_grammatical("the soup was", prefix=False)
    assert not L.is_grammatical("the tasty was", prefix=True)
    assert not L.is_grammatical("anna ate the soup . . the", prefix=True)


def test_words_split_punctuation_and_long_texts_do_not_recurse():
    assert L.words("the soup was tasty.") == ["the", "soup", "was", "tasty", "."]
    assert L.is_grammatical("luckily, the soup was tasty.")
    long_text = " ".join(["anna ate the soup ."] * 3000)
    assert L.is_grammatical(long_text)
    assert not L.is_grammatical(long_text + " soup")


@pytest.mark.parametrize("text, score", [
    ("the soup was tasty .", 1.0),
    ("the soup was bland .", 0.0),
    ("luckily , the soup was tasty and fresh . we loved the soup .", 1.0),
    ("sadly , the movie was boring . we hated the movie .", 0.0),
    ("the soup was tasty and bland .", 0.5),
    ("we gladly visited the beautiful park but it was noisy .", 2 / 3),
    ("anna would recommend the cafe . ben would avoid the cafe . i would avoid it .", 1 / 3),
])
def test_attribute_score_exact(text, score):
    assert L.attribute_score(text) == pytest.approx(score)


def test_attribute_score_neutral_text():
    text = "anna ate the soup at the cafe on sunday ."
    assert L.attribute_score(text) is None
    assert L.attribute_score(text, default=0.5) == 0.5


def test_score_texts_aggregates():
    s = L.score_texts(["the soup was tasty .", "the soup was bland .", "we ate the soup .",
                       "tasty tasty"])
    assert s == {"attribute": pytest.approx(2 / 3), "grammaticality": 0.75, "scored": 3, "n": 4}


def test_checker_bad_input():
    with pytest.raises(TypeError, match="text"):
        L.attribute_score(None)
    with pytest.raises(TypeError, match="text"):
        L.is_grammatical(b"the soup was tasty .")
    with pytest.raises(TypeError, match="prefix"):
        L.is_grammatical("the soup", prefix="yes")
    with pytest.raises(ValueError, match="texts"):
        L.score_texts([])


# ----------------------------------------------------------------------------------------
# Lexicon and generator
# ----------------------------------------------------------------------------------------

def test_lexicon_is_consistent():
    assert not L.POSITIVE_WORDS & L.NEGATIVE_WORDS
    assert L.POSITIVE_WORDS | L.NEGATIVE_WORDS <= set(L.VOCABULARY)
    assert 200 <= len(L.VOCABULARY) <= 400  # "a few hundred words"
    assert len(set(L.VOCABULARY)) == len(L.VOCABULARY)
    for w in L.POSITIVE_WORDS | L.NEGATIVE_WORDS:
        flipped = L.flip_polarity(w)
        assert flipped != w and L.flip_polarity(flipped) == w
        assert (w in L.POSITIVE_WORDS) == (flipped in L.NEGATIVE_WORDS)


def test_generated_training_texts_all_parse_and_agree_in_polarity():
    seed = random.Random(1234).randrange(10**6)
    texts = L.generate_corpus(600, seed)
    assert all(L.is_grammatical(t) for t in texts)
    scores = [L.attribute_score(t) for t in texts]
    assert all(s in (0.0, 1.0) for s in scores)  # one polarity per text
    assert 0.4 <= sum(scores) / len(scores) <= 0.6  # and both about equally often
    assert set(w for t in texts for w in t.split()) <= set(L.VOCABULARY)
    assert L.generate_corpus(50, seed) == texts[:50]  # a seed fixes the corpus
    assert L.generate_corpus(50, seed + 1) != texts[:50]


def test_generate_text_polarity_is_honoured():
    rng = random.Random(7)
    assert all(L.attribute_score(L.generate_text(rng, "pos")) == 1.0 for _ in range(50))
    assert all(L.attribute_score(L.generate_text(rng, "neg")) == 0.0 for _ in range(50))


def test_neutral_prompts_are_neutral_and_continuable():
    prompts = L.neutral_prompts(200, seed=5)
    assert all(L.attribute_score(p) is None for p in prompts)
    assert all(L.is_grammatical(p, prefix=True) for p in prompts)
    # most end a sentence, some stop right before the sentiment word
    ends = [p.split()[-1] for p in prompts]
    assert 0.1 < ends.count("was") / len(ends) < 0.4
    assert L.neutral_prompts(200, seed=5) == prompts


def test_contrastive_pairs_differ_only_in_polarity():
    pairs = L.contrastive_pairs(100, seed=11)
    for pos, neg in pairs:
        p, n = pos.split(), neg.split()
        assert len(p) == len(n) and p[-1] == n[-1]
        assert p[-1] not in L.POSITIVE_WORDS | L.NEGATIVE_WORDS
        for a, b in zip(p, n):
            assert a == b or (a in L.POSITIVE_WORDS and b == L.flip_polarity(a))
        assert L.attribute_score(pos) == 1.0 and L.attribute_score(neg) == 0.0
        assert L.is_grammatical(pos, prefix=True) and L.is_grammatical(neg, prefix=True)
    assert len({p.split()[-1] for p, _ in pairs}) > 10  # cut at many kinds of position


def test_instruction_pairs_share_the_prompt_and_differ_in_the_opening():
    pairs = L.instruction_pairs(60, seed=3)
    prompts = L.neutral_prompts(60, seed=103)
    for (with_, without), prompt in zip(pairs, prompts):
        assert with_.endswith(" " + prompt) and without.endswith(" " + prompt)
        w, o = with_.split(), without.split()
        assert len(w) == len(o)
        for a, b in zip(w, o):
            assert a == b or (a in L.POSITIVE_WORDS and b == L.flip_polarity(a))
        assert L.attribute_score(with_) == 1.0 and L.attribute_score(without) == 0.0
        assert L.attribute_score(prompt) is None
        assert L.is_grammatical(with_, prefix=True) and L.is_grammatical(without, prefix=True)
    assert L.instruction_pairs(5, seed=3) == pairs[:5]


def test_generator_bad_input():
    with pytest.raises(ValueError, match="n"):
        L.generate_corpus(-1)
    with pytest.raises(TypeError, match="n"):
        L.neutral_prompts("3")
    with pytest.raises(TypeError, match="n"):
        L.contrastive_pairs(2.0)
    with pytest.raises(ValueError, match="n"):
        L.instruction_pairs(-2)
    with pytest.raises(ValueError, match="polarity"):
        L.generate_text(random.Random(0), "happy")
    with pytest.raises(TypeError, match="rng"):
        L.generate_text(0)


# ----------------------------------------------------------------------------------------
# The shipped model
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The demo model is tiny: one thread is about as fast as two, and it does not slow
    # down tenfold when other processes share the cores (as 2-thread OpenMP does).
    # Results are the same either way; the previous setting is restored afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    model, tok = W.load_demo_model()
    return model, tok


def test_files_are_small_and_load_through_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from safetensors import safe_open

    files = {f.name: f.stat().st_size for f in W.DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 5 * 1024 * 1024
    with safe_open(str(W.DEMO_DIR / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    model = AutoModelForCausalLM.from_pretrained(W.DEMO_DIR)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (4, 128)
    tok = AutoTokenizer.from_pretrained(W.DEMO_DIR)
    assert tok.padding_side == "left"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == \
        ("<bos>", "<eos>", "<pad>", "<unk>")
    assert set(tok.get_vocab()) == set(L.VOCABULARY) | set(L.SPECIAL_TOKENS)
    assert json.loads((W.DEMO_DIR / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizer_round_trip_and_bos(demo):
    _, tok = demo
    text = L.generate_corpus(1, seed=3)[0]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert len(ids) == len(text.split()) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("the soup was yummy .")["input_ids"][4] == tok.unk_token_id


def test_load_demo_model_dtype_and_bad_input():
    model, _ = W.load_demo_model(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    with pytest.raises(TypeError, match="dtype"):
        W.load_demo_model(dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        W.load_demo_model(dtype="float32")
    with pytest.raises(ValueError, match="device"):
        W.load_demo_model(device="nowhere")


def test_left_and_right_padding_give_the_same_residuals(demo):
    model, tok = demo
    texts = [p for pair in L.contrastive_pairs(7, seed=4) for p in pair]  # uneven lengths
    left = W.last_token_residuals(model, tok, texts, W.DEMO_LAYER)
    tok.padding_side = "right"
    try:
        right = W.last_token_residuals(model, tok, texts, W.DEMO_LAYER)
    finally:
        tok.padding_side = "left"
    single = torch.cat([W.last_token_residuals(model, tok, [t], W.DEMO_LAYER) for t in texts])
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(left, single, rtol=1e-4, atol=1e-3)


def test_hook_steering_removes_itself_and_checks_input(demo):
    model, tok = demo
    batch = tok(["anna ate the soup ."], return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
        v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
        with W.hook_steering(model, 1, v, 2.5):
            steered = model(**batch).logits
        after = model(**batch).logits
    assert (steered - base).abs().max() > 1e-2
    assert torch.equal(after, base)
    with pytest.raises(ValueError, match="vector"):
        with W.hook_steering(model, 1, torch.zeros(64), 1.0):
            pass
    with pytest.raises(ValueError, match="layer"):
        with W.hook_steering(model, 4, v, 1.0):
            pass
    with pytest.raises(TypeError, match="alpha"):
        with W.hook_steering(model, 1, v, "1.0"):
            pass


# ----------------------------------------------------------------------------------------
# Behaviour: neutral prompts are a coin flip; steering tips it; too much breaks grammar
# ----------------------------------------------------------------------------------------

N_PROMPTS = 48


@pytest.fixture(scope="module")
def prompts():
    return L.neutral_prompts(N_PROMPTS, seed=21)  # not the calibration prompts (seed 1)


@pytest.fixture(scope="module")
def vector(demo):
    model, tok = demo
    return W.demo_vector(model, tok)


def _steered(demo, vector, prompts, alpha, seed=0):
    model, tok = demo
    with W.hook_steering(model, W.DEMO_LAYER, vector, alpha):
        texts = W.generate_continuations(model, tok, prompts, seed=seed)
    return W.evaluate(prompts, texts)


def test_unsteered_continuations_are_grammatical_and_mixed(demo, prompts):
    model, tok = demo
    greedy = W.evaluate(prompts, W.generate_continuations(model, tok, prompts, do_sample=False))
    assert greedy["grammaticality"] >= 0.95
    sampled = W.evaluate(prompts, W.generate_continuations(model, tok, prompts, seed=1))
    assert sampled["grammaticality"] >= 0.95
    assert sampled["scored"] >= 0.9 * N_PROMPTS  # the model does express a sentiment
    assert 0.3 <= sampled["attribute"] <= 0.7  # ... and both ways: the natural mix


def test_moderate_alpha_steers_positive(demo, vector, prompts):
    s = _steered(demo, vector, prompts, W.DEMO_ALPHA)
    assert s["attribute"] >= 0.9
    assert s["grammaticality"] >= 0.9


def test_moderate_negative_alpha_steers_negative(demo, vector, prompts):
    s = _steered(demo, vector, prompts, -W.DEMO_ALPHA)
    assert s["attribute"] <= 0.1
    assert s["grammaticality"] >= 0.9


def test_very_large_alpha_breaks_grammar(demo, vector, prompts):
    # Broken text never reaches <eos>, so judge the first 24 new words as a prefix: can
    # they still be continued into a grammatical text? (Cheaper than 48 words of salad.)
    model, tok = demo
    shares = {}
    for alpha in (W.DEMO_ALPHA, W.DEMO_BREAKING_ALPHA):
        with W.hook_steering(model, W.DEMO_LAYER, vector, alpha):
            texts = W.generate_continuations(model, tok, prompts, seed=0, max_new_tokens=24)
        shares[alpha] = sum(L.is_grammatical(f"{p} {t}", prefix=True)
                            for p, t in zip(prompts, texts)) / len(prompts)
    assert shares[W.DEMO_ALPHA] >= 0.9
    assert shares[W.DEMO_BREAKING_ALPHA] <= 0.5


def test_demo_vector_is_stable_across_pair_samples(demo, vector):
    model, tok = demo
    other = W.demo_vector(model, tok, n_pairs=64, seed=99)
    cos = torch.nn.functional.cosine_similarity(vector, other, dim=0)
    assert cos > 0.95
    assert 0.7 < other.norm() / vector.norm() < 1.4
