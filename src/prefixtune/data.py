"""Data: prompt/completion examples from JSONL or CSV, prompt formatting, tokenization with the
loss only on the completion (+ EOS), padding, and grouping references for evaluation.

Formats:
* JSONL: one object per line with a prompt and a completion field (``prompt`` / ``completion``).
* CSV: a header row; prompt and completion columns (E2E's ``mr`` / ``ref`` by default).
Every bad row is reported with file, line and field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError
from .names import RULE, is_prefix_name

DEFAULT_TEMPLATE = "{prompt}\n"
FIELDS_BY_SUFFIX = {".jsonl": ("prompt", "completion"), ".csv": ("mr", "ref")}


class DataError(ValueError):
    """A data file is missing, empty or malformed (the message names file, line and field)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    where: str  # "file:line", for error messages
    task: str | None = None  # multi-task training: the name of the prefix this row trains


@dataclass(frozen=True)
class ReferenceGroup:
    """One distinct (task, prompt) and every reference completion given for it."""

    prompt: str
    references: list[str]
    task: str | None = None


def default_fields(path: str | Path) -> tuple[str, str]:
    suffix = Path(path).suffix.lower()
    if suffix not in FIELDS_BY_SUFFIX:
        raise DataError(f"{path}: unsupported data format {suffix!r}; expected .jsonl or .csv")
    return FIELDS_BY_SUFFIX[suffix]


def _field(record: dict[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(record)})")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line as ``("file:line", object)``; anything but a JSON object is a `DataError` naming the line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _csv_records(path: Path):
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)
        try:
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if None in record:
                    raise DataError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
                yield where, record
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({error})") from error


def read_examples(
    path: str | Path,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    task_field: str | None = None,
) -> list[Example]:
    """Examples from JSONL or CSV; with `task_field`, each row also names the prefix it trains."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    default_prompt, default_completion = default_fields(path)
    prompt_field, completion_field = prompt_field or default_prompt, completion_field or default_completion
    records = jsonl_records(path) if path.suffix.lower() == ".jsonl" else _csv_records(path)
    try:
        examples = [
            Example(
                _field(record, prompt_field, where),
                _field(record, completion_field, where),
                where,
                _task(record, task_field, where) if task_field else None,
            )
            for where, record in records
        ]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    if not examples:
        raise DataError(f"{path}: no examples (empty file?)")
    return examples


def _task(record: dict[str, Any], name: str, where: str) -> str:
    task = _field(record, name, where)
    if not is_prefix_name(task):
        raise DataError(f"{where}: field {name!r} must be a prefix name ({RULE}), got {task!r}")
    return task


def group_references(examples: list[Example]) -> list[ReferenceGroup]:
    """One group per distinct (task, prompt) with all its completions, in order of first appearance."""
    groups: dict[tuple[str | None, str], list[str]] = {}
    for example in examples:
        groups.setdefault((example.task, example.prompt), []).append(example.completion)
    return [ReferenceGroup(prompt, references, task) for (task, prompt), references in groups.items()]


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

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.messages_ids([{"role": "user", "content": prompt}])

    def messages_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's ids: each user turn goes through the template; with the chat template the
        turns keep their roles, without it the turns' texts are joined by newlines. One user message
        gives exactly `prompt_ids` of its text."""
        turns = [
            {**m, "content": self.template.replace("{prompt}", m["content"])} if m["role"] == "user" else m
            for m in messages
        ]
        if self.chat_template:
            turns = [{**m, "content": m["content"].strip()} for m in turns]
            return list(
                self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
        text = "\n".join(m["content"] for m in turns)
        return self.tokenizer(text, add_special_tokens=self.encoder_decoder)["input_ids"]

    def training_features(self, example: Example, max_length: int) -> dict[str, list[int]]:
        """input_ids = prompt + completion + EOS; labels mask the prompt with -100."""
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
