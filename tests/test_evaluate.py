"""fasteer.evaluate, piece by piece: shipped datasets, bootstrap intervals, fluency (NLL
against a float64 computation, looping), the judges on labelled text, the one-generate
sweep (alpha-0 rows equal the unsteered model's own sampling), the report and the CLI's
checks. The behaviour on real models is in tests/real_models/test_behaviour.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hook_reference import one_thread, tiny_model  # noqa: F401  (fixture)
from fasteer.evaluate import concept_names, load_concept, load_prompts
from fasteer.evaluate.fluency import continuation_nll, fluency_score, repetition_rate
from fasteer.evaluate.stats import bootstrap, harmonic_mean

SHIPPED = ("formality", "french", "ocean", "sentiment")


# --------------------------------------------------------------------------- datasets

def test_every_shipped_concept_loads_with_matched_disjoint_splits():
    assert tuple(concept_names()) == SHIPPED
    for name in SHIPPED:
        c = load_concept(name)
        for split, n in (("train", 48), ("test", 24)):
            pos, neg = c.pairs(split)
            assert len(pos) == len(neg) == n
            assert all(p != q for p, q in zip(pos, neg))
        train = set(sum(c.pairs("train"), []))
        test = set(sum(c.pairs("test"), []))
        assert not train & test, f"{name}: a text is in both splits"


def test_prompt_splits_are_disjoint_and_sliced():
    sel, test = load_prompts("select"), load_prompts("test")
    assert len(sel) == len(test) == 24 and not set(sel) & set(test)
    assert load_prompts("test", 5) == test[:5]
    with pytest.raises(ValueError, match="1..24"):
        load_prompts("test", 25)
    with pytest.raises(ValueError, match="prompt split"):
        load_prompts("train")


def test_a_concept_file_with_unmatched_pairs_is_refused(tmp_path):
    data = json.loads(load_concept.__globals__["DATA_DIR"].joinpath("ocean.json").read_text())
    data["negative"]["test"] = data["negative"]["test"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="matched pairs"):
        load_concept(bad)
    data["judge"] = {"kind": "llm"}
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="judge.kind"):
        load_concept(bad)
    with pytest.raises(ValueError, match="expected one of"):
        load_concept("no-such-concept")


# --------------------------------------------------------------------------- statistics

def test_bootstrap_means_and_intervals():
    g = torch.Generator().manual_seed(3)
    concept = (torch.rand(37, generator=g) > 0.4).double()
    fluency = torch.rand(37, generator=g, dtype=torch.float64)
    out = bootstrap({"concept": concept, "fluency": fluency}, n_boot=4000, seed=1)
    for k, col in (("concept", concept), ("fluency", fluency)):
        m, lo, hi = out[k]
        assert m == pytest.approx(float(col.mean()), abs=1e-12)
        assert lo < m < hi
        # the percentile interval of a mean is close to mean +- 1.96 standard errors
        se = float(col.std(unbiased=False)) / math.sqrt(len(col))
        assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    c, f = float(concept.mean()), float(fluency.mean())
    assert out["combined"][0] == pytest.approx(2 * c * f / (c + f), abs=1e-12)
    # a constant column has a zero-width interval
    const = bootstrap({"x": torch.full((9,), 0.25, dtype=torch.float64)})
    assert const["x"] == pytest.approx((0.25, 0.25, 0.25))
    assert float(harmonic_mean(torch.tensor(0.0), torch.tensor(0.0))) == 0.0


# --------------------------------------------------------------------------- fluency

class _NoKeep(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep`` (older architectures): the NLL
    then slices the full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("keep", [True, False], ids=["logits_to_keep", "full_logits"])
def test_continuation_nll_matches_a_float64_computation(keep):
    model = tiny_model("llama", seed=4)
    model = model if keep else _NoKeep(model)
    g = torch.Generator().manual_seed(5)
    P, T = 6, 5
    ids = torch.randint(3, 97, (3, P + T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0            # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    got = continuation_nll(model, ids, mask, P, batch_size=2)
    want = []
    with torch.no_grad():
        m64 = tiny_model("llama", seed=4).double()
        for r in range(3):
            keep = mask[r].bool()
            row = ids[r][keep][None]
            logits = m64(input_ids=row).logits[0]
            n_prompt = int(keep[:P].sum())
            logp = torch.log_softmax(logits[n_prompt - 1:-1], -1)
            tgt = row[0, n_prompt:]
            want.append(-logp.gather(-1, tgt[:, None]).mean())
    torch.testing.assert_close(got, torch.stack(want), atol=2e-5, rtol=1e-5)


def test_repetition_rate_counts_repeated_4grams():
    rows = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8],        # no repeats
                         [1, 2, 3, 4, 1, 2, 3, 4],        # 5 grams, 1 repeats (1 2 3 4)
                         [9, 9, 9, 9, 9, 9, 9, 9]])       # 5 grams, 4 repeat the first
    torch.testing.assert_close(repetition_rate(rows),
                               torch.tensor([0.0, 1 / 5, 4 / 5], dtype=torch.float64))


def test_fluency_score_is_the_capped_perplexity_ratio_times_no_loop():
    nll = torch.tensor([2.0, 2.5, 3.0, 1.0], dtype=torch.float64)
    rep = torch.tensor([0.0, 0.0, 0.5, 0.8], dtype=torch.float64)
    got = fluency_score(nll, rep, nll_ref=2.5)
    want = torch.tensor([1.0, 1.0, math.exp(-0.5) * 0.5, 1.0 * 0.2], dtype=torch.float64)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- judges

def test_vader_judge_reads_sentiment():
    pytest.importorskip("vaderSentiment")
    from fasteer.evaluate.judges import VaderJudge
    j = VaderJudge()
    v = j.verdicts(["What a wonderful, lovely morning, I am so happy.",
                    "This is awful, I hate it and feel miserable.",
                    "The table has four legs."])
    assert v.tolist() == [1.0, 0.0, 0.0]
    assert j.accuracy(load_concept("sentiment")) >= 0.95


def test_language_judge_tells_french_from_english():
    pytest.importorskip("lingua")
    from fasteer.evaluate.judges import make_judge
    c = load_concept("french")
    j = make_judge(c)
    assert j.verdicts(["Je voudrais un café, s'il vous plaît.", "I would like a coffee, please."]
                      ).tolist() == [1.0, 0.0]
    assert j.accuracy(c) >= 0.95


@pytest.mark.parametrize("name", ["ocean", "formality"])
def test_embedding_judge_separates_held_out_texts(name):
    pytest.importorskip("sentence_transformers")
    from fasteer.evaluate.judges import EmbeddingJudge, embedding_model_path
    try:
        embedding_model_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    c = load_concept(name)
    j = EmbeddingJudge(c)
    # the held-out test texts were never used for the centroids
    assert j.accuracy(c, "test") >= 0.85
    if j.mode == "topic":
        # off-topic text is not "on topic" half the time (as a forced choice would make it)
        off = ["The committee postponed its vote on the new parking rules until March.",
               "She fixed the printer by replacing a worn roller.",
               "Our train was late because of a signal fault near the station."]
        assert j.verdicts(off).tolist() == [0.0, 0.0, 0.0]
        assert j.verdicts(["Waves rolled onto the sand as gulls circled over the harbour."]
                          ).tolist() == [1.0]


# --------------------------------------------------------------------------- the sweep

class _Tok:
    """A whitespace tokenizer over digits, enough for `sweep_ids` on a tiny model."""
    pad_token_id = 0
    padding_side = "left"

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[int(w) for w in t.split()] for t in texts]
        n = max(map(len, rows))
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, n - len(r):] = torch.tensor(r)
            mask[i, n - len(r):] = 1

        class B(dict):
            def to(self, device):
                return self
        return B(input_ids=ids, attention_mask=mask)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(x)) for x in row) for row in ids]


def test_sweep_rows_at_alpha_zero_are_the_unsteered_models_own_samples():
    import fasteer as fs
    from fasteer.evaluate.sweep import sweep_ids
    model = tiny_model("llama", seed=6)
    tok = _Tok()
    prompts = ["5 17 23", "8 9", "40 41 42 43"]
    g = torch.Generator().manual_seed(7)
    vec = fs.SteeringVector({1: torch.randn(32, generator=g) * 4})
    alphas = [0.0, 3.0]
    out = sweep_ids(model, tok, lambda a: fs.Add(vec, alpha=a, layers=[1]), alphas, prompts,
                    max_new_tokens=6, seed=11, top_p=1.0, progress=False)
    assert out.sequences.shape[0] == 6 and out.continuation_ids().shape[1] == 6
    # the same batch, unsteered, same seed: alpha-0 rows identical, alpha-3 rows differ
    batch = tok(prompts * 2)
    torch.manual_seed(11)
    plain = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    zero, steered = out.rows_of[0.0], out.rows_of[3.0]
    assert torch.equal(out.sequences[zero], plain[zero])
    assert not torch.equal(out.sequences[steered], plain[steered])
    # and the sweep left the model as it found it
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(after, tiny_model("llama", seed=6)(**batch).logits)


# --------------------------------------------------------------------------- report

def _report():
    from fasteer.evaluate import AlphaScores, EvalReport
    def scores(c, f):
        return {"concept": (c, c - .1, c + .1), "fluency": (f, f - .1, f + .1),
                "combined": (2 * c * f / (c + f), .1, .9), "nll": (2.5, 2.2, 2.8),
                "repetition": (0.01, 0.0, 0.03)}
    rows = [AlphaScores(a, 12, scores(c, f), [("The day", " went on.")])
            for a, c, f in ((0.0, 0.2, 0.9), (1.0, 0.7, 0.8), (4.0, 0.9, 0.1))]
    return EvalReport("smollm2", "sentiment", "positive vs negative", "VADER", 1.0,
                      "Add(CAA vector, α)", [15], dict(max_new_tokens=32, top_p=0.9, seed=0,
                                                      n_boot=2000), rows, rows, 1.0)


def test_report_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rep = _report()
    md = rep.markdown()
    assert "| 1 **(best)** | 0.70 [0.60, 0.80]" in md and "best α = 1" in md
    paths = rep.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["best_alpha"] == 1.0 and data["test"][2]["scores"]["fluency"][0] == 0.1
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fasteer.evaluate import EvalReport
    again = EvalReport.load(paths["json"])
    assert again == rep and again.markdown() == md


# --------------------------------------------------------------------------- the CLI

def test_eval_arguments_are_checked_before_loading(monkeypatch, capsys):
    from fasteer.cli import main
    from fasteer.commands import _common

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(_common, "load_model", refuse)
    for argv, needle in ((["--concept", "nope"], "--concept"),
                         (["--prompts", "30"], "--prompts"),
                         (["--alphas", "1,1"], "--alphas"),
                         (["--top-p", "0"], "--top-p"),
                         ([], "demo model")):
        model = [] if needle == "demo model" else ["--model", "./no/such/dir"]
        assert main(["eval", *model, *argv]) == 2
        assert needle in capsys.readouterr().err


def test_eval_names_a_missing_judge_before_loading(monkeypatch, capsys):
    import importlib.util
    from fasteer.cli import main
    from fasteer.commands import _common

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the judges were checked")
    monkeypatch.setattr(_common, "load_model", refuse)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "lingua" else real(n, *a))
    assert main(["eval", "--model", "smollm2", "--concept", "french"]) == 2
    err = capsys.readouterr().err
    assert "lingua" in err and "pip install 'fasteer[eval]'" in err
