"""The examples run end to end (tiny step counts: this checks the pipeline, not the scores)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from tiny import needs_smollm2

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # the examples run as scripts, training for real (tiny step counts)


def test_summarization_example_reports_rouge_for_base_and_prefix(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "summarization.py"),
            "--output",
            str(tmp_path),
            "--pretrain-steps",
            "10",
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result_stdout = result.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["results"]) == {"frozen base (denoiser)", "base + prefix"}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for label, result in report["results"].items():
        outputs, references = result["outputs"], result["references"]
        assert len(outputs) == len(references) > 0 and result["example"] == outputs[0]
        best = [scorer.score_multi(refs, output) for output, refs in zip(outputs, references, strict=True)]
        for kind, reported in result["rouge"].items():  # the reported score is these outputs' ROUGE F1
            assert reported == pytest.approx(100 * sum(s[kind].fmeasure for s in best) / len(best)), (label, kind)
        printed = f"{result['rouge']['rouge1']:8.1f} {result['rouge']['rouge2']:8.1f} {result['rouge']['rougeL']:8.1f}"
        assert f"{label:24} {printed}" in result_stdout
    assert (tmp_path / "prefix-run" / "prefix" / "prefix.safetensors").is_file()


E2E_DATA = next(
    (
        path
        for path in (Path(os.environ.get("E2E_DATA", "/nonexistent")), ROOT.parent / "shared" / "data" / "e2e")
        if (path / "train.csv").is_file()
    ),
    Path("/work/shared/data/e2e"),
)


@needs_smollm2
@pytest.mark.skipif(not (E2E_DATA / "train.csv").is_file(), reason="needs the E2E data (E2E_DATA=folder)")
def test_e2e_recipe_runs_two_steps_and_evaluates_without_writing_into_the_repo(tmp_path):
    """examples/e2e.sh as a smoke run: 2 training steps on SmolLM2, both evaluations on 2 MRs (the
    first rows of the E2E data, copied to tmp_path, so the validation loss is quick too)."""
    repo_before = _repo_state()
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train.csv", 32), ("validation.csv", 12)):
        with open(E2E_DATA / name, newline="") as source, open(data / name, "w", newline="") as target:
            csv.writer(target).writerows(itertools.islice(csv.reader(source), rows + 1))  # + the header
    env = {
        **os.environ,
        "STEPS": "2",
        "EVAL_LIMIT": "2",
        "OUT": str(tmp_path / "e2e"),
        "E2E_DATA": str(data),
        "PREFIXTUNE": str(Path(sys.executable).parent / "prefixtune"),
    }
    result = subprocess.run(["bash", str(ROOT / "examples" / "e2e.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e" / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    for folder in ("eval-validation", "eval-validation-bare"):
        report = json.loads((tmp_path / "e2e" / folder / "metrics.json").read_text())
        assert report["prompts"] == 2
        assert {"sacrebleu", "chrf", "rougeL"} <= set(report["metrics"])
        assert len((tmp_path / "e2e" / folder / "generations.jsonl").read_text().splitlines()) == 2
    assert _repo_state() == repo_before  # nothing written into the checkout


def _repo_state() -> str:
    """The checkout's changed and untracked files, ignored ones included (``git status``)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return "\n".join(line for line in status.stdout.splitlines() if "__pycache__" not in line and ".venv" not in line)
