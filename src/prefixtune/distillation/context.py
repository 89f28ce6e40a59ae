"""The context to distil, as token ids placed where a user would put it.

Under a chat template the context is the system message; under a plain template it comes before
the prompt. Either way the teacher reads ``context_ids + prompt_ids(prompt)``, where `prompt_ids` is
exactly what the student (and the server) sends for the prompt, so the prefix replaces the
``context_ids`` tokens and nothing else: a prefix of all of them is the teacher (see the tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..data import DataError, PromptFormatter


@dataclass(frozen=True)
class Context:
    """The context's text, where it came from, and its token ids as the teacher reads them."""

    text: str
    source: str
    ids: list[int]  # [C] the system turn (chat template) or the text + blank line (plain template)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def teacher_ids(self, student_ids: list[int]) -> list[int]:
        return self.ids + student_ids


def read_context(path: str | Path) -> str:
    """The context file's text; missing, unreadable or empty files are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such context file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: context is not UTF-8 text ({error})") from error
    if not text.strip():
        raise DataError(f"{path}: context file is empty")
    return text.strip()


def context_ids(formatter: PromptFormatter, text: str) -> list[int]:
    """The tokens the context takes in the teacher's input (see the module docstring)."""
    tokenizer = formatter.tokenizer
    if formatter.chat_template:
        system = [{"role": "system", "content": text}]
        out = tokenizer.apply_chat_template(system, add_generation_prompt=False, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]


def load_context(path: str | Path, formatter: PromptFormatter) -> Context:
    text = read_context(path)
    return Context(text, str(path), context_ids(formatter, text))


def check_fits(context: Context, window: int | None, after: int, prefix_length: int) -> None:
    """Refuse, with the lengths, a context the model cannot read with `after` more tokens (prompt and
    answer) after it, and a prefix longer than the context it replaces."""
    total = len(context.ids) + after
    if window is not None and total > window:
        raise DataError(
            f"{context.source}: context is {len(context.ids)} tokens; with up to {after} prompt and answer "
            f"tokens after it the teacher needs {total} > the model's window of {window} tokens"
        )
    if prefix_length > len(context.ids):
        raise ConfigError(
            f"--prefix-length {prefix_length} is longer than the context it replaces "
            f"({context.source}: {len(context.ids)} tokens)"
        )
