"""How the extraction methods steer the demo model: the numbers behind the thresholds of
tests/test_demo_steering.py and the notes in `fasteer.demo.language.instruction_pairs`.

    python scripts/study_demo_vectors.py            # about a minute on 2 cores

Protocol (the test's): vectors at resid_post[DEMO_LAYER]; 32 neutral prompts (seed 11);
one batched generate per sampling seed (0-3) and configuration set, every configuration
on its own rows (where a row sits in the batch changes its sampling stream, so the same
configuration scores a little differently in the two sets); 48 new tokens, top-p 0.95;
attribute and grammaticality from the demo checker. Printed: each vector's cosine with
the CAA direction, then per configuration the attribute and grammaticality range over
the seeds.

Set "test": exactly the configurations of tests/test_demo_steering.py (which runs seed 0).
Set "study":
* CAA at alpha 1.3 (the demo's own setting);
* instruction vectors with their Clamp target, from `language.instruction_pairs` (positive
  opening vs its mirror before the same prompt) and from "opening vs no opening";
* repeng's pca_diff (unit norm, scaled to 1.3 / 1.6 / 2.0 x |CAA|) on the contrastive
  pairs, and at 1.3 x on two other pair sets: cuts anywhere after the first sentiment word
  (sentiment words included) and cuts at "was" only.
"""
from __future__ import annotations

import random

import torch

import fasteer as fs
from fasteer.commands import _common as C
from fasteer.demo import language, world


def opening_vs_none(n: int, seed: int = 5) -> tuple[list[str], list[str]]:
    """Like `language.instruction_pairs`, but the partner has no opening at all."""
    pairs = language.instruction_pairs(n, seed)
    prompts = language.neutral_prompts(n, seed=seed + 100)
    return [w for w, _ in pairs], prompts


def cut_pairs(n: int, seed: int, at: str | None) -> tuple[list[str], list[str]]:
    """Mirror pairs of texts cut after their first sentiment word: anywhere (at=None,
    sentiment words included) or only right after the word ``at``."""
    rng = random.Random(seed)
    pos, neg = [], []
    while len(pos) < n:
        writer = language._Writer(rng, "pos")
        text = writer.sentiment() + (writer.sentiment() if rng.random() < 0.5
                                     else writer.neutral())
        first = next(i for i, w in enumerate(text) if w in language.POSITIVE_WORDS)
        cuts = [i for i in range(first, len(text)) if at is None or text[i] == at]
        if not cuts:
            continue
        words = text[:rng.choice(cuts) + 1]
        pos.append(" ".join(words))
        neg.append(" ".join(language.flip_polarity(w) for w in words))
    return pos, neg


def main() -> None:
    torch.set_num_threads(2)
    model, tok = world.load_demo_model()
    L = world.DEMO_LAYER
    pairs = language.contrastive_pairs(world.DEMO_PAIRS)
    pos, neg = [p for p, _ in pairs], [n for _, n in pairs]
    caa = fs.extract.caa(model, tok, pos, neg, layers=[L], progress=False)
    norm = float(caa[L].norm())

    def instruction(with_, without):
        return fs.extract.instruction(model, tok, with_, without, layers=[L], progress=False)

    def pca_diff(p, n):
        return fs.extract.pca(model, tok, p, n, layers=[L], method="pca_diff", progress=False)

    mirror = instruction(*zip(*language.instruction_pairs(128)))
    no_opening = instruction(*opening_vs_none(128))
    pd = {"contrastive": pca_diff(pos, neg),
          "any cut": pca_diff(*cut_pairs(256, 9, None)),
          "cut at 'was'": pca_diff(*cut_pairs(128, 9, "was"))}
    for name, v in [("instruction, mirror", mirror.vector), ("instruction, no opening",
                                                            no_opening.vector)] + \
            [(f"pca_diff, {k}", v) for k, v in pd.items()]:
        cos = float(v[L] @ caa[L]) / (float(v[L].norm()) * norm)
        print(f"{name:28s} cosine with CAA {cos:.2f}")
    print(f"Clamp targets: mirror {mirror.targets[L]:.1f}, no opening "
          f"{no_opening.targets[L]:.1f}; |CAA| {norm:.1f}")

    a = world.DEMO_ALPHA
    pca_center = fs.extract.pca(model, tok, pos, neg, layers=[L], method="pca_center",
                                progress=False)
    test_set = {"none": None, "caa+": fs.Add(caa, a), "caa-": fs.Add(caa, -a),
                "pca_center+": fs.Add(pca_center, a * norm),
                "pca_center-": fs.Add(pca_center, -a * norm),
                "pca_diff+": fs.Add(pd["contrastive"], a * norm),
                "clamp": fs.Clamp(mirror.vector, value=mirror.targets[L], layers=[L]),
                "breaking": fs.Add(caa, world.DEMO_BREAKING_ALPHA)}
    study_set = {"none": None, "CAA x1.3": fs.Add(caa, a),
                 "Clamp, mirror pairs": fs.Clamp(mirror.vector, value=mirror.targets[L],
                                                 layers=[L]),
                 "Clamp, no opening": fs.Clamp(no_opening.vector,
                                               value=no_opening.targets[L], layers=[L])}
    for scale in (1.3, 1.6, 2.0):
        study_set[f"pca_diff contrastive x{scale}"] = fs.Add(pd["contrastive"], scale * norm)
    for name in ("any cut", "cut at 'was'"):
        study_set[f"pca_diff {name} x1.3"] = fs.Add(pd[name], 1.3 * norm)
    for label, configs in (("test", test_set), ("study", study_set)):
        report(model, tok, label, configs)


def report(model, tok, label: str, configs: dict) -> None:
    prompts = language.neutral_prompts(32, seed=11)
    n = len(prompts)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for seed in range(4):
        st = fs.patch(model)
        try:
            st.set_many([(iv, list(range(i * n, (i + 1) * n)))
                         for i, iv in enumerate(configs.values()) if iv is not None])
            texts = C.generate_rows(model, tok, prompts * len(configs),
                                    world.DEMO_MAX_NEW_TOKENS, seed=seed, top_p=world.DEMO_TOP_P)
        finally:
            st.unpatch()
        for i, name in enumerate(configs):
            s = world.evaluate(prompts, texts[i * n:(i + 1) * n])
            results[name].append((s["attribute"], s["grammaticality"]))
    print(f"\nset {label!r}\n{'configuration':34s} attribute    grammatical   (seeds 0-3)")
    for name, rs in results.items():
        a = [r[0] for r in rs]
        g = [r[1] for r in rs]
        print(f"{name:34s} {min(a):.2f}-{max(a):.2f}    {min(g):.2f}-{max(g):.2f}")


if __name__ == "__main__":
    main()
