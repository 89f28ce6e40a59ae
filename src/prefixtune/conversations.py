"""Conversations: a ``messages`` row rendered with the tokenizer's chat template, the loss on every
assistant turn only (TRL's ``assistant_only_loss``). System and user turns stay in the input.

Which tokens are an assistant's: a template with generation markers (``{% generation %}``) says so
itself (`apply_chat_template`'s assistant mask). A template without them is split exactly at the
token level instead: for each assistant turn k, the rendering of the turns before it plus the
generation prompt, and the rendering through turn k, must both be token prefixes of the whole
conversation's rendering; the tokens between the two are turn k's (its text and the template's
end-of-turn). A template that renders earlier turns differently once later ones follow (e.g. one that
drops past reasoning) cannot be split so, and is refused rather than guessed at.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ConfigError
from .sources import DataError

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TooLongError(DataError):
    """A conversation has more tokens than ``--max-length`` (``--drop-long`` drops such rows)."""


def _render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        turns, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])


def marked_labels(tokenizer: Any, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) from the template's own generation markers."""
    rendered = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(rendered["input_ids"])
    return ids, [token if mask else -100 for token, mask in zip(ids, rendered["assistant_masks"], strict=True)]


def split_labels(tokenizer: Any, turns: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """(ids, labels) by rendering the conversation turn by turn and checking the token boundaries."""
    ids = _render(tokenizer, turns)
    labels = [-100] * len(ids)
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        if k == 0:
            raise DataError(f"{where}: turn 0 is an assistant turn; a conversation needs a turn before it")
        before, through = _render(tokenizer, turns[:k], generation_prompt=True), _render(tokenizer, turns[: k + 1])
        start, end = len(before), len(through)
        if ids[:start] != before or ids[:end] != through or start >= end:
            raise ConfigError(
                f"{where}: the chat template renders turn {k}'s context differently once later turns follow, so "
                "its assistant tokens cannot be told apart exactly; use a template with {% generation %} markers"
            )
        labels[start:end] = ids[start:end]
    return ids, labels


def conversation_features(
    formatter: Any, example: Any, max_length: int, field: str = "messages"
) -> dict[str, list[int]]:
    """input_ids: the chat template's rendering of every turn; labels: the assistant tokens, -100 elsewhere.
    Longer than `max_length` is a `TooLongError` (a conversation is never cut)."""
    tokenizer = formatter.tokenizer
    if formatter.encoder_decoder:
        raise ConfigError("conversations (a messages field) train decoder-only models; this one is encoder-decoder")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("conversations (a messages field) need a tokenizer with a chat template; this one has none")
    turns = formatter.turns(list(example.messages))
    template = tokenizer.chat_template
    marked = isinstance(template, str) and GENERATION_MARKER.search(template)
    ids, labels = marked_labels(tokenizer, turns) if marked else split_labels(tokenizer, turns, example.where)
    if len(ids) > max_length:
        raise TooLongError(
            f"{example.where}: field {field!r}: the conversation is {len(ids)} tokens, longer than "
            f"--max-length {max_length}; raise --max-length, or pass --drop-long to leave such rows out"
        )
    if all(label == -100 for label in labels):
        raise DataError(f"{example.where}: field {field!r}: the chat template leaves no assistant token to learn")
    return {"input_ids": ids, "labels": labels}
