"""Extraction math against a direct computation on random tiny models.

The reference runs each prompt alone (no padding) with ``output_hidden_states=True`` and does
the statistics in float64: ``hidden_states[l + 1]`` is resid_post[l] (below the last layer,
whose HF hidden state is taken after the final norm), ``hidden_states[l]`` is resid_pre[l].
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fasteer.extract import ablation_direction, caa, collect_activations, extract_from_files, instruction, pca
from fasteer.sites import decoder_layers
from fasteer.vectors import SteeringVector

WORDS = ("the a cat dog sat ran on mat happy sad very not is was big small red blue it we they "
         "love hate sun rain today please answer in french briefly user system assistant").split()
N_LAYERS = 3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    # No pad token on purpose (like GPT-2 / Llama tokenizers): fasteer pads by itself.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   model_input_names=["input_ids", "attention_mask"], unk_token="[UNK]")


def _scale_weights(model, std):
    # Default init (std 0.02) makes a tiny random model nearly linear; larger weights give
    # activations with some structure.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=48, intermediate_size=72, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _scale_weights(LlamaForCausalLM(config), 0.15).eval(), make_tokenizer(bos=True)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS) + 4, n_embd=40, n_layer=N_LAYERS, n_head=4, n_positions=64)
    # GPT-2 keeps dropout on (p=0.1) in train mode: fasteer must switch to eval itself.
    return _scale_weights(GPT2LMHeadModel(config), 0.15).train(), make_tokenizer(bos=False)


@pytest.fixture(params=["llama", "gpt2"])
def model_tok(request):
    return request.getfixturevalue(request.param)


def random_prompts(n, seed, lo=1, hi=9):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:-5]) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def direct(model, tokenizer, prompts, layers, position="last", site="resid_post", texts_are_formatted=False):
    """{layer: float64 [N, D]} from one unpadded forward per prompt."""
    was = model.training
    model.eval()
    out = {l: [] for l in layers}
    with torch.no_grad():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt", add_special_tokens=not texts_are_formatted)
            hs = model(**enc, output_hidden_states=True).hidden_states
            for l in layers:
                h = (hs[l + 1] if site == "resid_post" else hs[l])[0].double()
                out[l].append(h[-1] if position == "last" else h.mean(0))
    model.train(was)
    return {l: torch.stack(v) for l, v in out.items()}


def repeng_sign(direction, pos, neg):
    """repeng's sign rule, written out the way repeng/extract.py does it (pairwise votes)."""
    p, q = pos @ direction, neg @ direction
    smaller = np.mean([p[i] < q[i] for i in range(len(p))])
    larger = np.mean([p[i] > q[i] for i in range(len(p))])
    if smaller > larger or (smaller == larger and (p - q).mean() < 0):
        return -direction
    return direction


def top_component(train):
    """First principal component via the covariance eigendecomposition (not an SVD)."""
    x = train - train.mean(0)
    w, v = np.linalg.eigh(x.T @ x)
    return v[:, -1]


# ----------------------------------------------------------------------- math
@pytest.mark.parametrize("position", ["last", "mean"])
@pytest.mark.parametrize("site, layers", [("resid_post", [0, 1]), ("resid_pre", [0, 1, 2])])
def test_caa_is_difference_of_means(model_tok, position, site, layers):
    model, tok = model_tok
    pos, neg = random_prompts(7, 1), random_prompts(7, 2)
    v = caa(model, tok, pos, neg, layers, position=position, site=site, batch_size=3, progress=False)
    ref_p, ref_n = direct(model, tok, pos, layers, position, site), direct(model, tok, neg, layers, position, site)
    assert v.layers == layers and v.site == site
    for l in layers:
        expected = ref_p[l].mean(0) - ref_n[l].mean(0)
        assert torch.allclose(v[l].double(), expected, atol=2e-5, rtol=1e-4), l
    meta = v.metadata
    assert meta["method"] == "caa" and meta["n_pairs"] == 7 and meta["position"] == position
    assert meta["model_type"] == model.config.model_type and meta["hidden_size"] == model.config.hidden_size


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_matches_repeng_math(model_tok, method):
    model, tok = model_tok
    pos, neg = random_prompts(9, 3), random_prompts(9, 4)
    v = pca(model, tok, pos, neg, [0, 1], method=method, batch_size=4, progress=False)
    ref_p, ref_n = direct(model, tok, pos, [0, 1]), direct(model, tok, neg, [0, 1])
    for l in (0, 1):
        p, n = ref_p[l].numpy(), ref_n[l].numpy()
        if method == "pca_diff":
            train = p - n
        else:
            center = (p + n) / 2
            train = np.concatenate([p - center, n - center])
        expected = repeng_sign(top_component(train), p, n)
        got = v[l].double().numpy()
        assert abs(np.linalg.norm(got) - 1) < 1e-6
        assert np.allclose(got, expected, atol=1e-4), (l, np.abs(got - expected).max())
        gap = p @ got - n @ got
        assert (gap > 0).sum() >= (gap < 0).sum()  # positive projects higher
    assert v.metadata["method"] == method


