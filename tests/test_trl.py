"""A `PrefixModel` trains inside TRL's `SFTTrainer` (TRL 1.14) like `prefixtune train` does on the same
data and seed (the same loss curve), and saves a prefix that prefixtune loads."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.cli import app
from prefixtune.data import read_examples
from tiny import tiny_workspace

trl = pytest.importorskip("trl")
STEPS, BATCH, LR, SEED = 6, 4, 3e-2, 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tiny_workspace(tmp_path_factory.mktemp("trl"), {"train": 24}, words=(1, 4))


def sft_prefix(workspace: Path, output: Path) -> tuple[PrefixModel, list[float]]:
    """TRL's SFTTrainer on the prefixtune-formatted rows (template ``{prompt}\\n``), as examples/trl_sft.py does."""
    torch.manual_seed(SEED)  # as `prefixtune train` seeds before it loads the base and adds the prefix
    base, tokenizer = load_base_model(str(workspace / "tiny"))
    model = PrefixModel(base, PrefixConfig(prefix_length=4), tokenizer=tokenizer)
    examples = read_examples(workspace / "train.jsonl")
    rows = datasets.Dataset.from_list([{"prompt": e.prompt + "\n", "completion": e.completion} for e in examples])
    args = trl.SFTConfig(
        output_dir=str(output),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        warmup_steps=1,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        seed=SEED,
        data_seed=SEED,
        bf16=False,  # TRL's defaults: bf16 autocast and gradient checkpointing; prefixtune's: neither
        gradient_checkpointing=False,
        loss_type="nll",
        save_strategy="no",  # Trainer would save the whole frozen base; the prefix is saved below
        report_to="none",
        use_cpu=True,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_sft_trainer_trains_a_prefix_like_prefixtune_train_and_saves_one_prefixtune_loads(workspace, tmp_path):
    args = ["train", "--model", str(workspace / "tiny"), "--data", str(workspace / "train.jsonl")]
    args += ["--output", str(tmp_path / "cli"), "--prefix-length", "4", "--steps", str(STEPS)]
    args += ["--batch-size", str(BATCH), "--lr", str(LR), "--warmup-steps", "1", "--logging-steps", "1"]
    result = CliRunner().invoke(app, [*args, "--seed", str(SEED)])
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "cli" / "log_history.json").read_text())
    cli_losses = [entry["loss"] for entry in history if "loss" in entry]

    model, sft_losses = sft_prefix(workspace, tmp_path / "sft")
    assert len(sft_losses) == len(cli_losses) == STEPS
    torch.testing.assert_close(torch.tensor(sft_losses), torch.tensor(cli_losses), rtol=1e-3, atol=1e-3)

    model.save_prefix(tmp_path / "sft-prefix", "default")
    base, tokenizer = load_base_model(str(workspace / "tiny"))
    loaded = PrefixModel.from_pretrained(base, tmp_path / "sft-prefix", tokenizer=tokenizer)
    cli_prefix = load_file(tmp_path / "cli" / "prefix" / "prefix.safetensors")
    sft_prefix_file = load_file(tmp_path / "sft-prefix" / "prefix.safetensors")
    assert loaded.prefix_names == ["default"]
    torch.manual_seed(SEED)
    untrained = PrefixModel(load_base_model(str(workspace / "tiny"))[0], PrefixConfig(prefix_length=4))
    untrained.save_prefix(tmp_path / "untrained", "default")
    initial = load_file(tmp_path / "untrained" / "prefix.safetensors")
    for key in cli_prefix:
        assert (sft_prefix_file[key] - initial[key]).abs().max() > 1e-2  # training moved it
        torch.testing.assert_close(sft_prefix_file[key], cli_prefix[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_trl_example_trains_and_saves_a_prefix_prefixtune_loads(workspace, tmp_path):
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "examples" / "trl_sft.py"
    command = [
        sys.executable,
        str(example),
        "--data",
        str(workspace / "train.jsonl"),
        "--model",
        str(workspace / "tiny"),
    ]
    result = subprocess.run([*command, "--steps", "2", "--output", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {tmp_path / 'prefix'}" in result.stdout
    base, tokenizer = load_base_model(str(workspace / "tiny"))
    assert PrefixModel.from_pretrained(base, tmp_path / "prefix", tokenizer=tokenizer).prefix_names == ["default"]
    saved = json.loads((tmp_path / "prefix" / "prefix_config.json").read_text())
    assert saved["prompt_format"] == {"template": "{prompt}\n", "chat_template": False}
