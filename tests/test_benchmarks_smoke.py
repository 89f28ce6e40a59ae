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
pytestmark = pytest.mark.slow  # each test runs a benchmark script (quick mode) in a subprocess


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def report_of(tmp_path: Path, script: str, *args: str, output_flag: str = "--json") -> dict:
    """Run `script` --quick writing its JSON under tmp_path; the report, its CPU record checked."""
    path = tmp_path / "report.json"
    result = run(script, *args, output_flag, str(path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(path.read_text())
    assert_cpu_recorded(report)
    return report


def assert_cpu_recorded(report: dict) -> None:
    """Every benchmark JSON says which CPU kernels torch ran and whether bfloat16 was native there."""
    assert report["cpu"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(report["cpu"]["bf16_native"], bool)


def test_speed_quick_runs_and_outputs_agree(tmp_path):
    result = run("speed.py", "--rounds", "1", "--json", str(tmp_path / "speed.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert_cpu_recorded(report)
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
    steps = precision["train_step"]
    assert steps["prefixtune kv, fp32"]["vs_fp32"] == 1.0
    for name in ("prefixtune kv, bf16 weights", "prefixtune kv, bf16 autocast"):  # each ratio is of its own timings
        assert steps[name]["seconds"] > 0
        assert steps[name]["vs_fp32"] == pytest.approx(steps[name]["seconds"] / steps["prefixtune kv, fp32"]["seconds"])
    assert precision["padding"]["grouped"] < precision["padding"]["random"]


def test_load_test_quick_has_no_errors_or_mismatches(tmp_path):
    report = report_of(tmp_path, "load_test.py", "--requests", "24", "--concurrency", "8")
    phases = report["phases"]
    assert all(phase["errors"] == 0 and phase["mismatches"] == 0 for phase in phases.values())


def test_mlp_fit_quick_records_its_cpu(tmp_path):
    report = report_of(tmp_path, "mlp_fit.py", output_flag="--output")
    assert report["fits"]


def test_speed_shared_prefix_section_gives_identical_outputs_on_both_paths(tmp_path):
    row = report_of(tmp_path, "speed.py", "--only", "shared-prefix", "--rounds", "1")["shared_prefix"]
    assert row["outputs_identical"] and row["forward_max_logit_difference"] < 1e-4
    assert set(row["generation_seconds"]) == {"bare", "shared", "concatenated"}


@pytest.mark.slow
def test_speed_hybrid_section_reports_state_prefixed_train_steps_against_the_floor(tmp_path):
    report = report_of(tmp_path, "speed.py", "--only", "hybrid", "--rounds", "1")
    for model_type in ("bamba", "lfm2"):
        rows = report["hybrid_train_step"][model_type]
        assert "4 state" in rows["layers"] and rows["floor"]["vs_floor"] == 1.0
        assert rows["kv"]["seconds"] > 0 and rows["hidden"]["seconds"] > 0


def test_distill_bench_quick_writes_every_phase_and_its_goals(tmp_path):
    result = run("distill_bench.py", "--threads", "1", "--output", str(tmp_path / "distill.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "distill.json").read_text())
    assert_cpu_recorded(report)
    assert report["complete"]
    assert report["distil"]["compression_ratio"] == report["distil"]["context_tokens"] / 32
    assert set(report["quality"]) >= {"teacher", "bare", "student", "truncated", "overlap"}
    assert len(report["quality"]["teacher"]["outputs"]) == 4  # --quick asks the first 4 questions
    assert report["serving"]["full context"]["requests"] == report["serving"]["distilled prefix"]["requests"] == 4
    assert report["peft_cartridge"]["training"]["seconds"] > 0
    assert report["step"]["peft"]["gradient_checkpointing"].startswith("enabled, then the training forward fails")
    assert len(report["goals"]) == 10 and all("met" in goal for goal in report["goals"].values())


def test_distill_bench_record_rewrites_its_json_after_each_phase(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from distill_bench import Record

    record = Record(str(tmp_path / "out.json"), {"command": "x"})
    record.phase("distil", {"seconds": 1.0})
    first = json.loads((tmp_path / "out.json").read_text())
    assert first["distil"] == {"seconds": 1.0} and not first["complete"] and "quality" not in first
    assert_cpu_recorded(first)
    record.phase("quality", {"teacher": {"accuracy": 0.5}})
    assert json.loads((tmp_path / "out.json").read_text())["quality"] == {"teacher": {"accuracy": 0.5}}


def test_distill_bench_only_quality_distils_scores_the_questions_and_stops(tmp_path):
    out = tmp_path / "probe.json"
    result = run("distill_bench.py", "--threads", "1", "--only-quality", "--output", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and "serving" not in report and "goals" not in report
    accuracy = report["accuracy"]
    assert {"teacher", "bare", "student"} <= set(accuracy)
    assert accuracy["student"] == report["quality"]["student"]["accuracy"]


def test_distill_bench_kl_seeds_trains_both_methods_once_per_data_order_seed(tmp_path):
    out = tmp_path / "kl.json"
    result = run("distill_bench.py", "--threads", "1", "--kl-seeds", "0,1", "--output", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    kl = report["kl_seeds"]
    assert report["complete"] and "quality" not in report and [row["seed"] for row in kl["seeds"]] == [0, 1]
    ours = [row["ours"]["kl"] for row in kl["seeds"]]
    peft = [row["peft"]["kl"] for row in kl["seeds"]]
    assert ours[0] != ours[1] and peft[0] != peft[1]  # the seed reorders the batches of both
    assert kl["difference_mean"] == pytest.approx(sum(ours) / 2 - sum(peft) / 2)
    assert kl["difference_se"] >= 0 and kl["ratio_of_means"] == pytest.approx(sum(ours) / sum(peft))
