#!/usr/bin/env bash
# GPU check (docs/benchmarks.md): latency bench for the GPT-2, Llama-3.2-1B and -3B shapes
# (random init, bf16, batch 1, 100-token question, 26 CoT tokens, 6 thoughts, 20 runs),
# the packed-vs-naive training bench, and a 50-step RiM training run of a small model; then a
# short table (last). Sized for under 5 minutes on one H100/H200; JSON lands in $OUT.
#
#   benchmarks/gpu_check.sh                                   # on the GPU machine
#   DEVICE=cpu DTYPE=float32 MODELS=tiny RUNS=2 TRAIN_MODEL=tiny TRAIN_STEPS=6 \
#     benchmarks/gpu_check.sh                                 # dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu_check}
LIMIT=${LIMIT:-290}  # seconds; whatever finished is still summarised
export RIM_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works from a checkout without install
if [ "${DEVICE:-cuda}" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
mkdir -p "$OUT"
rm -rf "$OUT"/latency_*.json "$OUT/train_bench.json" "$OUT/train_run.json" "$OUT/train_run"
status=0
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py --out "$OUT" \
  --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
  --models "${MODELS:-gpt2,llama-1b,llama-3b}" --runs "${RUNS:-20}" \
  --train-model "${TRAIN_MODEL:-gpt2}" --train-runs "${TRAIN_RUNS:-5}" \
  --train-steps "${TRAIN_STEPS:-50}" > "$OUT/table.md" || status=$?
if [ "$status" -ne 0 ]; then
  echo "gpu_check: stopped with status $status (124 = over ${LIMIT}s); partial table:" >&2
  "$PY" benchmarks/gpu_check.py --summarize "$OUT" > "$OUT/table.md"
fi
cat "$OUT/table.md"
exit "$status"
