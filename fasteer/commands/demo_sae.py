"""`fasteer demo --sae`: steer and watch the demo SAE's sentiment feature.

One batched generate over neutral prompts with per-row steering -- rows with no edit, rows
with `fasteer.FeatureEdit` on the attribute feature, rows with FGAA's vector (`fasteer.Add`)
-- while `Steerer.watch` records the feature's activation on every generated token. Per
group it prints the checker's attribute score, grammaticality and the mean watched
activation, so the user sees the feature move with the steering and the text follow.

Strengths, measured on the demo model with ``language.neutral_prompts(24)``, sampling seeds
0 and 1 (attribute / grammaticality; unsteered 0.62 / 1.00 and 0.40 / 0.88):
  FeatureEdit set 40: 0.87 / 0.96, 0.70 / 0.96 (set 60: 0.82 / 0.79, 0.78 / 1.00)
  FeatureEdit add 60: 0.69 / 0.88, 0.91 / 0.88 (add 100: grammar 0.58-0.71)
  FGAA alpha 4 (density threshold 0.2): 0.72 / 0.92, 0.85 / 0.88 (alpha 6: grammar 0.71-0.79)
FGAA's default density threshold (0.01) is for SAEs with tens of thousands of features; in
this 512-feature SAE the sentiment features fire on 5-15 % of tokens, so 0.01 dropped 236
features including every sentiment one (|v| = 0.007, no effect); 0.2 keeps them.
"""
from __future__ import annotations

import torch

FEATURE_SET = 40.0
FEATURE_ADD = 60.0
FGAA_ALPHA = 4.0
FGAA_DENSITY_THRESHOLD = 0.2
FGAA_PAIRS = 64


@torch.inference_mode()
def top_words(model, tok, sae, feature: int, n_texts: int = 200, top: int = 6):
    """Words of the demo language on which ``feature`` is largest on average (corpus texts)."""
    from ..demo import language, world

    texts = language.generate_corpus(n_texts, seed=5)
    captured = {}
    layer = model.model.layers[world.DEMO_LAYER]
    handle = layer.register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        batch = tok(texts, return_tensors="pt", padding=True)
        model(**batch)
    finally:
        handle.remove()
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != tok.bos_token_id)
    acts = sae.encode(captured["h"][keep].float())[:, feature]
    ids = batch["input_ids"][keep]
    sums = torch.zeros(len(tok)).index_add_(0, ids, acts)
    counts = torch.bincount(ids, minlength=len(tok)).float()
    mean = torch.where(counts >= 3, sums / counts.clamp(min=1), torch.full_like(sums, -1.0))
    best = mean.topk(top).indices
    return [(tok.convert_ids_to_tokens(int(i)), float(mean[i])) for i in best]


def steering_groups(model, tok, sae, info, progress: bool = False):
    """[(label, intervention or None)]: the row groups the demo (and its test) compare."""
    import fasteer as fs
    from ..demo import language

    k = info["positive_feature"]
    pairs = language.contrastive_pairs(FGAA_PAIRS)
    vec = fs.extract.fgaa(model, tok, sae, [p for p, _ in pairs], [n for _, n in pairs],
                          density=torch.tensor(info["density"], dtype=torch.float64),
                          density_threshold=FGAA_DENSITY_THRESHOLD, progress=progress)
    return [("no edit", None),
            (f"FeatureEdit set {FEATURE_SET:g}", fs.FeatureEdit(sae, feature=k, op="set",
                                                                value=FEATURE_SET)),
            (f"FeatureEdit add {FEATURE_ADD:g}", fs.FeatureEdit(sae, feature=k, op="add",
                                                                value=FEATURE_ADD)),
            (f"FGAA vector x{FGAA_ALPHA:g}", fs.Add(vec, alpha=FGAA_ALPHA))], vec


def run_groups(model, tok, sae, feature, groups, prompts, max_new, seed, progress=False):
    """One batched generate, group i on rows [i*P, (i+1)*P); returns per-group dicts with
    the continuations, checker scores and the mean activation of ``feature`` over generated
    tokens: ``watched`` the edited latent (what a FeatureEdit set it to), ``encoded`` the
    SAE's reading of the stream after the edits (what later layers see; it also shows an
    Add at the SAE's own site)."""
    import fasteer as fs
    from ..demo import world
    from . import _common as C

    P = len(prompts)
    st = fs.patch(model)
    try:
        st.set_many([(iv, list(range(i * P, (i + 1) * P)))
                     for i, (_, iv) in enumerate(groups) if iv is not None])
        watch = st.watch(sae, features=[feature], max_tokens=max_new, tokens="generated",
                         value="both")
        texts = C.generate_rows(model, tok, list(prompts) * len(groups), max_new, seed=seed,
                                progress=progress, desc="SAE demo: generate")
        edited, encoded = watch.edited_values()[..., 0], watch.encoded_values()[..., 0]
    finally:
        st.unpatch()
    out = []
    for i, (label, _) in enumerate(groups):
        rows = texts[i * P:(i + 1) * P]
        scores = world.evaluate(prompts, rows)
        out.append(dict(label=label, texts=rows, attribute=scores["attribute"],
                        grammaticality=scores["grammaticality"],
                        watched=float(edited[i * P:(i + 1) * P].mean()),
                        encoded=float(encoded[i * P:(i + 1) * P].mean())))
    return out


def run_sae_demo(model, tok, prompts, max_new, seed, progress: bool = False) -> None:
    import time

    from ..demo.sae import SAE_DIR, load_demo_sae

    sae, info = load_demo_sae()
    k = info["positive_feature"]
    print(f"\nSAE: {sae.d_sae} ReLU features on {sae.site}[{sae.layer}] "
          f"({SAE_DIR}, SAELens format)")
    words = ", ".join(f"{w} {a:.1f}" for w, a in top_words(model, tok, sae, k))
    print(f"sentiment feature {k} (largest positive-minus-negative mean activation on the "
          f"training corpus); top words by mean activation: {words}")
    groups, vec = steering_groups(model, tok, sae, info, progress=progress)
    print(f"FGAA vector from {FGAA_PAIRS} contrastive pairs: {len(vec.metadata['features'])} "
          f"features, |v| = {float(vec[sae.layer].norm()):.2f}")
    t0 = time.perf_counter()
    results = run_groups(model, tok, sae, k, groups, prompts, max_new, seed, progress=progress)
    print(f"one batched generate: {len(groups)} groups x {len(prompts)} prompts, watching "
          f"feature {k}, {time.perf_counter() - t0:.1f} s\n")
    print(f"{'steering':<22} {'attribute':>9}  {'grammatical':>11}  {'edited':>7}  "
          f"{'re-encoded':>10}   example")
    for r in results:
        example = f"{prompts[0]} | {r['texts'][0].strip()}"
        print(f"{r['label']:<22} {r['attribute']:>9.2f}  {r['grammaticality']:>11.2f}  "
              f"{r['watched']:>7.2f}  {r['encoded']:>10.2f}   {example[:80]}")
    print(f"\nfeature {k}: its mean activation over generated tokens, recorded by "
          "Steerer.watch while generating: 'edited' is the latent the FeatureEdit produced "
          "(a set reads its value), 're-encoded' the SAE's reading of the edited stream, "
          "which other features' decoder overlap also moves (docs/watch.md).")
