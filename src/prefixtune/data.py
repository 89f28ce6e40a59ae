"""Data: prompt/completion examples and conversations from any data `datasets` loads (`sources.py`),
prompt formatting, tokenization with the loss only on the completion (+ EOS) or on a conversation's
assistant turns (`conversations.py`), padding, and grouping references for evaluation.

Rows:
* prompt/completion: two string fields (``prompt`` / ``completion``; E2E's ``mr`` / ``ref`` for CSV),
  renamed with ``--prompt-field`` / ``--completion-field``;
* conversations: a ``messages`` field (``--messages-field``), a list of ``{"role", "content"}`` turns
  (system, user, assistant) as TRL's `SFTTrainer` takes; its last assistant turn is the reference
  for evaluation, the turns before it the prompt.
Every bad row is reported with file, line (or row) and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError
from .names import RULE, is_prefix_name
from .sources import DataError, Source, jsonl_records, load_source

__all__ = ["DataError", "jsonl_records"]  # re-exported: where the rest of prefixtune has always found them

DEFAULT_TEMPLATE = "{prompt}\n"
FIELDS_BY_SUFFIX = {".csv": ("mr", "ref")}  # every other format: prompt / completion
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    prompt: str  # a conversation's: its turns before the last assistant turn, as JSON
    completion: str  # a conversation's: its last assistant turn
    where: str  # "file:line" or "file row N", for error messages
    task: str | None = None  # multi-task training: the name of the prefix this row trains
    messages: tuple[dict[str, str], ...] | None = None  # a conversation: all its turns

    @property
    def model_input(self) -> str | list[dict[str, str]]:
        """What generation continues: the prompt text, or the turns before the last assistant turn."""
        return json.loads(self.prompt) if self.messages is not None else self.prompt


@dataclass(frozen=True)
class ReferenceGroup:
    """One distinct (task, prompt) and every reference completion given for it."""

    prompt: str
    references: list[str]
    task: str | None = None
    conversation: bool = False  # the prompt is a conversation's turns as JSON

    @property
    def model_input(self) -> str | list[dict[str, str]]:
        return json.loads(self.prompt) if self.conversation else self.prompt


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what (``messages`` set: conversations; else prompt and completion)."""

    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    task: str | None = None


def resolve_fields(
    source: Source,
    prompt: str | None = None,
    completion: str | None = None,
    messages: str | None = None,
    task: str | None = None,
) -> Fields:
    """The fields to read: those given; else a ``messages`` column when there is one and no ``prompt``;
    else prompt/completion (``mr``/``ref`` in CSV files)."""
    columns = source.dataset.column_names
    if messages or (not prompt and not completion and "messages" in columns and "prompt" not in columns):
        if prompt or completion:
            raise ConfigError("--messages-field: conversations have no prompt/completion fields; give one or the other")
        return Fields(messages=messages or "messages", task=task)
    suffix = Path(source.files[0]).suffix.lower()
    default_prompt, default_completion = FIELDS_BY_SUFFIX.get(suffix, ("prompt", "completion"))
    return Fields(prompt or default_prompt, completion or default_completion, None, task)


def _missing(record: dict[str, Any], name: str, where: str) -> DataError:
    present = sorted(key for key, value in record.items() if value is not None)  # Arrow gives absent fields None
    return DataError(f"{where}: missing field {name!r} (has {present})")


def _field(record: dict[str, Any], name: str, where: str) -> str:
    if record.get(name) is None:
        raise _missing(record, name, where)
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _messages(record: dict[str, Any], name: str, where: str) -> list[dict[str, str]]:
    """A conversation's turns, checked: roles known, contents non-empty, at least one assistant turn."""
    turns = record.get(name)
    if turns is None:
        raise _missing(record, name, where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of turns, got {turns!r}")
    checked = []
    for index, turn in enumerate(turns):
        at = f"{where}: field {name!r} turn {index}"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f"{at}: expected {{'role': one of {list(ROLES)}, 'content': text}}, got {turn!r}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{at}: empty {turn['role']} turn (content {content!r})")
        checked.append({"role": turn["role"], "content": content})
    if not any(turn["role"] == "assistant" for turn in checked):
        raise DataError(f"{where}: field {name!r} has no assistant turn to learn or score")
    return checked


