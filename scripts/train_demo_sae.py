"""Train the demo's tiny SAE on the demo model's residual stream and ship it with the demo.

    python scripts/train_demo_sae.py          # writes fasteer/demo/data/sae/

What it does, and why:

* Activations: ``resid_post`` of decoder layer ``world.DEMO_LAYER`` (the layer the demo steers)
  on every real token of ``language.generate_corpus(N_TEXTS, seed=CORPUS_SEED)`` except
  ``<bos>`` -- the BOS residual is an outlier with a much larger norm that SAEs are usually
  trained without (FGAA drops BOS features anyway).
* SAE: standard ReLU SAE (SAELens "standard" architecture, ``apply_b_dec_to_input``), trained
  on inputs scaled to mean norm sqrt(D) (SAELens' "expected_average_only_in"), loss = squared
  error + L1 on the latents, Adam, decoder rows renormalized to unit norm after every step.
  At the end the scale is folded into the weights so the saved SAE reads the *raw* residual
  and its decoder rows stay unit norm: a latent value is then the length, in residual units,
  of what that feature adds -- so ``FeatureEdit(op="set", value=v)`` values are comparable to
  the norm of the demo's CAA vector (~64).
* Size and sparsity (measured, seed 0): d_sae=512, l1=1.0 gave L0 6.9, 84 dead features and
  an attribute feature whose "set" edit broke grammar (0.42 at value 120) before it moved the
  score much; l1=0.3 gives L0 ~19, no dead features, FVE ~0.996, and a feature that steers
  (see tests/test_demo_sae.py for the values).
* Attribute feature: the feature whose mean activation differs most between positive and
  negative corpus texts (labels from the checker: ``language.attribute_score``), i.e. the
  feature that carries the sentiment state; also the most negative one.
* Output: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens format, via ``SAE.save``) and
  ``demo_features.json``: the chosen features, the measurements behind the choice, the
  corpus firing rate of every feature (FGAA's density filter uses it) and the sha256 of the
  ``model.safetensors`` the SAE was trained on (`fasteer.demo.sae` refuses a mismatch).

Deterministic: fixed corpus seed, ``torch.manual_seed``, deterministic algorithms, one
thread. Budget: well under 2 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fasteer.demo import language, world  # noqa: E402

OUT_DIR = REPO / "fasteer" / "demo" / "data" / "sae"
FEATURES_FILE = "demo_features.json"
CORPUS_SEED = 11       # not the model's training seed: held-out texts of the same language
N_TEXTS = 3000


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def collect(model, tok, texts, layer, batch_size=64):
    """(activations [N, D] of real non-BOS tokens, text index [N] of each row)."""
    acts, owner = [], []
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="activations", unit="batch"):
            chunk = texts[start:start + batch_size]
            batch = tok(chunk, return_tensors="pt", padding=True)
            model(**batch)
            keep = batch["attention_mask"].bool() & (batch["input_ids"] != tok.bos_token_id)
            acts.append(captured["h"][keep].float())
            rows = torch.arange(start, start + len(chunk)).unsqueeze(1).expand_as(keep)
            owner.append(rows[keep])
    finally:
        handle.remove()
    return torch.cat(acts), torch.cat(owner)


def state_mask(texts, owner):
    """[N] bool: token is after its text's first sentiment word and is not one itself.

    The tokenizer is word level (one token per word of the language), so the non-BOS
    tokens of a text are exactly ``language.words(text)``, in order."""
    polar = language.POSITIVE_WORDS | language.NEGATIVE_WORDS
    out = []
    for text in texts:
        seen = False
        for w in language.words(text):
            out.append(seen and w not in polar)
            seen = seen or w in polar
    mask = torch.tensor(out)
    if mask.shape[0] != owner.shape[0]:
        raise RuntimeError("token count differs from the word count of the texts")
    return mask


def train(x, d_sae, l1, steps, batch, lr, seed):
    """Train on x (already scaled); returns (W_enc, b_enc, W_dec, b_dec) in scaled units."""
    g = torch.Generator().manual_seed(seed)
    D = x.shape[1]
    W_dec = torch.randn(d_sae, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().clone() * 0.5
    b_enc = torch.zeros(d_sae)
    b_dec = x.mean(0).clone()
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=lr)
    for step in tqdm(range(steps), desc="train SAE", unit="step"):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        z = torch.relu((xb - b_dec) @ W_enc + b_enc)
        x_hat = z @ W_dec + b_dec
        mse = (x_hat - xb).pow(2).sum(-1).mean()
        # warm up the sparsity penalty so features find their directions first
        coeff = l1 * min(1.0, (step + 1) / (0.1 * steps))
        loss = mse + coeff * z.sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:   # linear decay over the last 20 %
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return tuple(p.detach() for p in params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--l1", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    from fasteer.sae import SAE

    model, tok = world.load_demo_model()
    layer = world.DEMO_LAYER
    texts = language.generate_corpus(N_TEXTS, seed=CORPUS_SEED)
    acts, owner = collect(model, tok, texts, layer)
    print(f"{acts.shape[0]} tokens of {len(texts)} texts at resid_post[{layer}], "
          f"mean |h| = {float(acts.norm(dim=1).mean()):.1f}")

    D = acts.shape[1]
    scale = math.sqrt(D) / float(acts.norm(dim=1).mean())
    W_enc, b_enc, W_dec, b_dec = train(acts * scale, args.d_sae, args.l1, args.steps,
                                       args.batch, args.lr, args.seed)
    # Fold the input scale s (see the module docstring): pre_raw = pre / s, so
    # W_enc stays, b_enc /= s, b_dec /= s, W_dec stays (unit rows).
    b_enc, b_dec = b_enc / scale, b_dec / scale
    sae = SAE(W_enc, b_enc, W_dec, b_dec, activation="relu", apply_b_dec_to_input=True,
              model_name="fasteer-demo", hook_name=f"blocks.{layer}.hook_resid_post",
              layer=layer, site="resid_post",
              metadata={"trained_by": "scripts/train_demo_sae.py", "l1": args.l1,
                        "steps": args.steps, "corpus_seed": CORPUS_SEED, "n_texts": N_TEXTS})

    with torch.no_grad():
        z = sae.encode(acts)
        rec = sae.decode(z)
        fve = 1 - float((rec - acts).pow(2).sum()) / float((acts - acts.mean(0)).pow(2).sum())
        l0 = float((z > 0).float().sum(1).mean())
        density = (z > 0).double().mean(0)
        dead = int((density == 0).sum())
        # Attribute feature: mean activation on positive minus negative texts, over the
        # tokens that carry the sentiment *state*: after the text's first sentiment word and
        # not sentiment words themselves. Averaging over all tokens instead picks a feature
        # of the positive words' own tokens (measured: with it, FeatureEdit "set" broke
        # grammar -- 0.08 at value 80 -- before moving the attribute score), while the
        # state is what steering has to put there.
        state = state_mask(texts, owner)
        labels = torch.tensor([language.attribute_score(t, default=0.5) for t in texts])[owner]
        pos_rows, neg_rows = state & (labels == 1.0), state & (labels == 0.0)
        diff = z[pos_rows].mean(0) - z[neg_rows].mean(0)
    pos_feature, neg_feature = int(diff.argmax()), int(diff.argmin())
    print(f"SAE d_sae={sae.d_sae}: fraction of variance explained {fve:.3f}, L0 {l0:.1f}, "
          f"dead {dead}")
    print(f"positive feature {pos_feature}: mean diff {float(diff[pos_feature]):+.2f} "
          f"(density {float(density[pos_feature]):.3f}); negative feature {neg_feature}: "
          f"{float(diff[neg_feature]):+.2f}; next best positive "
          f"{[int(i) for i in diff.topk(4).indices[1:]]}")

    out = sae.save(args.out)
    info = {
        "positive_feature": pos_feature,
        "negative_feature": neg_feature,
        "mean_activation_difference": {str(pos_feature): float(diff[pos_feature]),
                                       str(neg_feature): float(diff[neg_feature])},
        "fraction_of_variance_explained": fve,
        "l0": l0,
        "dead_features": dead,
        "density": [round(float(d), 6) for d in density],
        "model_sha256": sha256_of(world.DEMO_DIR / "model.safetensors"),
        "corpus": {"seed": CORPUS_SEED, "n_texts": N_TEXTS, "tokens": int(acts.shape[0])},
        "training": vars(args) | {"out": None},
    }
    (out / FEATURES_FILE).write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
