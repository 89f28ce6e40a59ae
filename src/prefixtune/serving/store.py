"""A prefix store: a folder of named prefixes (``<store>/<name>/prefix.safetensors`` +
``prefix_config.json``) served from one frozen base model.

Each prefix is checked against the base's fingerprint when it is loaded, loaded once, and kept
compiled (`mlp`/`hidden` collapsed to plain keys/values, so serving pays no MLP or projection).
Names are restricted to a safe alphabet, so no name can reach outside the store. Uploads are
written to a hidden staging folder, validated by loading them, and only then renamed into place.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..data import PREFIX_NAME
from ..files import CONFIG_NAME, WEIGHTS_NAME, PrefixFileError, read_meta
from ..model import PrefixModel

NAME_PATTERN = PREFIX_NAME
BASE_NAME = "base"  # the bare base model, reachable like a prefix


class StoreError(ValueError):
    """A bad prefix name or upload (maps to HTTP 400)."""


class UnknownPrefix(KeyError):
    """No prefix by that name (maps to HTTP 404)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name or name == BASE_NAME:
        raise StoreError(
            f"invalid prefix name {name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a letter or "
            f"digit, no '..', and not {BASE_NAME!r}"
        )
    return name


class PrefixStore:
    def __init__(self, model: PrefixModel, folder: str | Path) -> None:
        self.model = model
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prompt_formats: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()  # the engine and admin requests share the model
        self.load_errors: dict[str, str] = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_dir() and NAME_PATTERN.match(path.name) and (path / CONFIG_NAME).exists():
                try:
                    self._load(path.name, path)
                except (PrefixFileError, ValueError) as error:  # one bad prefix must not stop the server
                    self.load_errors[path.name] = str(error)

    def names(self) -> list[str]:
        return list(self.model.prefix_names)

    def check(self, name: str) -> None:
        """`name` is served (the base model or a loaded prefix), else UnknownPrefix."""
        if name != BASE_NAME and name not in self.model.prefixes:
            raise UnknownPrefix(f"unknown model/prefix {name!r}; available: {[BASE_NAME, *self.names()]}")

    def _load(self, name: str, folder: Path) -> None:
        meta = read_meta(folder)
        self.model.load_prefix(folder, name=name)
        self.model.compile_prefix(name)
        self.prompt_formats[name] = meta.get("prompt_format") or {}

    def upload(self, name: str, weights: bytes, config: bytes) -> None:
        """Validate an uploaded prefix by loading it, then put it in the store under `name`."""
        check_name(name)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=".upload-"))
        try:
            (staging / WEIGHTS_NAME).write_bytes(weights)
            (staging / CONFIG_NAME).write_bytes(config)
            with self.lock:
                replacing = name in self.model.prefixes
                previous = (self.model.prefixes[name], self.model.prefix_configs[name]) if replacing else None
                if replacing:
                    self.model.delete_prefix(name)
                try:
                    self._load(name, staging)
                except (PrefixFileError, ValueError) as error:
                    if previous:  # keep serving the old version
                        self.model.prefixes[name], self.model.prefix_configs[name] = previous
                    raise StoreError(f"rejected upload for {name!r}: {error}") from error
                target = self.folder / name
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str) -> None:
        check_name(name)
        with self.lock:
            self.check(name)
            self.model.delete_prefix(name)
            self.prompt_formats.pop(name, None)
            shutil.rmtree(self.folder / name, ignore_errors=True)
