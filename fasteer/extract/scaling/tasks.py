"""The two tasks of activation scaling (Stoehr et al. 2024, arXiv 2410.04962).

Activation scaling learns a few scalars that multiply activations at chosen (layer,
position) sites so that a model prefers one answer token over another. The paper steers
on two tasks, both reduced here to *two single answer tokens* compared by their logits at
the last prompt position:

``ccc`` -- country-capital conflict.
    The context asserts a wrong capital for a country, then asks for the capital::

        The capital of Poland is Tokyo. Q: What is the capital of Poland? A:

    The model's memorised fact (`` Warsaw``) conflicts with the context (`` Tokyo``).
    ``target`` is the correct capital, ``foil`` the wrong one asserted in context: the
    intervention is meant to *flip* a model that copies the context back to its memory.
    Only countries whose capital the model knows are useful (a model that does not know
    the fact has nothing to flip to), so with ``known_only=True`` and a model the task
    keeps only the countries passing the knowledge probe: on the context-free prompt
    ``"The capital of {country} is"`` the correct capital's logit must be the largest
    among the logits of *all candidate capitals* (every capital of ``countries.json``
    that is one token under this tokenizer). Top-1 among the candidates rather than over
    the whole vocabulary, because a small model's top token after "is" is usually a
    function word ("the", "a"), which says nothing about which city it would name.

``ioi`` -- indirect object identification::

        When Mary and John went to the store, John gave a drink to

    ``target`` is the indirect object (`` Mary``), ``foil`` the repeated subject
    (`` John``). Here the target is the *right* answer that the model usually already
    prefers: the intervention is meant to *strengthen / keep* it. Both orders of the
    first clause appear (ABB: "Mary and John ..., John"; BAB: "John and Mary ..., John")
    so that "the first name" is never the answer by position alone.

`TaskExample.flip` swaps target and foil, to train the opposite direction (e.g. make a
CCC model copy the context, or make IOI answer the subject).

Why fixed lengths. Learned scalars are per *position*: a scalar for position 7 must mean
the same token slot in every prompt. So every prompt of a task (train and test alike)
has the same token length: one template per task (templates differ in length), answers
that are one token (with their leading space, as they follow the prompt), and, of the
prompts built, only those whose token length is the most common one are kept (e.g.
countries whose names are one token). `encode` therefore needs no padding and refuses
prompts of different lengths.

BOS. Prompts are tokenized with ``tokenizer(prompt)`` as is (``add_special_tokens``
left at its default), i.e. the way the model is normally run: SmolLM2's tokenizer adds
no BOS, Gemma's prepends ``<bos>``. Lengths, positions and `encode` all include that
token where the tokenizer adds it (``Task.info["bos"]`` says whether it did). Answers
are tokenized with ``add_special_tokens=False``.

Default templates (``ccc_templates.json`` "qa", ``ioi_templates.json`` "gave"), chosen by
measurement (64 train / 64 test, seed 0, unsteered): with "qa" SmolLM2-135M-Instruct
prefers the true capital on 8 % / 16 % of train / test prompts and Gemma-3-270M on 3 % /
6 % -- both copy the context although they know the facts (40/40 and 82/83 single-token
capitals pass the probe); a bare restatement ("restate") lets SmolLM2 answer from memory
on ~75 %. On IOI both models already prefer the indirect object on ~100 % of prompts.

Splits are seeded and deterministic, and disjoint: CCC train and test use disjoint sets
of countries, and the wrong capital of an example is the capital of another country of
the *same* split, so no capital (as target or foil) appears in both. IOI train and test
use disjoint sets of names, hence disjoint name pairs.

The data (``fasteer/data/tasks``) was written for fasteer; see its README.md.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = ["TASKS", "TaskExample", "Task", "build_task", "encode", "task_report",
           "knowledge_probe", "logit_diffs", "load_task_data", "DATA_DIR"]

TASKS = ("ccc", "ioi")
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"


@dataclass(frozen=True)
class TaskExample:
    """One prompt and the two answer tokens the intervention arbitrates between.

    ``target`` is the answer the intervention should make the model prefer, ``foil`` the
    one it should stop preferring; both carry their leading space (``" Paris"``) and are
    a single token under the tokenizer the task was built for.
    """
    prompt: str
    target: str
    foil: str

    def flip(self) -> "TaskExample":
        """This example with target and foil swapped (train the opposite direction)."""
        return replace(self, target=self.foil, foil=self.target)


@dataclass
class Task:
    """A built task: disjoint train / test examples of one token length.

    ``info`` records how it was built (template, seed, counts, token length, which facts
    the model knows, which countries / names each split uses).
    """
    name: str
    train: list[TaskExample]
    test: list[TaskExample]
    info: dict = field(default_factory=dict)

    def flip(self) -> "Task":
        """The task with every example's target and foil swapped."""
        return Task(self.name, [e.flip() for e in self.train], [e.flip() for e in self.test],
                    {**self.info, "flipped": not self.info.get("flipped", False)})