def test_instruction_direction_and_clamp_target(model_tok):
    model, tok = model_tok
    base = random_prompts(6, 5)
    with_instr = [b + " please answer in french briefly" for b in base]
    out = instruction(model, tok, with_instr, base, [0, 1], batch_size=4, progress=False)
    u_vec, targets = out  # unpacks as (vector, targets)
    assert out.vector is u_vec and out.targets is targets
    ref_w, ref_o = direct(model, tok, with_instr, [0, 1]), direct(model, tok, base, [0, 1])
    for l in (0, 1):
        diff = ref_w[l].mean(0) - ref_o[l].mean(0)
        u = diff / diff.norm()
        c = float((ref_w[l] @ u).mean())
        assert torch.allclose(u_vec[l].double(), u, atol=1e-5)
        assert math.isclose(targets[l], c, rel_tol=1e-4, abs_tol=1e-4)
        # Clamp(u, c) applied to a prompt without the instruction lands on the target projection
        h = ref_o[l][0]
        clamped = h + (c - h @ u) * u
        assert math.isclose(float(clamped @ u), c, rel_tol=1e-9, abs_tol=1e-9)
    assert u_vec.metadata["clamp_targets"] == {str(l): targets[l] for l in (0, 1)}


def test_documented_instruction_clamp_call_steers_per_layer(llama):
    """``u, c = instruction(...)`` then ``Clamp(u, value=c)`` (the docstring's call): c is a
    {layer: target} mapping, and the result equals one Clamp per layer with its number; a
    Clamp with no value takes the targets stored in the vector's metadata."""
    import fasteer as fs

    model, tok = llama
    base = random_prompts(6, 7)
    u, c = instruction(model, tok, [b + " please answer in french" for b in base], base, [0, 1],
                       batch_size=4, progress=False)
    enc = tok(random_prompts(1, 8, lo=6, hi=8)[0], return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits
        with fs.steer(model, fs.Clamp(u, value=c)):
            by_mapping = model(**enc).logits
        with fs.steer(model, fs.Clamp(u)):
            by_metadata = model(**enc).logits
        with fs.steer(model, fs.Clamp(u[0], c[0], layers=[0]), fs.Clamp(u[1], c[1], layers=[1])):
            one_by_one = model(**enc).logits
    assert not torch.allclose(by_mapping, plain, atol=1e-3)
    assert torch.equal(by_mapping, one_by_one) and torch.equal(by_metadata, one_by_one)
    with pytest.raises(ValueError, match=r"no target for layers \[1\]"):
        fs.Clamp(u, value={0: 1.0})
    with pytest.raises(ValueError, match="clamp_targets"):
        fs.Clamp(u[0], layers=[0])
    with pytest.raises(ValueError, match="finite"):
        fs.Clamp(u, value={0: 1.0, 1: float("nan")})


def test_ablation_direction_unit_difference_of_means_unequal_sets(model_tok):
    model, tok = model_tok
    harmful, harmless = random_prompts(5, 6), random_prompts(8, 7)
    v = ablation_direction(model, tok, harmful, harmless, [1], position="mean", progress=False)
    ref_a, ref_b = direct(model, tok, harmful, [1], "mean"), direct(model, tok, harmless, [1], "mean")
    diff = ref_a[1].mean(0) - ref_b[1].mean(0)
    assert torch.allclose(v[1].double(), diff / diff.norm(), atol=1e-5)
    assert abs(v.norms()[1] - 1) < 1e-6
    # Ablate(u) removes the component: h - (h.u)u has ~zero projection (u is float32-rounded)
    h = ref_a[1][0]
    u = v[1].double()
    assert abs(float(h @ u)) > 1e-3 and abs(float((h - (h @ u) * u) @ u)) < 1e-6 * float(h.norm())


# ------------------------------------------------------------ padding, batching
@pytest.mark.parametrize("position", ["last", "mean"])
def test_padding_side_and_batch_size_do_not_change_activations(model_tok, position):
    model, tok = model_tok
    prompts = random_prompts(11, 8, lo=1, hi=12)
    ref = direct(model, tok, prompts, [0, 1, 2], position, site="resid_pre")
    for side in ("left", "right"):
        for bs in (1, 4, 11):
            acts = collect_activations(model, tok, prompts, [0, 1, 2], site="resid_pre", position=position,
                                       batch_size=bs, padding_side=side, progress=False)
            for l in (0, 1, 2):
                assert torch.allclose(acts[l].double(), ref[l], atol=2e-5, rtol=1e-4), (side, bs, l)


def test_caa_batch_size_invariant(llama):
    model, tok = llama
    pos, neg = random_prompts(10, 9), random_prompts(10, 10)
    vs = [caa(model, tok, pos, neg, [1, 2], batch_size=b, progress=False) for b in (1, 3, 64)]
    for v in vs[1:]:
        assert v.allclose(vs[0], atol=1e-5, rtol=1e-4)


def test_last_layer_is_before_the_final_norm(model_tok):
    model, tok = model_tok
    prompts = random_prompts(4, 11)
    top = collect_activations(model, tok, prompts, [-1], progress=False)  # negative index = last layer
    assert list(top) == [N_LAYERS - 1]
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    with torch.no_grad():
        normed = final_norm(top[N_LAYERS - 1]).double()
    ref = direct(model, tok, prompts, [N_LAYERS - 1])  # hidden_states[-1] is after the final norm
    assert torch.allclose(normed, ref[N_LAYERS - 1], atol=2e-5, rtol=1e-4)


def test_one_forward_per_batch_and_no_work_past_the_last_layer(llama):
    model, tok = llama
    calls = {"model": 0, "layer2": 0, "lm_head": 0}
    hooks = [
        model.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1)),
        decoder_layers(model)[2].register_forward_pre_hook(lambda *a: calls.__setitem__("layer2", calls["layer2"] + 1)),
        model.lm_head.register_forward_pre_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
    ]
    try:
        caa(model, tok, random_prompts(7, 12), random_prompts(7, 13), [0, 1], batch_size=4, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"model": math.ceil(14 / 4), "layer2": 0, "lm_head": 0}


