"""A prefix store: a folder of named prefixes (``<store>/<name>/prefix.safetensors`` +
``prefix_config.json``) served from one frozen base model.

Start-up only lists the folder, so a store of thousands of prefixes serves at once. A prefix is
loaded on its first request (fingerprint and tensors checked then, by `PrefixModel.read_prefix`),
turned into plain keys/values (and hybrid models' states: no MLP or projection at serving time,
`PrefixModel.prefix_snapshot`) and kept under an LRU byte budget; one evicted and asked for again
is loaded again. A request takes that snapshot when admitted and both engines serve from it:
replacing, deleting or evicting the prefix later never touches it, since a replacement is a new
tensor and nothing writes a served prefix in place.
Uploads are written to a hidden staging folder beside the prefixes, validated by loading them,
and only then swapped in: the old folder is moved aside (``os.replace``), the new one moved in, and
the old one removed; if moving the new one in fails, the old one is moved back (and a store that
finds a moved-aside folder without its prefix at start-up, after a crash between the two moves,
moves it back too). A delete moves the folder aside first, so a delete that fails leaves the prefix
served and listed, and answers an error; nothing is removed with errors ignored.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data import PromptFormatter
from ..files import CONFIG_NAME, WEIGHTS_NAME, PrefixFileError, read_meta
from ..injection import STATE_KWARGS
from ..model import PrefixModel
from ..names import BASE_NAME, PrefixNameError, check_prefix_name, is_prefix_name


class StoreError(ValueError):
    """A bad prefix name, upload or prefix file (maps to HTTP 400)."""


class UnknownPrefix(KeyError):
    """No prefix by that name (maps to HTTP 404)."""


class StoreWriteError(OSError):
    """The store could not change its folder; the prefix is as it was before (maps to HTTP 500)."""


logger = logging.getLogger(__name__)
OLD_MARK = ".old-"  # <store>/.old-<name>-<hex>: a prefix folder moved aside during a replacement


def check_name(name: str) -> str:
    try:
        return check_prefix_name(name)
    except PrefixNameError as error:
        raise StoreError(str(error)) from error


@dataclass
class Loaded:
    formatter: PromptFormatter
    inputs: dict[str, Tensor] | None  # one row's prefix arguments (`PrefixModel.prefix_snapshot`); None: bare model
    nbytes: int


class PrefixStore:
    def __init__(
        self,
        model: PrefixModel,
        folder: str | Path,
        cache_bytes: int | None = None,
        *,
        exclusive: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        """`exclusive`: the serving engine's `Engine.exclusive`, held while a hidden prefix runs the
        base model to compute its keys/values (the default suits a store no engine serves)."""
        self.model = model
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes  # None: no limit
        self.lock = threading.RLock()  # guards the store's own state
        self.exclusive = exclusive
        self.encoder_decoder = model.base_model.config.is_encoder_decoder
        self.base = Loaded(PromptFormatter(model.tokenizer, encoder_decoder=self.encoder_decoder), None, 0)
        self.load_errors: dict[str, str] = {}
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self.stats = {"loads": 0, "evictions": 0}
        self._restore_interrupted()
        self.available = {
            path.name
            for path in self.folder.iterdir()
            if path.is_dir() and is_prefix_name(path.name) and (path / CONFIG_NAME).exists()
        }

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.available)

    def check(self, name: str) -> None:
        """`name` is served (the base model or a prefix in the store), else UnknownPrefix."""
        if name != BASE_NAME and name not in self.available:
            raise UnknownPrefix(f"unknown model/prefix {name!r}; available: {[BASE_NAME, *self.names()]}")

    @property
    def loaded_bytes(self) -> int:
        with self.lock:
            return sum(entry.nbytes for entry in self.loaded.values())

    def get(self, name: str) -> Loaded:
        """The prefix ready to serve (loaded now if needed); UnknownPrefix or StoreError otherwise."""
        if name == BASE_NAME:
            return self.base
        with self.lock:
            self.check(name)
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
            try:
                entry = self._load(name, self.folder / name)
            except (PrefixFileError, ValueError, OSError) as error:
                self.load_errors[name] = str(error)
                raise StoreError(f"prefix {name!r} cannot be served: {error}") from error
            self.load_errors.pop(name, None)
            self._evict(keep=name)
            return entry

    def snapshot(self, name: str) -> dict[str, Tensor] | None:
        """The prefix arguments a request admitted now will use, whatever happens to the store later."""
        return self.get(name).inputs

    def _load(self, name: str, folder: Path) -> Loaded:
        """Read the prefix and take its snapshot: the engines serve snapshots, so the model itself
        never holds the store's prefixes."""
        meta = read_meta(folder)
        formatter = PromptFormatter.from_saved(self.model.tokenizer, meta.get("prompt_format"), self.encoder_decoder)
        _, prefix, _ = self.model.read_prefix(folder)
        # A hidden prefix runs the base's key/value path once, here, with the engine paused.
        with self.exclusive() if prefix.runs_base_model else nullcontext():
            inputs = self.model.prefix_snapshot(prefix)
        if not bool(inputs["prefix_attention_mask"].all()):
            raise StoreError(f"prefix {name!r} covers only some layers; the server needs them on every layer")
        # what the prefix holds: its keys/values and, in hybrid models, its linear-attention states
        nbytes = sum(inputs[key].nbytes for key in ("prefix_key_values", *STATE_KWARGS) if key in inputs)
        entry = Loaded(formatter, inputs, nbytes)
        self.loaded[name] = entry
        self.stats["loads"] += 1
        return entry

    def _evict(self, keep: str) -> None:
        """Drop least recently used prefixes until the budget holds (never `keep`, just asked for)."""
        if self.cache_bytes is None:
            return
        held = self.loaded_bytes
        for name in list(self.loaded):  # least recently used first
            if held <= self.cache_bytes:
                return
            if name != keep:
                held -= self.loaded.pop(name).nbytes
                self.stats["evictions"] += 1

    def _restore_interrupted(self) -> None:
        """Move back a prefix folder left aside by a replacement that was killed between its moves."""
        for path in self.folder.glob(f"{OLD_MARK}*"):
            name = path.name[len(OLD_MARK) :].rsplit("-", 1)[0]
            if is_prefix_name(name) and not (self.folder / name).exists():
                logger.warning("restoring prefix %r from %s (a replacement was interrupted)", name, path)
                os.replace(path, self.folder / name)

    def _aside(self, name: str) -> Path:
        """Move the prefix folder `name` aside (one atomic rename); StoreWriteError if that fails."""
        aside = self.folder / f"{OLD_MARK}{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(self.folder / name, aside)
        except OSError as error:
            raise StoreWriteError(f"could not move prefix {name!r} aside: {error}") from error
        return aside

    def _remove(self, path: Path) -> None:
        """Remove a folder no longer served; a failure is logged (it is not listed, not served again)."""
        try:
            shutil.rmtree(path)
        except OSError:
            logger.exception("could not remove %s (no longer served; remove it by hand)", path)

    def _swap_in(self, name: str, staging: Path) -> None:
        """Put `staging` at ``<store>/<name>``: the old folder aside, the new one in, the old one removed."""
        target = self.folder / name
        aside = self._aside(name) if target.exists() else None
        try:
            os.replace(staging, target)
        except OSError as error:
            if aside is not None:
                os.replace(aside, target)
            raise StoreWriteError(f"could not put the upload for {name!r} in place: {error}") from error
        if aside is not None:
            self._remove(aside)

    def upload(self, name: str, weights: bytes, config: bytes) -> None:
        """Validate an uploaded prefix by loading it, then put it in the store under `name`."""
        check_name(name)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=".upload-"))
        try:
            (staging / WEIGHTS_NAME).write_bytes(weights)
            (staging / CONFIG_NAME).write_bytes(config)
            with self.lock:
                self.loaded.pop(name, None)  # admitted requests keep their snapshots; on failure the old files reload
                try:
                    self._load(name, staging)
                except (PrefixFileError, ValueError) as error:
                    raise StoreError(f"rejected upload for {name!r}: {error}") from error
                try:
                    self._swap_in(name, staging)
                except StoreWriteError:
                    self.loaded.pop(name, None)  # the new one is not in place: the old files are served
                    raise
                self.available.add(name)
                self.load_errors.pop(name, None)
                self._evict(keep=name)
        finally:
            if staging.exists():
                self._remove(staging)

    def delete(self, name: str) -> None:
        """Stop serving `name` and remove its folder; StoreWriteError (prefix still served) if the
        folder cannot be moved out of the store."""
        check_name(name)
        with self.lock:
            self.check(name)
            aside = self._aside(name)
            self.loaded.pop(name, None)  # admitted requests keep their snapshots
            self.available.discard(name)
            self.load_errors.pop(name, None)
        self._remove(aside)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {
                "prefixes": len(self.available),
                "loaded": len(self.loaded),
                "loaded_bytes": self.loaded_bytes,
                "cache_bytes": self.cache_bytes,
                "load_errors": dict(self.load_errors),
            }