# ------------------------------------------------------------------------------ data

def load_task_data(file: str) -> dict:
    """The parsed JSON file ``file`` of ``fasteer/data/tasks`` (e.g. ``"countries.json"``)."""
    path = DATA_DIR / file
    if not path.is_file():
        raise ValueError(f"file: no task data file {file!r} in {DATA_DIR}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _single_token_id(tokenizer, answer: str) -> int | None:
    """The id of ``answer`` if it is exactly one token (no special tokens), else None."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _lengths(tokenizer, prompts: list[str]) -> list[int]:
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]


def _mode_length(lengths: list[int]) -> tuple[int, dict]:
    """The most common length (the shortest among ties: deterministic) and all counts."""
    counts = Counter(lengths)
    best = max(counts.values())
    return min(n for n, c in counts.items() if c == best), dict(sorted(counts.items()))


def _template(kind: str, data: dict, template: str | None) -> tuple[str, str]:
    name = data["default"] if template is None else template
    if name not in data["templates"]:
        raise ValueError(f"template: {kind} has templates {sorted(data['templates'])}, "
                         f"got {template!r}")
    return name, data["templates"][name]


def _split_sizes(n_items: int, n_train: int, n_test: int, minimum: int) -> int:
    """How many of ``n_items`` (countries / names) go to test.

    Proportional to the requested example counts, but each side keeps at least the
    fewest items whose ordered pairs (k * (k - 1), the examples k items can make) cover
    its request, so one large request cannot starve the other side; where both cannot be
    met the larger request is the one left short (and its error names it)."""
    def need(n: int) -> int:
        k = minimum
        while k * (k - 1) < n:
            k += 1
        return k
    lo, hi = need(n_test), n_items - need(n_train)
    k = round(n_items * n_test / (n_train + n_test))
    if lo <= hi:
        k = min(max(k, lo), hi)
    else:
        k = hi if n_test >= n_train else lo
    return min(max(k, minimum), n_items - minimum)


def _too_few(name: str, split: str, have: int, want: int, why: str) -> ValueError:
    arg = "n_train" if split == "train" else "n_test"
    hint = "known_only=False or another template" if name == "ccc" else "another template"
    return ValueError(f"build_task({name!r}): only {have} {split} examples survive the "
                      f"filters, {arg}={want} requested ({why}); lower {arg}, or try {hint}")


# ------------------------------------------------------------------------------ model

def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def _last_logits(model, input_ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """float32 logits [N, vocab] at the last position of equal-length rows, on the CPU.

    Asks the model for the last position's logits only (``logits_to_keep=1``): Gemma-3's
    262k-token vocabulary would otherwise need ~1 GB per batch of 16 prompts."""
    device, out = _device(model), []
    for i in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[i:i + batch_size].to(device)
        mask = torch.ones_like(ids)
        try:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        except TypeError:   # a model (or stand-in) without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def knowledge_probe(model, tokenizer, countries: list[dict] | None = None, *,
                    probe: str | None = None, batch_size: int = 16) -> dict:
    """Which countries' capitals ``model`` knows without context.

    A country is *known* when, on ``probe`` (default: ``ccc_templates.json``'s
    ``"The capital of {country} is"``), its capital's logit at the last position is the
    largest among the logits of all candidate capitals -- the capitals of ``countries``
    (default: ``countries.json``) that are one token with their leading space. Countries
    with a multi-token capital cannot be scored and are listed under ``"multi_token"``.

    Returns ``{"known": [country...], "unknown": [...], "multi_token": [...],
    "n_known": int, "n_candidates": int, "predicted": {country: top candidate capital},
    "vocab_rank": {country: rank of the correct capital over the whole vocabulary, 0 =
    top token}}`` (the rank is informational: a stricter criterion, not the one used).
    """
    if countries is None:
        countries = load_task_data("countries.json")["countries"]
    if probe is None:
        probe = load_task_data("ccc_templates.json")["probe"]
    rows, multi = [], []
    for r in countries:
        tid = _single_token_id(tokenizer, " " + r["capital"])
        (rows if tid is not None else multi).append((r, tid))
    multi = [r["country"] for r, _ in multi]
    if not rows:
        raise ValueError("countries: no capital is a single token under this tokenizer")
    cand = torch.tensor([tid for _, tid in rows])
    prompts = [probe.format(country=r["country"]) for r, _ in rows]
    ids = tokenizer(prompts)["input_ids"]
    # group by length: no padding, so every row is scored exactly as a lone prompt
    best, rank = [0] * len(rows), [0] * len(rows)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        logits = _last_logits(model, torch.tensor([ids[i] for i in idx]), batch_size)
        for j, i in enumerate(idx):
            best[i] = int(logits[j, cand].argmax())
            rank[i] = int((logits[j] > logits[j, cand[i]]).sum())
    known = [r["country"] for i, (r, _) in enumerate(rows) if best[i] == i]
    unknown = [r["country"] for i, (r, _) in enumerate(rows) if best[i] != i]
    return {"known": known, "unknown": unknown, "multi_token": multi,
            "n_known": len(known), "n_candidates": len(rows),
            "predicted": {r["country"]: rows[best[i]][0]["capital"]
                          for i, (r, _) in enumerate(rows)},
            "vocab_rank": {r["country"]: rank[i] for i, (r, _) in enumerate(rows)}}


# ------------------------------------------------------------------------------ build

def build_task(name: str, tokenizer, model=None, *, n_train: int = 64, n_test: int = 64,
               seed: int = 0, known_only: bool = True, template: str | None = None) -> Task:
    """Build task ``name`` (``"ccc"`` or ``"ioi"``) for ``tokenizer``.

    Keeps only examples whose answers are one token (with the leading space) and whose
    prompts all have the most common token length of the chosen ``template`` (a name
    from ``ccc_templates.json`` / ``ioi_templates.json``; None: the file's default), so
    that learned per-position scalars line up. For ``"ccc"`` with ``known_only=True``
    and a ``model``, keeps only countries whose capital the model knows
    (`knowledge_probe`); without a model no fact is checked (``info["knowledge"]`` says
    so). Train and test are disjoint in countries (CCC) / names, hence name pairs (IOI),
    and depend only on ``seed`` (and the tokenizer / model).

    Raises ValueError naming the argument: unknown ``name`` / ``template``, counts below
    1, or fewer surviving examples than ``n_train`` / ``n_test`` (saying how many did).
    """
    if name not in TASKS:
        raise ValueError(f"name: expected one of {list(TASKS)}, got {name!r}")
    for arg, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{arg}: expected an int >= 1, got {n!r}")
    if name == "ccc":
        return _build_ccc(tokenizer, model, n_train, n_test, seed, known_only, template)
    return _build_ioi(tokenizer, n_train, n_test, seed, template)


def _bos(tokenizer) -> bool:
    ids = tokenizer("x")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _build_ccc(tokenizer, model, n_train, n_test, seed, known_only, template) -> Task:
    data = load_task_data("ccc_templates.json")
    tname, text = _template("ccc", data, template)
    countries = load_task_data("countries.json")["countries"]
    pool = [r for r in countries if _single_token_id(tokenizer, " " + r["capital"]) is not None]
    knowledge: dict = {"checked": False}
    if known_only and model is not None:
        probe = knowledge_probe(model, tokenizer, countries, probe=data["probe"])
        known = set(probe["known"])
        knowledge = {"checked": True, "criterion": "top-1 among candidate capitals",
                     "probe": data["probe"], "n_known": probe["n_known"],
                     "n_candidates": probe["n_candidates"], "known": probe["known"],
                     "unknown": probe["unknown"]}
        pool = [r for r in pool if r["country"] in known]
    # every (country, wrong capital) pair; its length decides whether it is kept
    pairs = [(c, w) for c in pool for w in pool if w is not c]
    lengths = _lengths(tokenizer, [text.format(country=c["country"], wrong=w["capital"])
                                   for c, w in pairs])
    if not pairs:
        raise _too_few("ccc", "train", 0, n_train, f"{len(pool)} usable countries")
    length, counts = _mode_length(lengths)
    valid: dict[str, set[str]] = {}
    for (c, w), n in zip(pairs, lengths):
        if n == length:
            valid.setdefault(c["country"], set()).add(w["country"])
    by_name = {r["country"]: r for r in pool}
    names = sorted(valid)
    if len(names) < 4:
        raise _too_few("ccc", "train", 0, n_train,
                       f"{len(names)} usable countries, at least 4 are needed")
    rng = random.Random(seed)
    rng.shuffle(names)
    k = _split_sizes(len(names), n_train, n_test, 2)
    split_names = {"test": sorted(names[:k]), "train": sorted(names[k:])}

    def examples(split: str, n: int) -> list[TaskExample]:
        members = split_names[split]
        inside = set(members)
        order = list(members)
        rng.shuffle(order)
        wrongs = {c: sorted(valid[c] & inside) for c in order}
        for c in order:
            rng.shuffle(wrongs[c])
        # round robin: every country once before any country twice
        out = []
        for r in range(max((len(w) for w in wrongs.values()), default=0)):
            for c in order:
                if r < len(wrongs[c]):
                    row, wrong = by_name[c], by_name[wrongs[c][r]]["capital"]
                    out.append(TaskExample(text.format(country=c, wrong=wrong),
                                           " " + row["capital"], " " + wrong))
        if len(out) < n:
            raise _too_few("ccc", split, len(out), n,
                           f"{len(members)} {split} countries of token length {length}")
        return out[:n]

    train, test = examples("train", n_train), examples("test", n_test)
    info = {"task": "ccc", "template_name": tname, "template": text, "seed": seed,
            "n_train": len(train), "n_test": len(test), "length": length,
            "length_counts": counts, "bos": _bos(tokenizer), "known_only": known_only,
            "n_countries": len(countries), "n_single_token_capitals": sum(
                _single_token_id(tokenizer, " " + r["capital"]) is not None
                for r in countries),
            "knowledge": knowledge, "train_countries": split_names["train"],
            "test_countries": split_names["test"],
            "target": "correct capital (memory)", "foil": "capital asserted in context"}
    return Task("ccc", train, test, info)


def _build_ioi(tokenizer, n_train, n_test, seed, template) -> Task:
    data = load_task_data("ioi_templates.json")
    tname, text = _template("ioi", data, template)
    all_names = load_task_data("names.json")["names"]
    names = [n for n in all_names if _single_token_id(tokenizer, " " + n) is not None]
    if len(names) < 4:
        raise _too_few("ioi", "train", 0, n_train,
                       f"{len(names)} single-token names, at least 4 are needed")
    rng = random.Random(seed)
    names = sorted(names)
    rng.shuffle(names)
    k = _split_sizes(len(names), n_train, n_test, 2)
    split_names = {"test": sorted(names[:k]), "train": sorted(names[k:])}
    places, objects = data["places"], data["objects"]

    def candidates(split: str) -> list[TaskExample]:
        members = split_names[split]
        ordered = [(io, s) for io in members for s in members if io != s]
        rng.shuffle(ordered)
        out = []
        for i, (io, s) in enumerate(ordered):
            a, b = (io, s) if i % 2 == 0 else (s, io)     # ABB, BAB alternately
            prompt = text.format(a=a, b=b, s=s, place=rng.choice(places),
                                 object=rng.choice(objects))
            out.append(TaskExample(prompt, " " + io, " " + s))
        return out

    cands = {"train": candidates("train"), "test": candidates("test")}
    lens = {s: _lengths(tokenizer, [e.prompt for e in c]) for s, c in cands.items()}
    length, counts = _mode_length(lens["train"] + lens["test"])
    kept = {s: [e for e, n in zip(cands[s], lens[s]) if n == length] for s in cands}
    for split, n in (("train", n_train), ("test", n_test)):
        if len(kept[split]) < n:
            raise _too_few("ioi", split, len(kept[split]), n,
                           f"{len(split_names[split])} {split} names, token length {length}")
    train, test = kept["train"][:n_train], kept["test"][:n_test]
    info = {"task": "ioi", "template_name": tname, "template": text, "seed": seed,
            "n_train": len(train), "n_test": len(test), "length": length,
            "length_counts": counts, "bos": _bos(tokenizer),
            "n_names": len(all_names), "n_single_token_names": len(names),
            "train_names": split_names["train"], "test_names": split_names["test"],
            "knowledge": {"checked": False},
            "target": "indirect object", "foil": "subject"}
    return Task("ioi", train, test, info)


# ------------------------------------------------------------------------------ encode

def encode(examples: list[TaskExample], tokenizer) -> dict:
    """Token ids of ``examples``, one row each, no padding.

    Returns ``{"input_ids": LongTensor [N, T], "attention_mask": [N, T] (all ones),
    "target_ids": [N], "foil_ids": [N]}``. Prompts are tokenized with
    ``tokenizer(prompt)`` (BOS where the tokenizer adds one); answers without special
    tokens. Raises ValueError if prompt lengths differ or an answer is not one token.
    """
    if not examples:
        raise ValueError("examples: empty")
    ids = tokenizer([e.prompt for e in examples])["input_ids"]
    lens = Counter(len(x) for x in ids)
    if len(lens) > 1:
        raise ValueError(f"examples: prompts must all have the same token length, got "
                         f"lengths {dict(sorted(lens.items()))} (build them with build_task)")
    answers = {}
    for e in examples:
        for a in (e.target, e.foil):
            if a not in answers:
                answers[a] = _single_token_id(tokenizer, a)
                if answers[a] is None:
                    raise ValueError(f"examples: answer {a!r} is not a single token under "
                                     f"this tokenizer")
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "target_ids": torch.tensor([answers[e.target] for e in examples]),
            "foil_ids": torch.tensor([answers[e.foil] for e in examples])}


def logit_diffs(model, tokenizer, examples: list[TaskExample],
                batch_size: int = 16) -> torch.Tensor:
    """logit(target) - logit(foil) at the last prompt position, one value per example."""
    enc = encode(examples, tokenizer)
    logits = _last_logits(model, enc["input_ids"], batch_size)
    rows = torch.arange(len(examples))
    return logits[rows, enc["target_ids"]] - logits[rows, enc["foil_ids"]]


def task_report(model, tokenizer, task: Task, *, batch_size: int = 16) -> dict:
    """How the unsteered model does on ``task``.

    Per split: ``accuracy`` (fraction of examples with logit(target) > logit(foil) at the
    last position) and ``mean_logit_diff`` (mean of logit(target) - logit(foil)). For CCC
    also ``knowledge``: the knowledge probe over all countries (known out of those with a
    single-token capital; ``n_vocab_top1`` / ``n_vocab_top10`` count the capitals that
    are also the top / a top-10 token over the whole vocabulary, a stricter view). A CCC
    accuracy near 0 means the model copies the context.
    """
    report: dict = {"task": task.name, "template": task.info.get("template_name"),
                    "length": task.info.get("length")}
    for split, examples in (("train", task.train), ("test", task.test)):
        if not examples:
            report[split] = {"n": 0}
            continue
        d = logit_diffs(model, tokenizer, examples, batch_size)
        report[split] = {"n": len(examples), "accuracy": float((d > 0).float().mean()),
                         "mean_logit_diff": float(d.mean())}
    if task.name == "ccc":
        probe = knowledge_probe(model, tokenizer, batch_size=batch_size)
        ranks = probe["vocab_rank"].values()
        report["knowledge"] = {"n_known": probe["n_known"], "n_candidates":
                               probe["n_candidates"], "known": probe["known"],
                               "unknown": probe["unknown"],
                               "n_vocab_top1": sum(r == 0 for r in ranks),
                               "n_vocab_top10": sum(r < 10 for r in ranks)}
    return report