def test_model_state_is_restored(gpt2):
    model, tok = gpt2
    assert model.training
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in decoder_layers(model)]
    a = collect_activations(model, tok, random_prompts(3, 14), [0, 2], progress=False)
    b = collect_activations(model, tok, random_prompts(3, 14), [0, 2], progress=False)
    assert model.training  # train mode restored ...
    assert all(torch.equal(a[l], b[l]) for l in a)  # ... but dropout was off while reading
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in decoder_layers(model)] == before


def test_chat_template(llama):
    model, base_tok = llama
    tok = make_tokenizer(bos=True)
    tok.chat_template = CHAT_TEMPLATE
    prompts = random_prompts(4, 15)
    acts = collect_activations(model, tok, prompts, [1], chat_template=True, system_prompt="we love the sun",
                               progress=False)
    formatted = [f"system we love the sun user {p} assistant" for p in prompts]
    ref = direct(model, tok, formatted, [1], texts_are_formatted=True)
    assert torch.allclose(acts[1].double(), ref[1], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no chat template"):
        collect_activations(model, base_tok, prompts, [1], chat_template=True, progress=False)
    with pytest.raises(ValueError, match="system_prompt"):
        collect_activations(model, base_tok, prompts, [1], system_prompt="x", progress=False)


def test_progress_bar_can_be_disabled(llama, capsys):
    model, tok = llama
    collect_activations(model, tok, random_prompts(2, 16), [0], progress=False)
    assert capsys.readouterr().err == ""
    collect_activations(model, tok, random_prompts(2, 16), [0], progress=True, desc="reading")
    assert "reading" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda m, t: caa(m, t, [], [], [0]), ValueError, "positive: expected at least one prompt"),
        (lambda m, t: caa(m, t, ["a"], ["b", "c"], [0]), ValueError, "equal length, got 1 and 2"),
        (lambda m, t: pca(m, t, ["a", "b"], ["c"], [0]), ValueError, "equal length"),
        (lambda m, t: instruction(m, t, ["a"], [], [0]), ValueError, "without_instruction: expected at least one"),
        (lambda m, t: ablation_direction(m, t, ["a"], [], [0]), ValueError, "negative: expected at least one"),
        (lambda m, t: caa(m, t, "the cat", "the dog", [0]), TypeError, "positive: expected a list"),
        (lambda m, t: caa(m, t, ["the cat", 3], ["a", "b"], [0]), TypeError, r"positive\[1\]"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [N_LAYERS]), ValueError, "layer 3 out of range"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [-N_LAYERS - 1]), ValueError, "out of range"),
        (lambda m, t: caa(m, t, ["a"], ["b"], []), ValueError, "at least one layer"),
        (lambda m, t: caa(m, t, ["a"], ["b"], ["0"]), TypeError, "layers"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [0], position="first"), ValueError, "position"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [0], site="resid_mid"), ValueError, "site"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [0], batch_size=0), ValueError, "batch_size"),
        (lambda m, t: caa(m, t, ["a"], ["b"], [0], padding_side="top"), ValueError, "padding_side"),
        (lambda m, t: pca(m, t, ["a"], ["b"], [0]), ValueError, "at least 2 pairs"),
        (lambda m, t: pca(m, t, ["a", "b"], ["c", "d"], [0], method="lda"), ValueError, "method"),
        (lambda m, t: caa(m, t, ["the cat", ""], ["a", "b"], [0]), ValueError, r"positive\[1\].*no tokens"),
    ],
)
def test_bad_input_fails_before_any_forward(gpt2, call, err, match):
    model, tok = gpt2  # no BOS: an empty prompt really has no tokens
    forwards = []
    hook = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(err, match=match):
            call(model, tok)
    finally:
        hook.remove()
    assert forwards == []


