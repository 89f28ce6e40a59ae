"""``--packing``: packed and unpacked rows give the same per-example losses (the prefix seen by every
packed sequence, positions restarting after it, no sequence seeing another), training packed follows
the unpacked run, and a model that would mix packed sequences is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.cli import app
from prefixtune.config import ConfigError
from prefixtune.data import Example, PromptFormatter
from prefixtune.packing import PackedCollator, check_packing, packed_example_losses, padded_example_losses
from tiny import tiny_model, tiny_tokenizer, tiny_workspace

PAIRS = [("cheap food", "the food is good"), ("near the river city", "a pub"), ("coffee", "it is a coffee shop near")]


def rows_for(tokenizer) -> list[dict[str, list[int]]]:
    formatter = PromptFormatter(tokenizer)
    return [formatter.training_features(Example(p, c, "x"), 64) for p, c in PAIRS]


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("parameterization", ["kv", "mlp"])
def test_packed_and_unpacked_rows_give_the_same_per_example_losses(architecture, parameterization):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = PrefixModel(tiny_model(architecture), name=None, tokenizer=tokenizer).eval()
    model.add_prefix("p", PrefixConfig(prefix_length=5, parameterization=parameterization, init_std=0.5))
    rows = rows_for(tokenizer)
    packed = packed_example_losses(model, rows, "p")
    unpacked = padded_example_losses(model, rows, "p", tokenizer.pad_token_id)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(unpacked), rtol=1e-5, atol=1e-5)
    with model.disable_prefix():  # the prefix matters here: without it every loss changes
        without = padded_example_losses(model, rows, None, tokenizer.pad_token_id)
    assert all(abs(a - b) > 1e-3 for a, b in zip(without, unpacked, strict=True))


def test_a_packed_row_restarts_positions_for_each_sequence_and_has_no_padding():
    rows = rows_for(tiny_tokenizer())
    batch = PackedCollator()(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["use_cache"] is False


def test_a_model_that_mixes_packed_sequences_is_refused(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tokenizer)
    model.add_prefix("p", PrefixConfig(prefix_length=3, init_std=0.5))
    # without use_cache=False transformers builds a cache and does not take the packed path
    monkeypatch.setattr(PackedCollator, "__call__", lambda self, rows: dict(self.flatten(rows)))
    with pytest.raises(ConfigError, match=r"--packing: LlamaForCausalLM mixes packed sequences \(row 1"):
        check_packing(model, rows_for(tokenizer), "p", tokenizer.pad_token_id)


def test_a_bfloat16_base_packs_within_its_rounding_and_mixing_is_still_refused(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = PrefixModel(tiny_model("llama").to(torch.bfloat16), name=None, tokenizer=tokenizer)
    model.add_prefix("p", PrefixConfig(prefix_length=3, init_std=0.5))
    check_packing(model, rows_for(tokenizer), "p", tokenizer.pad_token_id)  # bf16 rounding is not mixing
    monkeypatch.setattr(PackedCollator, "__call__", lambda self, rows: dict(self.flatten(rows)))
    with pytest.raises(ConfigError, match="mixes packed sequences"):
        check_packing(model, rows_for(tokenizer), "p", tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tiny_workspace(tmp_path_factory.mktemp("packing"), {"train": 32}, words=(1, 6))


def train(workspace: Path, output: Path, *extra: str):
    args = ["train", "--model", str(workspace / "tiny"), "--data", str(workspace / "train.jsonl")]
    args += ["--output", str(output), "--prefix-length", "4", "--steps", "6", "--batch-size", "8", "--lr", "3e-2"]
    args += ["--dtype", "float32"]  # the curves are compared closely (auto may pick bfloat16)
    return CliRunner().invoke(app, [*args, "--warmup-steps", "1", "--logging-steps", "1", *extra])


@pytest.mark.slow
def test_packed_training_follows_the_unpacked_run(workspace, tmp_path):
    for name, flags in (("padded", ()), ("packed", ("--packing",))):
        result = train(workspace, tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
    curves = {
        name: [e["loss"] for e in json.loads((tmp_path / name / "log_history.json").read_text()) if "loss" in e]
        for name in ("padded", "packed")
    }
    assert len(curves["packed"]) == 6
    torch.testing.assert_close(torch.tensor(curves["packed"]), torch.tensor(curves["padded"]), rtol=1e-4, atol=1e-4)
    padded, packed = (load_file(tmp_path / name / "prefix" / "prefix.safetensors") for name in ("padded", "packed"))
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-5)


def test_packing_with_several_task_prefixes_is_refused(workspace, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({"prompt": "food", "completion": "good", "task": "a"}) + "\n")
    result = CliRunner().invoke(
        app,
        ["train", "--model", str(workspace / "tiny"), "--data", str(data), "--output", str(tmp_path / "run")]
        + ["--packing", "--task-field", "task", "--steps", "1"],
    )
    assert result.exit_code == 2 and "--packing with --task-field" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run").exists()
