#!/usr/bin/env bash
# The GPU set in one command, sized for one 10-minute call on an H100:
#   1. benchmarks/bench_gpu.py    Llama-3-8B-shaped bf16 model: eager, CUDA graph and
#      torch.compile decode; unsteered vs fasteer vs plain hooks; Add at all 32 layers
#      (batch 1 and 64), K=256 per-row configs in a batch of 256, SAE features
#   2. python -m fasteer.selftest --quick   kernel checks and kernel microbenchmarks (µs
#      per call at decode sizes, eager and in a CUDA graph; GB/s vs device copy bandwidth)
# Results go to $OUT when it is set (the device runner's output folder), else
# benchmarks/results/. Without a CUDA device it says so and exits 0.
#
#     bash benchmarks/run_gpu.sh
#     BUDGET=560 SELFTEST_S=150 bash benchmarks/run_gpu.sh    # the defaults, in seconds
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-560}
SELFTEST_S=${SELFTEST_S:-150}
start=$(date +%s)
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "run_gpu.sh: no CUDA device here (or no CUDA build of torch). The GPU set needs one;" \
       "nothing to do. The CPU set is: bash benchmarks/run_cpu.sh"
  exit 0
fi
# fasteer's extension (C++ and, with nvcc, CUDA kernels): build it if this checkout has none.
if ! "$PY" -c "import fasteer._C" 2>/dev/null; then
  echo "run_gpu.sh: building fasteer (pip install -e .)"
  "$PY" -m pip install -q --no-build-isolation -e . || "$PY" -m pip install -q -e . || {
    echo "run_gpu.sh: fasteer failed to build"; exit 1; }
fi
mkdir -p "$OUT_DIR"
"$PY" -m fasteer info 2>&1 | tail -n 20 || true
bench_s=$(( BUDGET - SELFTEST_S - ($(date +%s) - start) ))
echo "== [1/2] benchmarks/bench_gpu.py --budget $bench_s"
export FASTEER_BENCH_COMMAND="bash benchmarks/run_gpu.sh"
timeout $(( bench_s + 60 )) "$PY" benchmarks/bench_gpu.py --budget "$bench_s" --out "$OUT_DIR"
rc=$?
echo "bench_gpu exit code: $rc (124 = cut by timeout)"
left=$(( BUDGET - ($(date +%s) - start) ))
[ "$left" -lt 60 ] && left=60
echo "== [2/2] python -m fasteer.selftest --quick (up to $left s)"
timeout "$left" "$PY" -m fasteer.selftest --quick --out "$OUT_DIR"
echo "selftest exit code: $? (124 = cut by timeout); results in $OUT_DIR" \
     "($(( $(date +%s) - start )) s in all)"
exit $rc