def example_from_record(record: dict[str, Any], fields: Fields, where: str) -> Example:
    """One row as an `Example`; a `DataError` names the row and field of anything wrong."""
    task = _task(record, fields.task, where) if fields.task else None
    if fields.messages is None:
        return Example(_field(record, fields.prompt, where), _field(record, fields.completion, where), where, task)
    turns = _messages(record, fields.messages, where)
    last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    context = json.dumps(turns[:last], ensure_ascii=False)
    return Example(context, turns[last]["content"].strip(), where, task, tuple(turns))


@contextmanager
def located(source: Source, index: int) -> Iterator[str]:
    """A stand-in location for row `index` (``row N``) whose `DataError`s are re-raised naming the real
    file and line: finding a line in a text file means reading up to it, done only for a bad row."""
    stand_in = f"row {index + 1}"
    try:
        yield stand_in
    except DataError as error:
        raise type(error)(str(error).replace(stand_in, source.where(index), 1)) from error


def read_source(
    path: str | Path,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    task_field: str | None = None,
    split: str | None = None,
    messages_field: str | None = None,
) -> tuple[Source, Fields]:
    """The data `path` names (memory-mapped) and the fields its rows are read from."""
    source = load_source(path, split)
    if len(source.dataset) == 0:
        raise DataError(f"{path}: no examples (empty file?)")
    return source, resolve_fields(source, prompt_field, completion_field, messages_field, task_field)


def read_examples(
    path: str | Path,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    task_field: str | None = None,
    split: str | None = None,
    messages_field: str | None = None,
) -> list[Example]:
    """Every row of `path` as an `Example`, in memory (evaluation, scoring); with `task_field`, each row
    also names the prefix it trains. Training reads rows memory-mapped instead (`training.py`)."""
    source, fields = read_source(path, prompt_field, completion_field, task_field, split, messages_field)
    examples = []
    for index, record in enumerate(source.dataset):
        with located(source, index) as where:
            examples.append(example_from_record(record, fields, where))
    return examples


def _task(record: dict[str, Any], name: str, where: str) -> str:
    task = _field(record, name, where)
    if not is_prefix_name(task):
        raise DataError(f"{where}: field {name!r} must be a prefix name ({RULE}), got {task!r}")
    return task


def group_references(examples: list[Example]) -> list[ReferenceGroup]:
    """One group per distinct (task, prompt) with all its completions, in order of first appearance."""
    groups: dict[tuple[str | None, str, bool], list[str]] = {}
    for example in examples:
        key = (example.task, example.prompt, example.messages is not None)
        groups.setdefault(key, []).append(example.completion)
    return [ReferenceGroup(prompt, refs, task, conversation) for (task, prompt, conversation), refs in groups.items()]


