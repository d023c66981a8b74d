"""The verifiable instructions: each checker on responses written to pass and to fail, the
phrasings, and the request splits."""
import re

import pytest
import torch

from fasteer.evaluate import instructions as ins
from fasteer.evaluate.instructions import get_instruction, load_requests

# (instruction, responses that follow it, responses that do not)
CASES = {
    "french": (["Le cycle de l'eau est un processus naturel qui fait circuler l'eau entre la "
                "mer, le ciel et la terre.", "Je pense que les abeilles sont très importantes "
                "pour nos jardins et nos fruits."],
               ["The water cycle moves water between the sea, the sky and the land.", "",
                "Las abejas son muy importantes para nuestros jardines y frutas."]),
    "title": (["<<The Water Cycle>>\n\nWater moves...", "Here it is: <<a b>> and more"],
              ["<<>> no title", "<< >>", "<The Water Cycle>", "<<two\nlines>>",
               "**The Water Cycle**"]),
    "numbered_list": (["1. Pack a tent.\n2. Bring water.", "Tips:\n 1) sleep\n 2) eat\n3) run"],
                      ["1. Only one item.", "Steps 1. and 2. inline", "- a\n- b", ""]),
    "include_future": (["The future is bright.", "FUTURE plans matter.", "(future)"],
                       ["Futures markets.", "A futuristic city.", "Nothing here."]),
    "exclude_can": (["You may try it.", "Canned food and scanners.", "Cannot do it."],
                    ["You can try it.", "CAN you?", "It can't fail.", ""]),
    "short": (["Bees pollinate flowers.", " ".join(["word"] * 30)],
              ["", " ".join(["word"] * 31)]),
}


def test_every_shipped_instruction_has_cases():
    assert set(CASES) == set(ins.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_accepts_and_rejects(name):
    if name == "french":
        pytest.importorskip("lingua")       # fasteer[eval]; the main test stage installs it
    instruction = get_instruction(name)
    good, bad = CASES[name]
    assert instruction.verdicts(good).tolist() == [1.0] * len(good), name
    assert instruction.verdicts(bad).tolist() == [0.0] * len(bad), name
    assert instruction.verdicts(good).dtype == torch.float64


def test_language_checker_without_lingua_says_how_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_lingua(name, *a, **k):
        if name == "lingua":
            raise ImportError("no lingua")
        return real(name, *a, **k)

    ins._language_detector.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_lingua)
    with pytest.raises(ImportError, match=r"pip install 'fasteer\[eval\]'"):
        ins.in_language("Bonjour à tous", "french")
    monkeypatch.undo()
    ins._language_detector.cache_clear()


def test_word_helpers():
    assert ins.contains_word("I like C++ and c", "c")
    assert not ins.contains_word("abc", "c")
    assert ins.word_count("  one\ttwo\nthree ") == 3
    assert not ins.at_most_words("   ", 5)
    assert ins.numbered_items("1. a\n2. b\n10) c\nx. d") == 3
    assert ins.contains_word("a.b*c", "b*c")          # the word is a literal, not a pattern


def test_phrasings_cycle_and_append():
    title = get_instruction("title")
    assert len(title.phrasings) == 3
    out = title.apply_all(["Describe tea.  ", "Describe rain.", "A.", "B."])
    assert out[0] == "Describe tea. " + title.phrasings[0]
    assert out[1].endswith(title.phrasings[1]) and out[2].endswith(title.phrasings[2])
    assert out[3].endswith(title.phrasings[0])
    for i in ins.INSTRUCTIONS.values():
        assert i.kind in ins.KINDS and i.mode in ins.MODES
        # the checker never passes on the bare phrasing's own text by accident, except the
        # ones that quote their own example (title) -- responses are judged, not prompts
        assert all(p.strip() for p in i.phrasings)
    assert get_instruction("short").mode == "add"


def _topic(request: str) -> str:
    for pattern in (r"about (.+?)[.?]$", r"Explain (.+?) to a beginner", r"benefits of (.+?)\?$",
                    r"^Describe (.+?)\.$", r"know about (.+?)\?$", r"care about (.+?)\?$"):
        m = re.search(pattern, request)
        if m:
            return m.group(1).lower()
    raise AssertionError(f"no topic in {request!r}")


def test_request_splits_are_disjoint_by_topic():
    splits = {s: load_requests(s) for s in ins.SPLITS}
    assert [len(splits[s]) for s in ins.SPLITS] == [64, 32, 64]
    topics = {s: {_topic(r) for r in rs} for s, rs in splits.items()}
    assert not topics["train"] & topics["validation"]
    assert not topics["train"] & topics["test"]
    assert not topics["validation"] & topics["test"]
    for rs in splits.values():
        assert len(set(rs)) == len(rs)
    assert load_requests("test", 5) == splits["test"][:5]


@pytest.mark.parametrize("call, match", [
    (lambda: load_requests("dev"), "split"),
    (lambda: load_requests("test", 0), "n:"),
    (lambda: load_requests("test", True), "n:"),
    (lambda: load_requests("validation", 33), "has 32"),
    (lambda: get_instruction("lowercase"), "expected one of"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
