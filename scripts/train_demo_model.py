"""Train the demo world's tiny Llama on the synthetic sentiment language and save it.

    python scripts/train_demo_model.py                 # writes fasteer/demo/data/model/
    python scripts/train_demo_model.py --calibrate     # also sweep the steering strength

Deterministic: the corpus comes from ``random.Random(seed)``, torch is seeded, runs with
``torch.use_deterministic_algorithms(True)`` and a fixed thread count (results on the CPU
can differ in the last bits between thread counts, so the count is an argument, default 2).
Texts are packed into fixed-length rows ("<bos> text <eos> <bos> text <eos> ..."), which
wastes no compute on padding; documents are independent so attending across them
teaches nothing false. Budget: about 2.5 minutes on 2 CPU cores.
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
        unk_token="<unk>", padding_side="left", model_max_length=256)


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=args.intermediate,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def packed_rows(tokenizer, n_rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_rows, seq_len] token ids of concatenated "<bos> text <eos>" documents."""
    texts = language.generate_corpus(n_rows * seq_len // 20 + 100, seed)
    ids = tokenizer(texts)["input_ids"]  # each starts with <bos>
    stream = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    need = n_rows * seq_len
    if len(stream) < need:
        raise RuntimeError("corpus too small for the requested rows")
    return torch.tensor(stream[:need]).view(n_rows, seq_len)


def train(args):
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    data = packed_rows(tokenizer, args.steps * args.batch, args.seq_len, args.seed)

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
        batch = data[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=batch, labels=batch).loss
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
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({total / 1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}")


def check_fluency(model, tokenizer, n_prompts: int):
    prompts = language.neutral_prompts(n_prompts)
    for name, sample in (("greedy", False), ("sampled", True)):
        conts = world.generate_continuations(model, tokenizer, prompts, do_sample=sample)
        s = world.evaluate(prompts, conts)
        print(f"{name:8s} attribute {s['attribute']:.3f}  grammatical {s['grammaticality']:.3f}"
              f"  scored {s['scored']}/{s['n']}")
        for p, c in list(zip(prompts, conts))[:3]:
            print(f"    {p} || {c}")


def calibrate(model, tokenizer, layers, alphas, n_prompts: int, seeds):
    prompts = language.neutral_prompts(n_prompts)
    for layer in layers:
        v = world.demo_vector(model, tokenizer, layer)
        print(f"layer {layer}: |v| = {v.norm():.2f}")
        for alpha in alphas:
            rows = []
            for seed in seeds:
                with world.hook_steering(model, layer, v, alpha):
                    conts = world.generate_continuations(model, tokenizer, prompts, seed=seed)
                rows.append(world.evaluate(prompts, conts))
            att = [r["attribute"] for r in rows]
            gram = [r["grammaticality"] for r in rows]
            print(f"  alpha {alpha:7.2f}: attribute " + " ".join(f"{a:.3f}" for a in att)
                  + "   grammatical " + " ".join(f"{g:.3f}" for g in gram))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=world.DEMO_DIR)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--calibrate", action="store_true",
                    help="after training, sweep alpha with the plain-hook reference steering")
    ap.add_argument("--load", action="store_true",
                    help="skip training; calibrate the model already in --out")
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
        calibrate(model, tokenizer, layers=(1, 2),
                  alphas=(0.0, 1.0, 2.0, 3.0, 4.0, 6.0, -2.0, -4.0, -6.0, 20.0, 40.0, 80.0),
                  n_prompts=64, seeds=(0, 1, 2))


if __name__ == "__main__":
    main()
