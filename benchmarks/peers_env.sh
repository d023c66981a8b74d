#!/usr/bin/env bash
# Creates the benchmark's own virtual environment (benchmarks/.venv-peers) with torch,
# transformers, fasteer (editable install of this checkout) and the peers fasteer is
# compared with: steering-vectors, repeng, pyvene, nnsight.
#
# Why a separate environment: the peers pin and pull their own dependencies (accelerate,
# sklearn, gguf, ...); keeping them out of the project's environment means the test
# suite never runs against a peer's pins. A peer that fails to install is recorded in
# benchmarks/.venv-peers/peers_status.txt and skipped; the benchmark then reports it as
# "not installed" instead of failing.
#
#     bash benchmarks/peers_env.sh            # create or update
#     PEERS_VENV=/tmp/v bash benchmarks/peers_env.sh
#
# Prints the path of the environment's python on its last line.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERS_VENV:-benchmarks/.venv-peers}
PY_BASE=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The transformers the project's own environment has; every peer runs on this one.
TRANSFORMERS_SPEC=${TRANSFORMERS_SPEC:-transformers==5.24.0}
# Versions checked with this benchmark (newest on PyPI when it was written). Override
# with e.g. PEERS="steering-vectors repeng" to take whatever pip resolves.
PEERS=${PEERS:-"steering-vectors==0.12.2 repeng==0.4.0 pyvene==0.1.8 nnsight==0.8.1"}
PIP_FLAGS=(-q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY_BASE" -m venv "$VENV" || { echo "peers_env: could not create $VENV" >&2; exit 1; }
fi
# The environment ignores itself (as venvs of newer Pythons do), so git never sees it.
echo '*' > "$VENV/.gitignore"
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
set -e
"$PY" -m pip install "${PIP_FLAGS[@]}" --upgrade pip setuptools wheel
# The CPU build of torch: on this project's machines pip takes it from local disk.
"$PY" -m pip install "${PIP_FLAGS[@]}" "$TORCH_SPEC"
# fasteer itself: the extension never links torch, so a build the checkout already has
# serves this environment too; reuse it through a .pth file (the same as an editable
# install, and it leaves the checkout's built files alone while others use them). A
# fresh clone has none: then `pip install -e .` builds it.
"$PY" -m pip install "${PIP_FLAGS[@]}" "setuptools>=64" pybind11 ninja
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ "${FASTEER_REBUILD:-0}" != 1 ] && ls fasteer/_C*.so >/dev/null 2>&1 && \
   (cd /tmp && "$PY" -c "import sys; sys.path.insert(0, '$PWD'); import fasteer._C") 2>/dev/null; then
  "$PY" -m pip install "${PIP_FLAGS[@]}" "$TRANSFORMERS_SPEC" "safetensors>=0.4" "tokenizers>=0.19" \
    "numpy>=1.24" "tqdm>=4.60"
  echo "$PWD" > "$SITE/fasteer_checkout.pth"
  echo "peers_env: fasteer from this checkout ($PWD), using its built extension"
else
  rm -f "$SITE/fasteer_checkout.pth"
  "$PY" -m pip install "${PIP_FLAGS[@]}" -e .
fi
set +e

# One set of constraints for every peer: the torch build and the transformers version
# the benchmark runs stay put, and repeng 0.4.0 (np.float_ in an annotation) needs
# NumPy 1.x, so pandas (pulled by pyvene) stays below 3.
CONSTRAINTS="$VENV/constraints.txt"
printf '%s\n' "$TORCH_SPEC" "$TRANSFORMERS_SPEC" "numpy<2" "pandas<3" > "$CONSTRAINTS"
"$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" "numpy<2"
status="$VENV/peers_status.txt"
: > "$status"
for spec in $PEERS; do
  name=${spec%%[=<>]*}
  log="$VENV/pip_$name.log"
  if "$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" "$spec" >"$log" 2>&1; then
    echo "$name installed" >> "$log"
  elif "$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" --no-deps "$spec" >>"$log" 2>&1; then
    # e.g. steering-vectors 0.12.2 declares transformers<5 but runs on 5.x; the
    # benchmark's logits check (against plain hooks) is what tells whether it works.
    echo "$name installed-no-deps" >> "$log"
  else
    echo "$name install-failed" >> "$log"
  fi
done
# Status after everything is installed (a later peer can break an earlier one).
for spec in $PEERS; do
  name=${spec%%[=<>]*}
  module=$(echo "$name" | tr '-' '_')
  how=$(tail -n1 "$VENV/pip_$name.log" | awk '{print $2}')
  if [ "$how" = install-failed ]; then
    echo "$name install-failed $(grep -m1 -i error "$VENV/pip_$name.log" | cut -c1-200)" | tee -a "$status"
  elif out=$(cd /tmp && "$PY" -c "import $module, importlib.metadata as m; print(m.version('$name'))" 2>&1); then
    echo "$name ok $(echo "$out" | tail -n1) ($how)" | tee -a "$status"
  else
    echo "$name import-failed $(echo "$out" | tail -n1 | cut -c1-200)" | tee -a "$status"
  fi
done
# The peers may move transformers; the benchmark records whatever version ended up here.
"$PY" -c "import torch, transformers, fasteer; print('torch', torch.__version__, '| transformers', transformers.__version__, '| fasteer', fasteer.__version__)"
echo "$PY"
