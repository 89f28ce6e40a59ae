"""A prefix store: a folder of named prefixes (``<store>/<name>/prefix.safetensors`` +
``prefix_config.json``) served from one frozen base model.

Start-up only lists the folder, so a store of thousands of prefixes serves at once. A prefix is
loaded on its first request (fingerprint and tensors checked then, by `PrefixModel.load_prefix`),
compiled to plain keys/values (no MLP or projection at serving time) and kept under an LRU byte
budget; one evicted and asked for again is loaded again. A request takes a snapshot of its
prefix's keys/values when admitted (`snapshot`): replacing or deleting the prefix later never
touches it, since a replacement is a new tensor and nothing writes a served prefix in place.
Uploads are written to a hidden staging folder, validated by loading them, and only then renamed.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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


def check_name(name: str) -> str:
    try:
        return check_prefix_name(name)
    except PrefixNameError as error:
        raise StoreError(str(error)) from error


@dataclass
class Loaded:
    formatter: PromptFormatter
    key_values: Tensor | None  # [layers, 2, kv_heads, P, head_dim]; None for the bare model
    nbytes: int


class PrefixStore:
    def __init__(self, model: PrefixModel, folder: str | Path, cache_bytes: int | None = None) -> None:
        self.model = model
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes  # None: no limit
        self.lock = threading.RLock()  # guards the store's own state
        # The engine's: `exclusive()` to run the base model, `exclusive(forward=False)` to change the
        # PrefixModel's prefixes (an engine that reads them by name must not run meanwhile).
        self.exclusive: Callable[..., AbstractContextManager] = lambda forward=True: nullcontext()
        self.encoder_decoder = model.base_model.config.is_encoder_decoder
        self.base = Loaded(PromptFormatter(model.tokenizer, encoder_decoder=self.encoder_decoder), None, 0)
        self.load_errors: dict[str, str] = {}
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self.in_use: Counter[str] = Counter()  # read by name by a running micro-batch: not evicted meanwhile
        self.stats = {"loads": 0, "evictions": 0}
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

    @contextmanager
    def using(self, names: list[str]) -> Iterator[None]:
        """While a batch reads these prefixes by name, loading others never evicts them (the byte
        budget may be exceeded until it ends)."""
        with self.lock:
            self.in_use.update(names)
        try:
            yield
        finally:
            with self.lock:
                self.in_use.subtract(names)
                self.in_use += Counter()  # drops the zeros
                self._evict()

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

    def snapshot(self, name: str) -> Tensor | None:
        """The keys/values a request admitted now will use, whatever happens to the store later."""
        return self.get(name).key_values

    def _load(self, name: str, folder: Path) -> Loaded:
        meta = read_meta(folder)
        formatter = PromptFormatter.from_saved(self.model.tokenizer, meta.get("prompt_format"), self.encoder_decoder)
        with self.exclusive(forward=False):
            if name in self.model.prefixes:
                self.model.delete_prefix(name)
            self.model.load_prefix(folder, name=name)
            try:
                # A hidden prefix runs the base's key/value path once, here; the server keeps the result.
                with self.exclusive() if self.model.prefixes[name].runs_base_model else nullcontext():
                    self.model.compile_prefix(name)
                with torch.no_grad():
                    inputs = self.model.prefix_inputs(name, 1)
                if not bool(inputs["prefix_attention_mask"].all()):
                    raise StoreError(f"prefix {name!r} covers only some layers; the server needs them on every layer")
            except Exception:
                self.model.delete_prefix(name)
                raise
        key_values = inputs["prefix_key_values"][0].detach()  # [layers, 2, kv_heads, P, head_dim]
        # what the prefix holds: its keys/values and, in hybrid models, its linear-attention states
        nbytes = sum(inputs[key][0].nbytes for key in ("prefix_key_values", *STATE_KWARGS) if key in inputs)
        entry = Loaded(formatter, key_values, nbytes)
        self.loaded[name] = entry
        self.stats["loads"] += 1
        return entry

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used prefixes until the budget holds (never `keep`, just asked for,
        nor one in use)."""
        if self.cache_bytes is None:
            return
        for name in list(self.loaded):  # least recently used first
            if self.loaded_bytes <= self.cache_bytes:
                return
            if name != keep and not self.in_use[name]:
                self._unload(name)
                self.stats["evictions"] += 1

    def _unload(self, name: str) -> None:
        self.loaded.pop(name, None)
        with self.exclusive(forward=False):
            if name in self.model.prefixes:
                self.model.delete_prefix(name)

    def upload(self, name: str, weights: bytes, config: bytes) -> None:
        """Validate an uploaded prefix by loading it, then put it in the store under `name`."""
        check_name(name)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=".upload-"))
        try:
            (staging / WEIGHTS_NAME).write_bytes(weights)
            (staging / CONFIG_NAME).write_bytes(config)
            with self.lock:
                self._unload(name)  # admitted requests keep their snapshots; on failure the old files reload
                try:
                    self._load(name, staging)
                except (PrefixFileError, ValueError) as error:
                    raise StoreError(f"rejected upload for {name!r}: {error}") from error
                target = self.folder / name
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
                self.available.add(name)
                self.load_errors.pop(name, None)
                self._evict(keep=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str) -> None:
        check_name(name)
        with self.lock:
            self.check(name)
            self._unload(name)
            self.available.discard(name)
            self.load_errors.pop(name, None)
            shutil.rmtree(self.folder / name, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {
                "prefixes": len(self.available),
                "loaded": len(self.loaded),
                "loaded_bytes": self.loaded_bytes,
                "cache_bytes": self.cache_bytes,
                "load_errors": dict(self.load_errors),
            }
