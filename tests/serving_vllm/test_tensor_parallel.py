"""Tensor parallelism on the CPU: the residual stream is replicated across vLLM's TP ranks,
and every rank installs the same carriers and tables from the same requests, so a TP run
steers exactly as fasteer on transformers does.

SmolLM2-135M has 9 attention heads (3 KV heads), so TP=2 is impossible (vLLM refuses:
heads must divide by the TP size); TP=3 is the smallest split. On this 2-core, one-NUMA
node machine vLLM's CPU workers need their OpenMP threads bound by hand
(VLLM_CPU_OMP_THREADS_BIND), one worker per core with the third sharing core 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import PROMPTS

SPECS = [None, {"add": "caa", "alpha": 1.0}, {"add": "caa", "alpha": -1.0}]


def test_tp3_equals_fasteer_on_transformers(model_dir, registry, hf_greedy):
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={model_dir!r}, dtype="float32", max_model_len=256,
                      enforce_eager=True, max_num_seqs=8, tensor_parallel_size=3)
            specs = {SPECS!r}
            params = [SamplingParams(max_tokens=16, temperature=0,
                                     extra_args=None if s is None else {{"fasteer": [s]}})
                      for s in specs]
            outs = llm.generate({PROMPTS[:3]!r}, params, use_tqdm=False)
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
            print("RANKS", llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size)
    """)
    script = registry.parent / "tp3.py"
    script.write_text(code)
    env = dict(os.environ, FASTEER_VLLM_REGISTRY=str(registry), VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="0|1|0")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    # every rank put the carriers on its shard of the model
    assert sum("fasteer: carriers on 61 stream points" in l for l in log.splitlines()) == 3, log[-4000:]
    tokens = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT"))[6:])
    for prompt, spec, got in zip(PROMPTS, SPECS, tokens):
        assert got == hf_greedy(prompt, spec), (prompt, spec)
