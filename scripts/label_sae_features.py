"""Top-activating contexts of features of the packaged SmolLM2 SAE, for labelling by eye.

    python scripts/label_sae_features.py            # -> benchmarks/results/fgaa/features.md

Texts: the held-out windows of the SAE's own corpus (the 5% never trained on; rebuilt by
``scripts/train_smollm2_sae.py``'s functions, cached in ~/.cache/fasteer/sae-training).
Features: ``--random`` of them drawn (seeded) among features whose corpus density is in
[1e-3, 3e-2] -- neither dead nor dense, the range FGAA keeps -- plus any given with
``--features`` (e.g. the concept features of benchmarks/run_fgaa.py). The labels in the
README / docs/sae_steering.md were written by reading this file.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

OUT = REPO / "benchmarks" / "results" / "fgaa" / "features.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random", type=int, default=8, help="features drawn (default: %(default)s)")
    p.add_argument("--features", default="", help="comma-separated extra feature ids")
    p.add_argument("--k", type=int, default=6, help="contexts per feature (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="(default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import train_smollm2_sae as T
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasteer import models
    from fasteer.sae.labels import format_contexts, top_contexts
    from fasteer.sae.packaged import load_packaged_sae, packaged_sae_info

    sae, density = load_packaged_sae("smollm2")
    info = packaged_sae_info("smollm2")
    tr = info["training"]
    folder = models.packaged_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    key = (f"seed{tr['seed']}-chats{tr['chats']}x{tr['chat_tokens']}-ctx{tr['context']}"
           f"-l{T.LAYER}")
    corpus_file = T.CACHE / f"corpus-{key}.json"
    if not corpus_file.exists():
        raise SystemExit(f"{corpus_file} missing: run scripts/train_smollm2_sae.py --prepare-only "
                         "with the settings in training.json first")
    corpus = json.loads(corpus_file.read_text())
    wins = [(name, w) for name, texts in corpus.items() for w in T.windows(tok, texts, tr["context"])]
    random.Random(tr["seed"]).shuffle(wins)
    test_texts = [tok.decode(w) for _, w in wins[:max(1, len(wins) // 20)]]

    rng = random.Random(args.seed)
    pool = [i for i, d in enumerate(density.tolist()) if 1e-3 <= d <= 3e-2]
    chosen = sorted(rng.sample(pool, min(args.random, len(pool))))
    extra = [int(f) for f in args.features.split(",") if f.strip()]
    features = chosen + [f for f in extra if f not in chosen]
    contexts = top_contexts(model, tok, sae.to(dtype=torch.float32), test_texts, features,
                            k=args.k, window=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# Top-activating contexts, packaged SmolLM2 SAE (resid_post[8], {sae.d_sae} features)\n\n"
            f"`python scripts/label_sae_features.py {' '.join(sys.argv[1:])}`: "
            f"{len(test_texts)} held-out windows of the SAE's corpus; features {chosen} drawn "
            f"(seed {args.seed}) among the {len(pool)} with corpus density in [1e-3, 3e-2]"
            + (f", plus {extra}" if extra else "") + ".\n\n")
    args.out.write_text(head + format_contexts(contexts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
