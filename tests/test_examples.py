"""The examples run end to end (tiny step counts: this checks the pipeline, not the scores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


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
    assert "ROUGE-1" in result.stdout and "base + prefix" in result.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    for result in report["results"].values():
        assert set(result["rouge"]) == {"rouge1", "rouge2", "rougeL"}
        assert all(0 <= value <= 100 for value in result["rouge"].values())
    assert (tmp_path / "prefix-run" / "prefix" / "prefix.safetensors").is_file()
