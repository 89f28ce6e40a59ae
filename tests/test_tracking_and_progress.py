"""``--report-to`` reaches `Trainer` (TensorBoard's event file holds the logged losses), and training
shows one rich progress bar with loss, lr and tokens/s instead of Trainer's printed log dicts."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.progress import RichProgress
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    rows = [{"prompt": f"food {w}", "completion": f"the {w} food is good"} for w in ("cheap", "french", "italian")]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    return root


def train(workspace: Path, output: Path, *extra: str):
    args = ["train", "--model", str(workspace / "tiny"), "--data", str(workspace / "train.jsonl")]
    args += ["--output", str(output), "--prefix-length", "4", "--steps", "4", "--batch-size", "4"]
    return CliRunner().invoke(app, [*args, "--warmup-steps", "1", "--logging-steps", "1", *extra])


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_logged_training_losses(workspace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(workspace, tmp_path / "run", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    (events,) = (tmp_path / "run" / "runs").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    logged = [
        entry["loss"] for entry in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in entry
    ]
    scalars = accumulator.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4]
    assert [s.value for s in scalars] == pytest.approx(logged, rel=1e-6)


def test_without_report_to_nothing_is_written_for_trackers(workspace, tmp_path):
    result = train(workspace, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "runs").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbored", r"--report-to 'tensorbored': expected none, all or some of"),
        ("clearml", r"\['clearml'\] not installed"),
    ],
)
def test_unknown_or_missing_trackers_are_refused_before_training(workspace, tmp_path, value, message):
    result = train(workspace, tmp_path / "run", "--report-to", value)
    assert result.exit_code == 2 and re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_shows_one_progress_bar_with_loss_lr_and_tokens_per_second_and_no_log_dicts(workspace, tmp_path):
    result = train(workspace, tmp_path / "run")
    assert result.exit_code == 0, result.output
    bar = re.findall(r"training ━+ 4/4 [^\n]*", result.output)
    assert len(bar) == 1, result.output  # drawn once (not a terminal here): its final state
    assert re.search(r"loss \d+\.\d{4}\s+lr \d\.\de[-+]\d\d\s+[\d,]+ tokens/s", bar[0]), bar[0]
    assert "{'loss'" not in result.output and "'learning_rate'" not in result.output  # Trainer's raw dicts
    assert "it/s]" not in result.output.split("training ━", 1)[1]  # nor its tqdm bar (loading the model has one)


def test_the_progress_callback_shows_logged_loss_and_prints_validation_lines():
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    callback = RichProgress(console)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 3, 120
    callback.on_log(None, state, None, logs={"loss": 1.25, "learning_rate": 0.004, "grad_norm": 0.5})
    callback.on_log(None, state, None, logs={"eval_loss": 0.75, "eval_runtime": 0.1, "eval_samples_per_second": 9.0})
    assert callback.line(state).startswith("loss 1.2500  lr 4.0e-03  ")
    callback.on_train_end(None, state, None)
    shown = console.file.getvalue()
    assert "step 3: validation loss 0.75  runtime 0.1" in shown and "samples_per_second" not in shown
    assert "loss 1.2500" in shown and "tokens/s" in shown
