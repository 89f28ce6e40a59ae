"""The benchmark scripts run in --quick mode (tiny model): they finish and their outputs agree.
Timings are not asserted here; the numbers live in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_speed_quick_runs_and_outputs_agree(tmp_path):
    result = run("speed.py", "--rounds", "1", "--json", str(tmp_path / "speed.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["mixed_batch"]["outputs_identical"]
    assert report["generation"]["rows_changed_by_prefix"] > 0
    assert set(report["train_step"]) == {
        "floor (frozen fwd+bwd to inputs)",
        "prefixtune kv",
        "prefixtune mlp",
        "prefixtune hidden",
        "PEFT prefix tuning",
    }
    assert report["file_sizes"]["mlp"]["compiled_bytes"] < report["file_sizes"]["mlp"]["bytes"]
    precision = report["precision"]
    assert {f"{m}, {p}" for m in ("prefixtune kv", "PEFT prefix") for p in ("fp32", "bf16 autocast")} <= set(
        precision["train_step"]
    )
    assert precision["train_step"]["prefixtune kv, bf16 weights"]["vs_fp32"] > 0
    assert precision["padding"]["grouped"] < precision["padding"]["random"]


def test_load_test_quick_has_no_errors_or_mismatches(tmp_path):
    result = run("load_test.py", "--requests", "24", "--concurrency", "8", "--json", str(tmp_path / "load.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    phases = json.loads((tmp_path / "load.json").read_text())["phases"]
    assert all(phase["errors"] == 0 and phase["mismatches"] == 0 for phase in phases.values())


@pytest.mark.slow
def test_speed_hybrid_section_reports_state_prefixed_train_steps_against_the_floor(tmp_path):
    result = run("speed.py", "--only", "hybrid", "--rounds", "1", "--json", str(tmp_path / "hybrid.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "hybrid.json").read_text())
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for model_type in ("bamba", "lfm2"):
        rows = report["hybrid_train_step"][model_type]
        assert "4 state" in rows["layers"] and rows["floor"]["vs_floor"] == 1.0
        assert rows["kv"]["seconds"] > 0 and rows["hidden"]["seconds"] > 0
