"""fasteer through vLLM's OpenAI server on 127.0.0.1: the plugin loads from its entry point
(FASTEER_VLLM_REGISTRY set), requests carry their steering in ``vllm_xargs``, steered and
unsteered requests run concurrently, bad requests get HTTP 400 for themselves only; in
eager mode and with vLLM's compilation on."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import NEW_TOKENS, PROMPTS

SPECS = [None, {"add": "caa", "alpha": 1.0}, {"add": "caa", "alpha": -1.0},
         {"clamp": "caa", "value": 20.0}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def completion(port, model_dir, prompt, spec, max_tokens=NEW_TOKENS):
    body = {"model": model_dir, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}
    if spec is not None:
        body["vllm_xargs"] = {"fasteer": json.dumps(spec if isinstance(spec, list) else [spec])}
    return post(port, body)


@pytest.fixture(scope="module", params=["eager", "compiled"])
def server(request, model_dir, registry, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, FASTEER_VLLM_REGISTRY=str(registry), VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--max-num-seqs", "8"]
    if request.param == "eager":
        cmd.append("--enforce-eager")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 480
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"server not up in time: {log.read_text()[-3000:]}")
        assert "fasteer: carriers on" in log.read_text(), "the plugin did not install"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_concurrent_requests_with_different_steering(server, model_dir, hf_greedy):
    prompts = PROMPTS[:len(SPECS)]
    with cf.ThreadPoolExecutor(len(SPECS)) as pool:
        results = list(pool.map(lambda ps: completion(server, model_dir, *ps),
                                zip(prompts, SPECS)))
    for prompt, spec, (status, body) in zip(prompts, SPECS, results):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == hf_greedy(prompt, spec), (prompt, spec)


@pytest.mark.parametrize("spec, words", [
    ({"add": "nope"}, "unknown vector id"),
    ({"add": "caa", "alpha": 1e400}, "finite"),
    ("[{", "not valid JSON"),
])
def test_bad_request_gets_400_and_others_carry_on(server, model_dir, spec, words):
    body = {"model": model_dir, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0,
            "vllm_xargs": {"fasteer": spec if isinstance(spec, str) else json.dumps([spec])}}
    with cf.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, server, body)
        good = pool.submit(completion, server, model_dir, PROMPTS[1], SPECS[1], 4)
        (bad_status, bad_body), (good_status, good_body) = bad.result(), good.result()
    assert bad_status == 400, bad_body
    assert words in json.dumps(bad_body)
    assert good_status == 200 and len(good_body["choices"][0]["token_ids"]) == 4
