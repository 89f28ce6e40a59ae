#!/usr/bin/env bash
# Run the fast core of the suite against other transformers releases, without touching .venv:
# each release is pip-installed (--no-deps) into its own folder under $ROOT and put first on PYTHONPATH,
# with the huggingface-hub/tokenizers it needs when they differ from .venv's. Prints one line per release.
#
#   bash scripts/transformers_versions.sh 5.15.0 5.19.0 5.23.0        # PYTHON=... to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
ROOT=${ROOT:-/tmp/prefixtune-transformers}
TESTS=(tests/test_exactness.py tests/test_mixed_batches.py tests/test_generation.py tests/test_training.py
       tests/test_prefix_files.py tests/test_seq2seq.py tests/test_undo.py tests/test_transformers_private.py)
mkdir -p "$ROOT"
for version in "$@"; do
  target="$ROOT/$version"
  [ -d "$target/transformers" ] || "$PYTHON" -m pip install -q --no-deps --target "$target" "transformers==$version"
  path="$target"
  # Older releases pin huggingface-hub 1.x and some tokenizers < 0.23.1; give them their own copies.
  metadata=$(cat "$target"/transformers-*.dist-info/METADATA)
  if grep -q "huggingface-hub<2.0" <<<"$metadata"; then
    [ -d "$ROOT/hub1/huggingface_hub" ] || "$PYTHON" -m pip install -q --no-deps --target "$ROOT/hub1" "huggingface-hub<2"
    path="$path:$ROOT/hub1"
  fi
  if grep -q "tokenizers<=0.23.0" <<<"$metadata"; then
    [ -d "$ROOT/tokenizers022/tokenizers" ] || \
      "$PYTHON" -m pip install -q --no-deps --target "$ROOT/tokenizers022" "tokenizers>=0.22,<0.23"
    path="$path:$ROOT/tokenizers022"
  fi
  result=$(PYTHONPATH="src:$path" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -1) || true  # a failing run is reported, not fatal
  echo "transformers $version: $result"
done
