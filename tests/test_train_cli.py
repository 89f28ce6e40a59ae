"""`prefixtune train / eval / generate` end to end on a tiny model saved to disk: learning, outputs,
kill -9 + --resume exactness, torchrun equivalence, malformed data refused without damage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefixtune import PrefixModel, load_base_model
from prefixtune.cli import app, console
from prefixtune.data import PromptFormatter
from prefixtune.evaluation import generate_completions
from prefixtune.files import read_meta
from tiny import DATA_WORDS as WORDS
from tiny import tiny_workspace

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer folder and a learnable JSONL dataset (completion copies the prompt)."""
    return tiny_workspace(tmp_path_factory.mktemp("train"), {"train": 64, "validation": 16}, words=(3, 3))


def train_args(workspace: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(workspace / "tiny"),
        "--data",
        str(workspace / "train.jsonl"),
        "--output",
        str(output),
        "--prefix-length",
        "6",
        "--lr",
        "3e-2",
        "--warmup-steps",
        "2",
        "--logging-steps",
        "1",
        "--dtype",  # pinned: auto would pick bfloat16 on bf16-native CPUs, and these tests compare exact numbers
        "float32",
        *extra,
    ]


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def final_prefix(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "prefix" / "prefix.safetensors")


@pytest.mark.slow
def test_short_training_lowers_validation_loss_and_writes_everything(workspace, tmp_path, monkeypatch):
    output = tmp_path / "run"
    result = run_cli(
        "train",
        *train_args(
            workspace,
            output,
            "--validation",
            str(workspace / "validation.jsonl"),
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--eval-every",
            "10",
            "--eval-generate",
            "4",
        ),
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {output / 'prefix'}\n" in result.output  # the path it actually wrote
    history = json.loads((output / "log_history.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 4 and eval_losses[-1] < eval_losses[0] - 0.05
    assert any("eval_bleu" in entry for entry in history)
    for name in (
        "prefix/prefix.safetensors",
        "prefix/prefix_config.json",
        "loss.png",
        "metrics.png",
        "train_summary.json",
    ):
        assert (output / name).is_file(), name
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    # the best checkpoint is kept beside the latest
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["best_eval_loss"] == pytest.approx(min(eval_losses))

    result = run_cli(
        "eval",
        "--model",
        str(workspace / "tiny"),
        "--prefix",
        str(output / "prefix"),
        "--data",
        str(workspace / "validation.jsonl"),
        "--max-new-tokens",
        "6",
        "--num-beams",
        "2",
        "--metrics",
        "bleu,rouge",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "eval-validation" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL"} and metrics["num_beams"] == 2
    generations = (output / "eval-validation" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == metrics["prompts"] == 16
    assert set(json.loads(generations[0])) == {"prompt", "generation", "references"}

    monkeypatch.setattr(console, "width", 400)  # one table row per line
    result = run_cli(
        "generate",
        "--model",
        str(workspace / "tiny"),
        "--prefix",
        f"trained={output / 'prefix'}",
        "--prompt",
        "cheap food",
        "--max-new-tokens",
        "4",
    )
    assert result.exit_code == 0, result.output
    # the table shows what the bare model and the trained prefix generate, in the prefix's prompt format
    base, tokenizer = load_base_model(str(workspace / "tiny"))
    prefixed = PrefixModel(base, name=None, tokenizer=tokenizer)
    prefixed.load_prefix(output / "prefix", name="trained")
    formatter = PromptFormatter.from_saved(tokenizer, read_meta(output / "prefix")["prompt_format"], False)
    bare, trained = generate_completions(prefixed, formatter, ["cheap food"] * 2, ["", "trained"], max_new_tokens=4)
    assert bare != trained
    rows = [re.split("[│┃]", line)[1:-1] for line in result.output.splitlines() if re.search("[│┃]", line)]
    cells = [[cell.strip() for cell in row] for row in rows]
    assert ["prompt", "bare", "trained"] in cells and ["cheap food", bare, trained] in cells, result.output


@pytest.mark.slow
def test_yaml_config_sets_options_and_flags_override(workspace, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {workspace / 'tiny'}\ndata: {workspace / 'train.jsonl'}\nprefix-length: 3\n"
        f"steps: 4\nbatch_size: 4\nparameterization: hidden\n"
    )
    result = run_cli("train", "--config", str(config), "--output", str(tmp_path / "out"), "--steps", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["options"]["prefix"]["parameterization"] == "hidden"
    assert summary["options"]["prefix"]["prefix_length"] == 3
    config.write_text("stepz: 4\n")
    result = run_cli("train", "--config", str(config), "--output", str(tmp_path / "out2"), "--data", "x.jsonl")
    assert result.exit_code != 0 and "unknown option(s) ['stepz']" in result.output


def spawn(workspace: Path, output: Path, *own: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = train_args(workspace, output, "--steps", "24", "--batch-size", "4", "--eval-every", "4", *extra)
    command = [sys.executable, str(HERE / "train_process.py"), *own, "--", *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> dict[str, torch.Tensor]:
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = spawn(workspace, output)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return final_prefix(output)


def assert_same_prefix(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)


def resume(workspace: Path, output: Path) -> None:
    args = train_args(workspace, output, "--steps", "24", "--batch-size", "4", "--eval-every", "4", "--resume")
    resumed = subprocess.run([sys.executable, "-m", "prefixtune", "train", *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow  # subprocesses
def test_kill_9_at_a_random_step_then_resume_matches_uninterrupted(workspace, tmp_path, uninterrupted):
    output = tmp_path / "run"
    process = spawn(workspace, output, "--slow", "0.15")
    deadline = time.time() + 120
    while not (output / "checkpoint-4" / "checkpoint_complete.json").exists():
        assert process.poll() is None and time.time() < deadline, "training did not reach its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "prefix").exists(), "the run finished before it could be killed"

    resume(workspace, output)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["resumed_from"] is not None
    assert_same_prefix(final_prefix(output), uninterrupted)


@pytest.mark.slow  # subprocesses
def test_kill_while_writing_a_checkpoint_never_resumes_from_the_half_checkpoint(workspace, tmp_path, uninterrupted):
    output = tmp_path / "run"
    process = spawn(workspace, output, "--die-while-saving", "12")
    assert process.wait(timeout=300) == -signal.SIGKILL
    half = output / "checkpoint-12"
    assert (half / "prefix.safetensors").exists() and not (half / "checkpoint_complete.json").exists()

    resume(workspace, output)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-8")
    assert_same_prefix(final_prefix(output), uninterrupted)


def torchrun_matches_one_process(workspace: Path, tmp_path: Path, *flags: str) -> None:
    """2 processes x batch 2 train the same prefix as 1 process x batch 4 (atol 1e-5)."""
    common = ["--steps", "6", "--eval-every", "6", *flags]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefixtune",
            "train",
            *train_args(workspace, tmp_path / "one", "--batch-size", "4", *[f for f in common if f != "--fsdp"]),
        ],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    double = torchrun(workspace, tmp_path / "two", "--batch-size", "2", *common)
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["world_size"] == 2
    one, two = final_prefix(tmp_path / "one"), final_prefix(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    assert not torch.equal(one["prefix_key_values"], torch.zeros_like(one["prefix_key_values"]))


def torchrun(workspace: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "prefixtune", "train", *train_args(workspace, output, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.mark.slow  # subprocesses
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(workspace, tmp_path):
    torchrun_matches_one_process(workspace, tmp_path)


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through Accelerate needs 2 GPUs (see the next test)")
def test_two_process_fsdp_matches_one_process(workspace, tmp_path):
    torchrun_matches_one_process(workspace, tmp_path, "--fsdp")


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused_instead_of_silently_running_ddp(workspace, tmp_path):
    result = torchrun(workspace, tmp_path / "run", "--steps", "2", "--fsdp")
    assert result.returncode != 0
    assert "error: --fsdp needs GPUs: Accelerate 1.15 turns FSDP on only for multi-GPU runs" in " ".join(
        result.stdout.split()
    )
    assert not (tmp_path / "run").exists()


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "missing.jsonl",
            '{"prompt": "cheap food", "completion": "ok"}\n{"prompt": "x"}\n',
            r"missing\.jsonl:2: missing field 'completion'",
        ),
        ("empty.jsonl", "", r"empty\.jsonl: no examples"),
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"bad\.jsonl:2: invalid JSON"),
        ("blank.jsonl", '{"prompt": "a", "completion": "  "}\n', r"blank\.jsonl:1: field 'completion' must be"),
        ("bad.csv", 'mr,ref\n"a","b"\n"c","d","e"\n', r"bad\.csv:3: more values than the 2 header columns"),
        ("nocol.csv", "meaning,text\na,b\n", r"nocol\.csv:2: missing field 'mr'"),
        ("quote.csv", 'mr,ref\n"a,b\n', r"quote\.csv:\d+: malformed CSV"),
    ],
)
def test_malformed_data_is_refused_naming_file_line_field_without_touching_output(
    workspace, tmp_path, name, content, message
):
    data = tmp_path / name
    data.write_text(content)
    existing = tmp_path / "existing"
    (existing / "prefix").mkdir(parents=True)
    (existing / "prefix" / "keep.txt").write_text("previous run")
    before = folder_digest(existing)
    for output in (existing, tmp_path / "fresh"):
        args = train_args(workspace, output, "--steps", "2", "--resume")
        args[args.index("--data") + 1] = str(data)
        result = run_cli("train", *args)
        assert result.exit_code == 2
        assert result.output.startswith("error:")
        assert re.search(message, " ".join(result.output.split())), result.output
    assert folder_digest(existing) == before
    assert not (tmp_path / "fresh").exists()


def test_existing_run_is_not_overwritten_without_resume(workspace, tmp_path):
    output = tmp_path / "run"
    assert run_cli("train", *train_args(workspace, output, "--steps", "2", "--batch-size", "4")).exit_code == 0
    before = folder_digest(output)
    result = run_cli("train", *train_args(workspace, output, "--steps", "2", "--batch-size", "4"))
    assert result.exit_code == 2 and "pass --resume" in result.output
    assert folder_digest(output) == before


@pytest.mark.slow
def test_multi_task_training_trains_one_prefix_per_task_in_mixed_batches(workspace, tmp_path):
    rng = random.Random(1)
    rows = []
    for i in range(64):
        prompt = " ".join(rng.sample(WORDS, 3))
        task = "praise" if i % 2 else "complain"
        completion = f"the {prompt} is good" if task == "praise" else f"{prompt} was bad bad"
        rows.append(json.dumps({"prompt": prompt, "completion": completion, "task": task}))
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(rows) + "\n")
    args = train_args(workspace, tmp_path / "run", "--steps", "40", "--batch-size", "8", "--task-field", "task")
    args[args.index("--data") + 1] = str(data)
    result = run_cli("train", *args)
    assert result.exit_code == 0, result.output
    saved = sorted(p.name for p in (tmp_path / "run" / "prefixes").iterdir())
    assert saved == ["complain", "praise"]
    for name in saved:
        assert f"wrote {tmp_path / 'run' / 'prefixes' / name}\n" in result.output

    from prefixtune import PrefixModel, load_base_model
    from prefixtune.data import PromptFormatter, pad_batch, read_examples

    base, tokenizer = load_base_model(str(workspace / "tiny"), dtype="float32")
    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    for name in saved:
        model.load_prefix(tmp_path / "run" / "prefixes" / name)
    formatter = PromptFormatter(tokenizer)
    examples = read_examples(data, task_field="task")

    def loss(task: str, prefix: str) -> float:
        rows = [formatter.training_features(e, 64) for e in examples if e.task == task]
        with torch.no_grad():
            return model(**pad_batch(rows, tokenizer.pad_token_id), prefix=prefix).loss.item()

    # each prefix learned its own task: it fits its task better than the other task's prefix does
    assert loss("praise", "praise") < loss("praise", "complain")
    assert loss("complain", "complain") < loss("complain", "praise")


def test_task_names_are_checked(workspace, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b", "task": "../escape"}) + "\n")
    args = train_args(workspace, tmp_path / "run", "--steps", "2", "--task-field", "task")
    args[args.index("--data") + 1] = str(data)
    result = run_cli("train", *args)
    assert result.exit_code == 2 and "bad.jsonl:1: field 'task' must be a prefix name" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "run").exists()


def eval_losses(workspace: Path, output: Path, *flags: str) -> list[float]:
    validation = ("--validation", str(workspace / "validation.jsonl"), "--eval-every", "5")
    result = run_cli("train", *train_args(workspace, output, "--steps", "30", "--batch-size", "8", *validation, *flags))
    assert result.exit_code == 0, result.output
    return [
        entry["eval_loss"] for entry in json.loads((output / "log_history.json").read_text()) if "eval_loss" in entry
    ]


@pytest.fixture(scope="module")
def float32_eval_losses(workspace, tmp_path_factory) -> list[float]:
    return eval_losses(workspace, tmp_path_factory.mktemp("float32") / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "loss_scaled"),
    [(("--dtype", "bfloat16"), False), (("--bf16",), False), (("--dtype", "float16"), True)],
    ids=["bf16-base", "bf16-autocast", "fp16-base"],
)
def test_low_precision_runs_train_like_float32_with_float32_prefix_parameters_and_files(
    workspace, tmp_path, float32_eval_losses, flags, loss_scaled
):
    output = tmp_path / "run"
    losses = eval_losses(workspace, output, *flags)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.05, losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(float32_eval_losses), atol=0.05, rtol=0)
    for tensors in (final_prefix(output), load_file(output / "checkpoint-30" / "prefix.safetensors")):
        assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    # float16 needs loss scaling (Trainer checkpoints the scaler it used); bfloat16 does not
    assert (output / "checkpoint-30" / "scaler.pt").is_file() == loss_scaled


def test_contradictory_precisions_are_refused_naming_them(workspace, tmp_path):
    result = run_cli("train", *train_args(workspace, tmp_path / "run", "--dtype", "float16", "--bf16"))
    assert result.exit_code == 2 and "--dtype float16 --bf16=True --fp16=False: pick one precision" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_length_grouping_lowers_padding_and_is_what_trainer_samples_with(workspace, tmp_path, monkeypatch):
    from prefixtune import training

    samplers = []
    original = training.PrefixTrainer._get_train_sampler
    monkeypatch.setattr(
        training.PrefixTrainer,
        "_get_train_sampler",
        lambda self, *a: samplers.append(original(self, *a)) or samplers[-1],
    )
    rng = random.Random(2)
    rows = [
        json.dumps({"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 20))), "completion": "the food is good"})
        for _ in range(256)
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n")
    for grouped in (False, True):
        args = train_args(workspace, tmp_path / f"run-{grouped}", "--steps", "4", "--batch-size", "8")
        args[args.index("--data") + 1] = str(data)
        result = run_cli("train", *args, *(["--group-by-length"] if grouped else []))
        assert result.exit_code == 0, result.output
        assert "padding (random / grouped batches)" in result.output
    assert [type(s).__name__ for s in samplers] == ["RandomSampler", "LengthGroupedSampler"]
    padding = json.loads((tmp_path / "run-True" / "train_summary.json").read_text())["padding_fraction"]
    # Trainer's sampler sorts within shuffled mega-batches of 8 batches here (it keeps some randomness)
    assert padding["grouped"] < padding["random"] / 2, padding


def other_value(item) -> Any:
    """A valid value that is not the field's default."""
    choices, default = item.metadata.get("choices"), item.default
    if choices:
        return next(choice for choice in choices if choice != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default / 2 + 0.25
    if isinstance(default, int) or "int" in str(item.type):
        return (default or 2) + 1
    return "{prompt} x"


def captured_options(monkeypatch, *args: str):
    from prefixtune import training

    seen = []
    summary = {"padding_fraction": {"random": 0.0, "grouped": 0.0}}
    monkeypatch.setattr(training, "train", lambda options: seen.append(options) or summary)
    result = run_cli("train", *args)
    assert result.exit_code == 0, result.output
    return seen[0]


def flat_values(options) -> dict[str, Any]:
    """The options' values by flat name, each group unnested."""
    values = {}
    for name, value in dataclasses.asdict(options).items():
        values |= value if isinstance(value, dict) else {name: value}
    return values


def test_every_train_option_is_a_flag_and_a_yaml_key_with_the_dataclass_default(monkeypatch, tmp_path):
    from prefixtune.config import flat_fields
    from prefixtune.training import DataArgs, EvalArgs, LogArgs, TrainArgs, TrainOptions

    fields = flat_fields(TrainOptions)
    assert {"init_std", "dtype", "bf16", "fp16", "device", "group_by_length", "fsdp", "prefix_length"} <= set(fields)
    assert all(item.metadata.get("help") for item in fields.values()), "every option has help"

    defaults = captured_options(monkeypatch, "--data", "d.jsonl", "--output", "out")
    assert defaults == TrainOptions(output="out", dataset=DataArgs(data="d.jsonl"))
    assert defaults == TrainOptions.from_flat(data="d.jsonl", output="out")
    groups = {name: type(getattr(defaults, name)) for name in ("dataset", "train", "eval", "log")}
    assert groups == {"dataset": DataArgs, "train": TrainArgs, "eval": EvalArgs, "log": LogArgs}
    assert defaults.train.steps == 200 and defaults.dataset.max_length == 256 and defaults.log.logging_steps == 5

    wanted = {name: other_value(item) for name, item in fields.items()}
    wanted |= {"bf16": False, "dtype": "float16"}  # --fp16 and bfloat16 contradict; --bf16 is checked below
    wanted |= {"report_to": "tensorboard"}  # an integration installed here
    args = []
    for name, value in wanted.items():
        flags = fields[name].metadata.get("flags") or ()
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            spelled = flags[0].split("/") if flags else [flag, f"--no-{flag[2:]}"]
            args += [spelled[0] if value else spelled[-1]] if value != fields[name].default else []
        else:
            args += [flag, str(value)]
    assert flat_values(captured_options(monkeypatch, *args)) == wanted
    assert captured_options(monkeypatch, "--data", "d", "--output", "o", "--bf16").bf16 is True

    config = tmp_path / "all.yaml"
    config.write_text(yaml.safe_dump(wanted))
    assert flat_values(captured_options(monkeypatch, "--config", str(config))) == wanted


def test_a_bug_keeps_its_traceback_while_bad_input_gets_one_line(monkeypatch, workspace, tmp_path):
    from prefixtune import training

    def broken(options):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(training, "train", broken)
    result = run_cli("train", "--data", "d.jsonl", "--output", str(tmp_path / "out"))
    assert isinstance(result.exception, KeyError) and "error:" not in result.output  # not dressed as bad input
    monkeypatch.undo()
    result = run_cli("train", *train_args(workspace, tmp_path / "out", "--init", "vocab"))
    assert result.exit_code == 2 and "error: PrefixConfig.init='vocab' needs a non-empty init_text" in result.output


def test_options_from_flat_names_fill_groups_and_refuse_unknown_names():
    from prefixtune.config import ConfigError, PrefixConfig
    from prefixtune.training import TrainOptions

    options = TrainOptions.from_flat(data="d.jsonl", output="o", steps=7, eval_every=3, prefix=PrefixConfig(9))
    assert (options.train.steps, options.eval.eval_every, options.prefix.prefix_length) == (7, 3, 9)
    assert options.dataset.data == "d.jsonl" and options.train.batch_size == 8
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['stpes'\]"):
        TrainOptions.from_flat(data="d.jsonl", output="o", stpes=7)
    with pytest.raises(ConfigError, match="missing the required option 'data'"):
        TrainOptions.from_flat(output="o")