def test_pca_on_identical_pairs_is_an_error(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="undefined"):
        pca(model, tok, ["the cat", "the cat"], ["the cat", "the cat"], [0], method="pca_center", progress=False)


# ------------------------------------------------------------------ files
def test_extract_from_files_formats(llama, tmp_path):
    model, tok = llama
    pos, neg = random_prompts(5, 17), random_prompts(5, 18)
    (tmp_path / "pos.txt").write_text("\n".join(pos) + "\n\n")
    (tmp_path / "neg.txt").write_text("\r\n".join(neg))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"positive": p, "negative": n}) for p, n in zip(pos, neg)))
    (tmp_path / "pairs.json").write_text(json.dumps([{"positive": p, "negative": n} for p, n in zip(pos, neg)]))
    ref = caa(model, tok, pos, neg, [1], progress=False)
    a = extract_from_files(model, tok, "caa", positive=tmp_path / "pos.txt", negative=tmp_path / "neg.txt",
                           layers=[1], output=tmp_path / "v.safetensors", progress=False)
    b = extract_from_files(model, tok, "caa", pairs=tmp_path / "pairs.jsonl", layers=[1], progress=False)
    c = extract_from_files(model, tok, "caa", pairs=tmp_path / "pairs.json", layers=[1], progress=False)
    for v in (a, b, c, SteeringVector.load(tmp_path / "v.safetensors")):
        assert v.allclose(ref, atol=1e-6)
    inst = extract_from_files(model, tok, "instruction", pairs=tmp_path / "pairs.jsonl", layers=[1], progress=False)
    assert "clamp_targets" in inst.metadata
    g = extract_from_files(model, tok, "pca_center", pairs=tmp_path / "pairs.jsonl", layers=[1, 2],
                           output=tmp_path / "v.gguf", progress=False)
    assert SteeringVector.load(tmp_path / "v.gguf").allclose(g)


def test_extract_from_files_errors(llama, tmp_path):
    model, tok = llama
    (tmp_path / "bad.jsonl").write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        extract_from_files(model, tok, "caa", pairs=tmp_path / "bad.jsonl", layers=[0], progress=False)
    (tmp_path / "broken.jsonl").write_text('{"positive": "a", \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: invalid JSON"):
        extract_from_files(model, tok, "caa", pairs=tmp_path / "broken.jsonl", layers=[0], progress=False)
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "one.txt").write_text("the cat\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        extract_from_files(model, tok, "caa", positive=tmp_path / "empty.txt", negative=tmp_path / "one.txt", layers=[0])
    with pytest.raises(ValueError, match="method"):
        extract_from_files(model, tok, "mean", pairs=tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="either pairs"):
        extract_from_files(model, tok, "caa", pairs=tmp_path / "bad.jsonl", positive=tmp_path / "one.txt")
    with pytest.raises(ValueError, match="layer 0"):
        extract_from_files(model, tok, "caa", positive=tmp_path / "one.txt", negative=tmp_path / "one.txt",
                           layers=[0, 1], output=tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError):
        extract_from_files(model, tok, "caa", pairs=tmp_path / "missing.jsonl")
