"""Conversations (a ``messages`` column): rendered with the chat template, the loss on every assistant
turn and nothing else (checked token by token on SmolLM2's real template), generation markers and the
exact split agreeing, templates that cannot be split refused, bad rows named, eval on the last turn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from prefixtune.cli import app
from prefixtune.config import ConfigError
from prefixtune.data import Example, PromptFormatter, read_examples
from tiny import tiny_model, tiny_tokenizer

CONVERSATION = (
    {"role": "system", "content": "You describe restaurants in one sentence."},
    {"role": "user", "content": "name Aromi, food Italian"},
    {"role": "assistant", "content": "Aromi serves Italian food."},
    {"role": "user", "content": "And its area?"},
    {"role": "assistant", "content": "It is in the city centre, near the river."},
)
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from prefixtune.loading import ModelLoadError, smollm2_folder

    try:
        return AutoTokenizer.from_pretrained(str(smollm2_folder()))
    except ModelLoadError as error:
        pytest.skip(f"SmolLM2 not available: {error}")


def features(tokenizer, turns=CONVERSATION, max_length: int = 512) -> dict[str, list[int]]:
    example = Example("", "", "data.jsonl:1", messages=tuple(turns))
    return PromptFormatter(tokenizer, chat_template=True).training_features(example, max_length)


def test_labels_are_exactly_the_assistant_tokens_of_smollm2s_template(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    row = features(tokenizer)
    text = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == encoded["input_ids"]  # the input is the template's rendering, system turn included
    assert "You describe restaurants" in tokenizer.decode(row["input_ids"])
    # Where each assistant turn's text and end-of-turn lie in the rendered text, found independently
    spans, cursor = [], 0
    for turn in CONVERSATION:
        if turn["role"] == "assistant":
            opener = "<|im_start|>assistant\n"
            start = text.index(opener + turn["content"], cursor) + len(opener)
            cursor = text.index("<|im_end|>\n", start) + len("<|im_end|>\n")
            spans.append((start, cursor))
    for token, label, (begin, end) in zip(row["input_ids"], row["labels"], encoded["offset_mapping"], strict=True):
        inside = any(start <= begin and end <= stop for start, stop in spans)
        assert label == (token if inside else -100), (tokenizer.decode([token]), begin, end)
    learned = tokenizer.decode([label for label in row["labels"] if label != -100])
    assert learned == "".join(f"{t['content']}<|im_end|>\n" for t in CONVERSATION if t["role"] == "assistant")


def test_generation_markers_give_the_same_labels_as_the_exact_split(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    split = features(tokenizer)
    original = tokenizer.chat_template
    marked = original.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}",
    )
    assert marked != original and "{% generation %}" in marked
    tokenizer.chat_template = marked
    try:
        assert features(tokenizer) == split
    finally:
        tokenizer.chat_template = original


def test_a_template_that_renders_past_turns_differently_is_refused(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    original = tokenizer.chat_template
    # drops every assistant answer but the last one, as reasoning templates drop past thoughts
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n"
        "...<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    try:
        with pytest.raises(ConfigError, match=r"data\.jsonl:1: the chat template renders turn 2's context differently"):
            features(tokenizer)
    finally:
        tokenizer.chat_template = original


def test_evaluation_takes_the_last_assistant_turn_as_reference_and_the_turns_before_as_prompt(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": list(CONVERSATION)}) + "\n")
    (example,) = read_examples(data)  # a messages column and no prompt column: conversations
    assert example.completion == CONVERSATION[-1]["content"]
    assert example.model_input == list(CONVERSATION[:-1])
    assert example.messages == CONVERSATION


@pytest.fixture(scope="module")
def chat_workspace(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a chat template, and a small multi-turn dataset."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TINY_TEMPLATE
    tiny_model("llama").save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    foods = "french italian chinese english indian".split()
    rows = []
    for i in range(16):
        food = foods[i % len(foods)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "the restaurant"},
                    {"role": "user", "content": f"food {food}"},
                    {"role": "assistant", "content": f"it serves {food} food"},
                    {"role": "user", "content": "price range"},
                    {"role": "assistant", "content": "it is cheap"},
                ]
            }
        )
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def run_train(workspace: Path, output: Path, data: Path, *extra: str):
    args = ["train", "--model", str(workspace / "tiny"), "--data", str(data), "--output", str(output)]
    args += ["--prefix-length", "4", "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", *extra]
    return CliRunner().invoke(app, args)


def test_conversations_train_then_evaluate_on_their_last_answer(chat_workspace, tmp_path):
    result = run_train(chat_workspace, tmp_path / "run", chat_workspace / "chat.jsonl", "--max-length", "64")
    assert result.exit_code == 0, result.output
    assert load_file(tmp_path / "run" / "prefix" / "prefix.safetensors")
    saved = json.loads((tmp_path / "run" / "prefix" / "prefix_config.json").read_text())
    assert saved["prompt_format"]["chat_template"] is True  # eval and serving format prompts the same way
    args = ["eval", "--model", str(chat_workspace / "tiny"), "--prefix", str(tmp_path / "run" / "prefix")]
    args += ["--data", str(chat_workspace / "chat.jsonl"), "--max-new-tokens", "3", "--output", str(tmp_path / "ev")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    generations = [json.loads(line) for line in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 5  # one per distinct conversation (five foods)
    assert all(set(g["references"]) == {"it is cheap"} for g in generations)  # the last answer, not the first
    assert sum(len(g["references"]) for g in generations) == 16
    assert json.loads(generations[0]["prompt"])[-1] == {"role": "user", "content": "price range"}
    args = ["generate", "--model", str(chat_workspace / "tiny"), "--data", str(chat_workspace / "chat.jsonl")]
    result = CliRunner().invoke(app, [*args, "--limit", "2", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "user: price range" in result.output


@pytest.mark.parametrize(
    ("row", "flags", "message"),
    [
        (
            {"talk": [{"role": "user", "content": "a"}]},
            ("--messages-field", "messages"),
            r"bad\.jsonl:2: missing field 'messages'",
        ),
        (
            {"messages": [{"role": "user", "content": "food"}, {"role": "assistant", "content": " "}]},
            (),
            r"bad\.jsonl:2: field 'messages' turn 1: empty assistant turn",
        ),
        (
            {"messages": [{"role": "user", "content": "food " * 40}, {"role": "assistant", "content": "ok"}]},
            ("--max-length", "32"),
            r"bad\.jsonl:2: field 'messages': the conversation is \d+ tokens, longer than --max-length 32",
        ),
    ],
    ids=["missing-column", "empty-assistant-turn", "too-long"],
)
def test_bad_conversations_are_refused_naming_row_and_field(chat_workspace, tmp_path, row, flags, message):
    good = {"messages": [{"role": "user", "content": "food"}, {"role": "assistant", "content": "it is cheap"}]}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    result = run_train(chat_workspace, tmp_path / "run", data, *flags)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output  # one line, no traceback (a length needs the tokenizer: after the model loads)
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "run").exists()


def test_drop_long_leaves_out_long_conversations_and_counts_them(chat_workspace, tmp_path):
    long = {"messages": [{"role": "user", "content": "food " * 40}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "long.jsonl"
    lines = (chat_workspace / "chat.jsonl").read_text().splitlines()
    data.write_text("\n".join([*lines[:6], json.dumps(long), json.dumps(long), *lines[6:]]) + "\n")
    result = run_train(chat_workspace, tmp_path / "run", data, "--max-length", "32", "--drop-long")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["dropped_long_rows"] == {"train": 2, "validation": 0}
    assert "dropped 2 train rows longer than --max-length" in " ".join(result.output.split())
