#!/usr/bin/env bash
# E2E NLG recipe: train a P=10 prefix on SmolLM2-135M-Instruct and report multi-reference BLEU.
# Data: ../shared/data/e2e (the official E2E devset split by MR); for the full official release see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${E2E_DATA:-../shared/data/e2e}
OUT=${OUT:-runs/e2e}
.venv/bin/prefixtune train --data "$DATA/train.csv" --validation "$DATA/validation.csv" --output "$OUT" \
  --steps 300 --batch-size 8 --lr 5e-3 --warmup-steps 30 --prefix-length 10 --parameterization kv \
  --init activations --init-text "Describe the restaurant in one sentence." --eval-every 100 --resume
.venv/bin/prefixtune eval --prefix "$OUT/prefix" --data "$DATA/validation.csv" --max-new-tokens 64 \
  --output "$OUT/eval-validation"
.venv/bin/prefixtune eval --data "$DATA/validation.csv" --max-new-tokens 64 --output "$OUT/eval-validation-bare"
