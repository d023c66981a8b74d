#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): installs what the tests
# need on a fresh machine, builds fasteer, runs the suite twice:
#   1. in this Python, with the newest transformers pip resolves (a fresh machine: today's);
#   2. in .venv-floor/, with the oldest transformers fasteer claims (pyproject's floor),
#      skipping only the build / CUDA-compile tests, which do not touch transformers.
# FASTEER_TEST_FLOOR=0 skips the second run; extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=(-m pip install -q --disable-pip-version-check)
# The CPU build of torch (on this project's machines pip takes it from local disk);
# fasteer itself only asks for torch>=2.4.
"$PY" "${PIP[@]}" torch==2.13.0
"$PY" "${PIP[@]}" -e ".[test]"
"$PY" -m fasteer info
"$PY" -m pytest tests -q -p no:cacheprovider "$@"

if [ "${FASTEER_TEST_FLOOR:-1}" = "0" ]; then
    exit 0
fi
FLOOR=$(sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
echo "== the suite again with transformers ${FLOOR}.* (the oldest fasteer supports) =="
[ -x .venv-floor/bin/python ] || "$PY" -m venv .venv-floor
VPY=.venv-floor/bin/python
"$VPY" "${PIP[@]}" torch==2.13.0
# FASTEER_CUDA=0: this run needs only the C++ module (the CUDA compile tests ran above).
FASTEER_CUDA=0 "$VPY" "${PIP[@]}" -e ".[test]" "transformers==${FLOOR}.*"
"$VPY" -c "import transformers as t; print('transformers', t.__version__)"
exec "$VPY" -m pytest tests -q -p no:cacheprovider \
    --ignore=tests/test_build.py --ignore=tests/test_cuda_build.py \
    --ignore=tests/test_cuda_joint_emulated.py "$@"