@dataclass
class PromptFormatter:
    """Turns a raw prompt into model input text: a template, or the tokenizer's chat template.

    Decoder-only models read prompt + completion as one sequence (left-padded, loss on the
    completion); encoder-decoders read the prompt in the encoder (with the tokenizer's special
    tokens) and predict the completion (right-padded)."""

    tokenizer: Any
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = False
    encoder_decoder: bool = False

    @property
    def padding_side(self) -> str:
        return padding_side(self.encoder_decoder)

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise ConfigError(f"prompt template {self.template!r} must contain '{{prompt}}'")
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("--chat-template: this tokenizer has no chat template")

    @property
    def saved(self) -> dict[str, Any]:
        """The form saved with a prefix (``prompt_format`` in prefix_config.json)."""
        return {"template": self.template, "chat_template": self.chat_template}

    @classmethod
    def from_saved(
        cls,
        tokenizer: Any,
        saved: dict[str, Any] | None,
        encoder_decoder: bool = False,
        template: str | None = None,
        chat_template: bool | None = None,
    ) -> PromptFormatter:
        """The formatter a prefix was trained with (`saved`: its ``prompt_format``, or None for the
        defaults); `template` / `chat_template` override it when given."""
        saved = saved if isinstance(saved, dict) else {}
        return cls(
            tokenizer,
            template or saved.get("template", DEFAULT_TEMPLATE),
            bool(saved.get("chat_template", False)) if chat_template is None else chat_template,
            encoder_decoder,
        )

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """The ids generation continues from: a prompt text, or a conversation's turns."""
        return self.messages_ids(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])

    def turns(self, messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> list[dict[str, str]]:
        """The turns as the model reads them: user turns through the template (stripped, with the chat
        template); training on conversations renders these too, so prompts match what was trained."""
        turns = [
            {**m, "content": self.template.replace("{prompt}", m["content"])} if m["role"] == "user" else m
            for m in messages
        ]
        return [{**m, "content": m["content"].strip()} for m in turns] if self.chat_template else turns

    def messages_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's ids: each user turn goes through the template; with the chat template the
        turns keep their roles, without it the turns' texts are joined by newlines. One user message
        gives exactly `prompt_ids` of its text."""
        turns = self.turns(messages)
        if self.chat_template:
            return list(
                self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
        text = "\n".join(m["content"] for m in turns)
        return self.tokenizer(text, add_special_tokens=self.encoder_decoder)["input_ids"]

    def training_features(
        self, example: Example, max_length: int, messages_field: str = "messages"
    ) -> dict[str, list[int]]:
        """input_ids = prompt + completion + EOS; labels mask the prompt with -100. A conversation:
        its chat-template rendering, labels on the assistant turns only (`conversations.py`)."""
        if example.messages is not None:
            from .conversations import conversation_features

            return conversation_features(self, example, max_length, messages_field)
        prompt = self.prompt_ids(example.prompt)
        completion = self.tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        completion = completion + [self.tokenizer.eos_token_id]
        if self.encoder_decoder:
            return {"input_ids": prompt[:max_length], "labels": completion[:max_length]}
        ids = (prompt + completion)[:max_length]
        labels = ([-100] * len(prompt) + completion)[:max_length]
        if all(label == -100 for label in labels):
            raise DataError(f"{example.where}: prompt alone fills max_length={max_length}; nothing left to learn")
        return {"input_ids": ids, "labels": labels}


def _pad(values: list[int], width: int, fill: int, side: str) -> list[int]:
    padding = [fill] * (width - len(values))
    return padding + values if side == "left" else values + padding


def padding_side(encoder_decoder: bool) -> str:
    """Where pads go: decoder-only rows are left-padded, so generation continues right after each
    row's last real token; encoder-decoders right-pad (the encoder reads the prompt, the decoder starts fresh)."""
    return "right" if encoder_decoder else "left"


def pad_batch(rows: list[dict[str, list[int]]], pad_token_id: int, side: str = "left") -> dict[str, Tensor]:
    """Pad input_ids (pad id), labels (-100, to their own width: a seq2seq target differs in length)
    and build attention_mask. Left padding suits decoder-only generation."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": [_pad(row["input_ids"], width, pad_token_id, side) for row in rows],
        "attention_mask": [_pad([1] * len(row["input_ids"]), width, 0, side) for row in rows],
    }
    if "labels" in rows[0]:
        label_width = max(len(row["labels"]) for row in rows)
        batch["labels"] = [_pad(row["labels"], label_width, -100, side) for row in rows]
    return {key: torch.tensor(value) for key, value in batch.items()}


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of a padded batch's token slots that are padding, over the batches `order` makes."""
    batches = [[lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    slots = sum(max(batch) * len(batch) for batch in batches)
    return 1.0 - sum(lengths) / slots


def padding_fractions(lengths: list[int], batch_size: int, seed: int = 0, group_size: int | None = None) -> dict:
    """One epoch's padding fraction with random batches (`Trainer`'s default) and with length-grouped
    ones (its ``group_by_length`` sampler, which sorts within shuffled mega-batches of `group_size`).
    Both orders hold every row once: grouping changes which rows share a batch, nothing else."""
    from .transformers_private import length_grouped_indices

    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped_order = length_grouped_indices(
        lengths, group_size or batch_size, generator=torch.Generator().manual_seed(seed)
    )
    return {
        "random": padding_fraction(lengths, random_order, batch_size),
        "grouped": padding_fraction(lengths, grouped_order, batch_size),
    }
