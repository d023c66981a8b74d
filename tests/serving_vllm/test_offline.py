"""fasteer in vLLM's offline engine on a real model: one batch mixing steered and
unsteered requests equals fasteer on transformers (and a plain forward hook) token for
token, and unsteered requests equal vLLM's own output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import LAYER, NEW_TOKENS, PROMPTS

MIXED = [
    None,
    {"add": "caa", "alpha": 1.0},
    {"add": "caa", "alpha": -1.0},
    {"clamp": "caa", "value": 20.0},
    {"feature": [3, 11], "sae": "sae", "op": "set", "value": 6.0},
    None,
]


@pytest.fixture(scope="module")
def llm(model_dir, registry):
    import fasteer.hosts.vllm as fv
    from vllm import LLM
    fv.enable(registry)
    return LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True,
               max_num_seqs=8, enable_prefix_caching=True, block_size=32)


def greedy(llm, prompts, specs, new_tokens=NEW_TOKENS, **kw):
    import fasteer.hosts.vllm as fv
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=new_tokens, temperature=0, **kw,
                             extra_args=None if s is None else fv.extra_args(*(
                                 s if isinstance(s, list) else [s])))
              for s in specs]
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_mixed_batch_equals_fasteer_on_transformers(llm, hf_greedy):
    outs = greedy(llm, PROMPTS, MIXED)
    plain = [hf_greedy(p, None) for p in PROMPTS]
    for prompt, spec, out in zip(PROMPTS, MIXED, outs):
        assert list(out.token_ids) == hf_greedy(prompt, spec), (prompt, spec, out.text)
    # the steering did something: every steered row differs from its unsteered run
    for i, spec in enumerate(MIXED):
        if spec is not None:
            assert list(outs[i].token_ids) != plain[i], spec


def test_add_equals_a_plain_forward_hook(llm, hf_model, registry):
    """Add(v, a) at resid_post[LAYER] == a hook adding a*v to decoder layer LAYER's output."""
    from fasteer.vectors import SteeringVector
    model, tok = hf_model
    v = SteeringVector.load(registry.parent / "caa.safetensors")[LAYER]
    for alpha in (1.0, -1.0):
        def hook(module, args, output, alpha=alpha):
            hs = output[0] if isinstance(output, tuple) else output
            hs = hs + alpha * v.to(hs.dtype)
            return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs
        handle = model.model.layers[LAYER].register_forward_hook(hook)
        try:
            enc = tok(PROMPTS[1], return_tensors="pt")
            with torch.no_grad():
                ref = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        finally:
            handle.remove()
        ref = ref[0, enc["input_ids"].shape[1]:].tolist()
        out = greedy(llm, [PROMPTS[1]], [{"add": "caa", "alpha": alpha}])[0]
        assert list(out.token_ids) == ref


def test_steering_removed_restores_vllms_own_output(llm, model_dir):
    """After steered batches, unsteered requests give vLLM's own (plugin-less) output:
    the same tokens, and logprobs within float32 rounding of the norm (fasteer's kernel
    replaces vLLM's RMSNorm)."""
    greedy(llm, PROMPTS[:3], MIXED[1:4])
    mine = greedy(llm, PROMPTS, [None] * len(PROMPTS), logprobs=0)
    code = textwrap.dedent(f"""
        import json, os
        os.environ.pop("FASTEER_VLLM_REGISTRY", None)
        from vllm import LLM, SamplingParams
        llm = LLM(model={model_dir!r}, dtype="float32", max_model_len=256, enforce_eager=True,
                  max_num_seqs=8)
        outs = llm.generate({PROMPTS!r}, SamplingParams(max_tokens={NEW_TOKENS}, temperature=0,
                            logprobs=0), use_tqdm=False)
        print("RESULT" + json.dumps([[list(o.outputs[0].token_ids),
              [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]]
              for o in outs]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "FASTEER_VLLM_REGISTRY"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT"))[6:])
    for out, (tokens, logprobs) in zip(mine, theirs):
        assert list(out.token_ids) == tokens
        mine_lp = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(mine_lp, logprobs)) < 1e-3


def test_prefix_cache_never_mixes_steering(llm, monkeypatch):
    """A steered request must not reuse KV blocks an unsteered one left (nor the reverse).
    With the salt replaced by a constant, the same check fails: the test has teeth."""
    import fasteer.hosts.vllm.spec as spec_module

    prompt = " ".join(["The old library by the river keeps maps, letters and diaries"] * 6)
    steer = {"add": "caa", "alpha": 1.5}

    def steered_logprobs():
        return [lp[t].logprob for lp, t in zip(*(lambda o: (o.logprobs, o.token_ids))(
            greedy(llm, [prompt], [steer], new_tokens=4, logprobs=0)[0]))]

    def fresh(spec):
        llm.reset_prefix_cache()
        out = greedy(llm, [prompt], [spec], new_tokens=4, logprobs=0)[0]
        return [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]

    alone = fresh(steer)
    plain_alone = fresh(None)
    llm.reset_prefix_cache()
    greedy(llm, [prompt], [None], new_tokens=4)            # leaves unsteered blocks
    assert steered_logprobs() == alone
    llm.reset_prefix_cache()
    greedy(llm, [prompt], [steer], new_tokens=4)           # leaves steered blocks
    out = greedy(llm, [prompt], [None], new_tokens=4, logprobs=0)[0]
    assert [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)] == plain_alone

    monkeypatch.setattr(spec_module, "salt", lambda raw: "constant")
    llm.reset_prefix_cache()
    greedy(llm, [prompt], [{"add": "caa", "alpha": -1.5}], new_tokens=4)   # other steering
    assert steered_logprobs() != alone, "without a per-steering salt the cache is shared"


@pytest.mark.parametrize("spec, words", [
    ({"add": "nope"}, "unknown vector id 'nope'"),
    ({"add": "caa", "alpha": float("nan")}, "finite"),
    ({"add": "caa", "layers": [99]}, "out of range"),
    ({"frobnicate": 1}, "exactly one of"),
    ({"feature": 10_000, "sae": "sae", "op": "set", "value": 1.0}, "feature"),
])
def test_bad_request_is_refused_and_the_engine_carries_on(llm, spec, words):
    import fasteer.hosts.vllm as fv
    from vllm import SamplingParams
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0,
                                                  extra_args=fv.extra_args(spec)),
                     use_tqdm=False)
    assert len(greedy(llm, [PROMPTS[0]], [None], new_tokens=4)[0].token_ids) == 4


def test_malformed_json_string_is_refused(llm):
    from vllm import SamplingParams
    with pytest.raises(ValueError, match="not valid JSON"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, extra_args={"fasteer": "[{"}),
                     use_tqdm=False)
