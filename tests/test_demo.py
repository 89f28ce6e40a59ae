"""`prefixtune demo` (the README's first command) runs end to end: data, training, bare vs prefixed
comparison, files. On a tiny model saved to disk, so it runs where SmolLM2 is not installed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefixtune import PrefixModel
from prefixtune.cli import app
from prefixtune.data import PromptFormatter, group_references, read_examples
from prefixtune.evaluation import generate_completions, score
from tiny import tiny_model, tiny_tokenizer


@pytest.mark.slow
def test_demo_trains_compares_and_writes_its_prefix_and_results(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    output = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--model", str(tmp_path / "tiny"), "--steps", "3", "--output", str(output), "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    assert "bare" in result.output and "with prefix" in result.output
    assert (output / "run" / "prefix" / "prefix.safetensors").is_file()
    summary = json.loads((output / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["trainable_parameters"] > 0
    # the comparison is what the bare model and the trained prefix generate, and their scores
    result = json.loads((output / "demo_result.json").read_text())
    prefixed = PrefixModel.from_pretrained(model, output / "run" / "prefix", tokenizer=tokenizer)
    groups = group_references(read_examples(output / "data" / "validation.jsonl"))
    prompts, references = [g.prompt for g in groups], [g.references for g in groups]
    assert [e["prompt"] for e in result["examples"]] == prompts
    for label, prefix in (("bare", ""), ("prefixed", None)):
        texts = generate_completions(prefixed, PromptFormatter(tokenizer), prompts, prefix=prefix, max_new_tokens=40)
        assert [e[label] for e in result["examples"]] == texts, label
        assert result["metrics"][label] == score(texts, references, ("bleu", "rouge"))
