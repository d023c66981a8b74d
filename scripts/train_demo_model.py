"""Train the demo world's tiny Llama on the synthetic sentiment language and save it.

    python scripts/train_demo_model.py                    # writes fasteer/demo/data/model/
    python scripts/train_demo_model.py --load --calibrate # sweep the steering strength
                                                          # of the model already there

The model: ``LlamaForCausalLM``, 4 layers, D=128, 4 heads, MLP 256, untied embeddings
(with tied ones this small model did not learn within the budget that a text's sentiment
words agree -- the very thing steering acts on), 0.73M parameters, float32 safetensors
(~3 MB). 2400 steps of 32 documents, AdamW, warm-up then cosine decay.

Deterministic: the corpus comes from ``random.Random(seed)``, torch is seeded and runs
with ``torch.use_deterministic_algorithms(True)``; a rerun writes the same bytes. One
thread by default: it is nearly as fast as two on this model, and a 2-thread run slows
down by up to 10x when other processes share the cores. Budget: ~2.3 minutes of training
on a 2-core machine that is not otherwise busy.
"""
from __future__ import annotations

import argparse
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


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(language.SPECIAL_TOKENS + language.VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # <bos> is added by the tokenizer itself, so every prompt starts the way training did.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B",
        special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=256,
        model_input_names=["input_ids", "attention_mask"])  # no token_type_ids: a causal LM


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=args.intermediate,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def document_batches(tokenizer, n_batches: int, batch_size: int, seed: int):
    """``n_batches`` right-padded batches of single "<bos> text <eos>" documents.

    One document per row, not packed: the model must learn that a text's sentiment words
    agree, and unrelated texts in the same context window would blur exactly that signal.
    Documents are grouped by length so little compute goes to padding; the batch order is
    shuffled with a seeded ``random.Random``.
    """
    import random

    texts = language.generate_corpus(n_batches * batch_size, seed)
    ids = [doc + [tokenizer.eos_token_id] for doc in tokenizer(texts)["input_ids"]]
    ids.sort(key=len)
    batches = []
    for b in range(n_batches):
        docs = ids[b * batch_size:(b + 1) * batch_size]
        width = max(len(d) for d in docs)
        input_ids = torch.full((len(docs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(docs), width), dtype=torch.long)
        for row, doc in enumerate(docs):
            input_ids[row, :len(doc)] = torch.tensor(doc)
            mask[row, :len(doc)] = 1
        batches.append((input_ids, mask, input_ids.masked_fill(mask == 0, -100)))
    random.Random(seed).shuffle(batches)
    return batches


def train(args):
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    data = document_batches(tokenizer, args.steps, args.batch, args.seed)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", mininterval=2)
    for step in bar:
        input_ids, mask, labels = data[step]
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start
    print(f"trained {args.steps} steps in {elapsed:.1f} s, final loss {loss.item():.3f}")
    return model.eval(), tokenizer, elapsed


def save(model, tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # "PreTrainedTokenizerFast" is understood by transformers 4.x and 5.x alike
    # (5.x writes its new name "TokenizersBackend", which 4.x does not know).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained may write 0600; package data must be readable
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({total / 1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}")


def check_fluency(model, tokenizer, n_prompts: int):
    prompts = language.neutral_prompts(n_prompts)
    for name, sample, top_p in (("greedy", False, 1.0), ("nucleus", True, world.DEMO_TOP_P),
                                ("plain", True, 1.0)):
        conts = world.generate_continuations(model, tokenizer, prompts, do_sample=sample,
                                             top_p=top_p)
        s = world.evaluate(prompts, conts)
        print(f"{name:8s} attribute {s['attribute']:.3f}  grammatical {s['grammaticality']:.3f}"
              f"  scored {s['scored']}/{s['n']}")
        for p, c in list(zip(prompts, conts))[:3]:
            print(f"    {p} || {c}")


def calibrate(model, tokenizer, layers, alphas, n_prompts: int, seeds, top_p: float):
    """Attribute score and grammaticality per alpha, one column per sampling seed."""
    prompts = language.neutral_prompts(n_prompts)
    print(f"calibration: {n_prompts} neutral prompts, sampling seeds {seeds}, top_p {top_p}, "
          f"CAA from {world.DEMO_PAIRS} pairs; alpha 1 = add v once at every position")
    for layer in layers:
        v = world.demo_vector(model, tokenizer, layer)
        print(f"layer {layer}: |v| = {v.norm():.2f}")
        for alpha in alphas:
            rows = []
            for seed in seeds:
                with world.hook_steering(model, layer, v, alpha):
                    conts = world.generate_continuations(model, tokenizer, prompts, seed=seed,
                                                         top_p=top_p)
                rows.append(world.evaluate(prompts, conts))
            att = [r["attribute"] for r in rows]
            gram = [r["grammaticality"] for r in rows]
            print(f"  alpha {alpha:7.2f}: attribute " + " ".join(f"{a:.3f}" for a in att)
                  + "   grammatical " + " ".join(f"{g:.3f}" for g in gram), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=world.DEMO_DIR)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--calibrate", action="store_true",
                    help="after training, sweep alpha with the plain-hook reference steering")
    ap.add_argument("--load", action="store_true",
                    help="skip training; check the model already in --out")
    ap.add_argument("--top-p", type=float, default=world.DEMO_TOP_P,
                    help="nucleus sampling for the calibration (1.0: plain sampling)")
    args = ap.parse_args(argv)

    if args.load:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(args.threads)
        tokenizer = AutoTokenizer.from_pretrained(args.out)
        model = AutoModelForCausalLM.from_pretrained(args.out).eval()
    else:
        model, tokenizer, _ = train(args)
        if not args.no_save:
            save(model, tokenizer, args.out)
    check_fluency(model, tokenizer, 64)
    if args.calibrate:
        a = world.DEMO_ALPHA
        calibrate(model, tokenizer, layers=(1, 2),
                  alphas=(0.0, 0.6, 1.0, a, 1.6, -0.6, -1.0, -a, -1.6, 3.0,
                          world.DEMO_BREAKING_ALPHA),
                  n_prompts=64, seeds=(0, 1, 2), top_p=args.top_p)


if __name__ == "__main__":
    main()
