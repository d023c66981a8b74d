#!/usr/bin/env bash
# The CPU set in one command: builds the benchmark's environment when it is missing
# (benchmarks/peers_env.sh: torch, transformers, fasteer, steering-vectors, repeng, pyvene,
# nnsight; ~2-5 minutes once), then runs benchmarks/bench_peers.py (about 3-4 minutes on 2
# idle cores) and writes benchmarks/results/peers_cpu.{json,md}.
#
#     bash benchmarks/run_cpu.sh                  # the CPU set
#     bash benchmarks/run_cpu.sh --quick          # a smoke run (~30 s)
#     SETUP=1 bash benchmarks/run_cpu.sh          # re-run the environment setup first
# Extra arguments go to bench_peers.py (e.g. --threads 0 for torch's default threads).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERS_VENV:-benchmarks/.venv-peers}
if [ "${SETUP:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/peers_status.txt" ]; then
  bash benchmarks/peers_env.sh
fi
echo "peers: $(tr '\n' ';' < "$VENV/peers_status.txt")"
export FASTEER_BENCH_COMMAND="bash benchmarks/run_cpu.sh${*:+ $*}"
exec "$VENV/bin/python" benchmarks/bench_peers.py "$@"
