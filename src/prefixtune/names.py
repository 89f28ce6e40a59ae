"""Prefix names: the one rule every entry point applies (add_prefix, load_prefix, the store, the CLI,
multi-task data). A name is also a folder name, so nothing can escape a store; ``base`` is kept for
the bare model (the server's ``model: "base"``)."""

from __future__ import annotations

import re

BASE_NAME = "base"
PREFIX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': torch module names cannot hold one
RULE = f"1-64 letters, digits, '_', '-', starting with a letter or digit, and not {BASE_NAME!r} (the bare model)"


class PrefixNameError(ValueError):
    """A prefix name breaks the rule above (the message names it and the rule)."""


def is_prefix_name(name: object) -> bool:
    return isinstance(name, str) and bool(PREFIX_NAME.match(name)) and name != BASE_NAME


def check_prefix_name(name: object) -> str:
    if not is_prefix_name(name):
        raise PrefixNameError(f"invalid prefix name {name!r}: use {RULE}")
    return name  # type: ignore[return-value]
