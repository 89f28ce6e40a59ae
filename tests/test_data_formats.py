"""`--data` takes what `datasets` loads: the same rows as JSONL, CSV, parquet, a glob of shards and a
``save_to_disk`` folder train identical prefixes; column mapping and ``--split``; bad rows name file,
line (or row) and field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.data import DataError, read_examples

WORDS = "restaurant food cheap expensive near river city centre pub coffee shop".split()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    rng = random.Random(0)
    prompts = [" ".join(rng.sample(WORDS, 3)) for _ in range(24)]
    return [{"prompt": prompt, "completion": f"the {prompt} is good"} for prompt in prompts]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(tiny_folder: Path, output: Path, data: str, *extra: str) -> dict[str, torch.Tensor]:
    args = ["train", "--model", str(tiny_folder), "--data", data, "--output", str(output), "--prefix-length", "4"]
    args += ["--steps", "3", "--batch-size", "4", "--lr", "3e-2", "--warmup-steps", "1", "--seed", "3", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return load_file(output / "prefix" / "prefix.safetensors")


@pytest.mark.slow
def test_jsonl_csv_parquet_shards_and_saved_folder_train_identical_prefixes(tiny_folder, tmp_path, rows):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    datasets.Dataset.from_list([{"mr": r["prompt"], "ref": r["completion"]} for r in rows]).to_csv(
        tmp_path / "rows.csv", index=False
    )  # E2E's column names: the CSV default
    renamed = [{"question": r["prompt"], "answer": r["completion"]} for r in rows]
    datasets.Dataset.from_list(renamed).to_parquet(tmp_path / "rows.parquet")
    write_jsonl(tmp_path / "part-0.jsonl", rows[:10]), write_jsonl(tmp_path / "part-1.jsonl", rows[10:])
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    )
    saved.save_to_disk(tmp_path / "saved")
    before = sorted(p.name for p in (tmp_path / "saved").rglob("*"))

    reference = train(tiny_folder, tmp_path / "jsonl", str(jsonl))
    others = {
        "csv": train(tiny_folder, tmp_path / "csv", str(tmp_path / "rows.csv")),
        "parquet": train(
            tiny_folder,
            tmp_path / "parquet",
            str(tmp_path / "rows.parquet"),
            "--prompt-field",
            "question",
            "--completion-field",
            "answer",
        ),
        "glob": train(tiny_folder, tmp_path / "glob", str(tmp_path / "part-*.jsonl")),
        "save_to_disk": train(tiny_folder, tmp_path / "saved-run", str(tmp_path / "saved"), "--split", "train"),
    }
    untrained = train(tiny_folder, tmp_path / "zero", str(jsonl), "--lr", "1e-12")  # training did move it
    assert not all(torch.allclose(untrained[key], reference[key]) for key in reference)
    for name, tensors in others.items():
        assert tensors.keys() == reference.keys(), name
        for key in tensors:
            torch.testing.assert_close(tensors[key], reference[key], rtol=0, atol=0, msg=name)
    assert sorted(p.name for p in (tmp_path / "saved").rglob("*")) == before  # nothing written into it


def test_a_split_of_a_saved_folder_and_a_file_slice_are_read(tmp_path, rows):
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    )
    saved.save_to_disk(tmp_path / "saved")
    assert [e.prompt for e in read_examples(tmp_path / "saved", split="test")] == [r["prompt"] for r in rows[:2]]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert len(read_examples(jsonl, split="train[:5]")) == 5
    with pytest.raises(DataError, match=r"saved: no split 'validation' \(has \['test', 'train'\]\)"):
        read_examples(tmp_path / "saved", split="validation")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: datasets.Dataset.from_list(
                [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}]
            ).to_parquet(d / "bad.parquet"),
            r"bad\.parquet row 2: field 'completion' must be a non-empty string",
        ),
        (
            lambda d: datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(d / "folder"),
            r"folder row 1: missing field 'completion' \(has \['prompt'\]\)",
        ),
        (
            lambda d: (d / "blank.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n\n{"prompt": "c"}\n'),
            r"blank\.jsonl:4: missing field 'completion'",  # the line, blank lines counted
        ),
        (lambda d: (d / "notes.txt").write_text("x"), r"notes\.txt: unsupported data format '\.txt'"),
        (lambda d: None, r"nothing-\*\.jsonl: no such data file"),
    ],
    ids=["parquet-row", "folder-row", "jsonl-line-after-blanks", "unsupported", "glob-matches-nothing"],
)
def test_bad_rows_in_any_format_name_the_file_row_and_field(tmp_path, make, message):
    make(tmp_path)
    target = next((p for p in tmp_path.iterdir()), tmp_path / "nothing-*.jsonl")
    with pytest.raises(DataError, match=message):
        read_examples(target)
