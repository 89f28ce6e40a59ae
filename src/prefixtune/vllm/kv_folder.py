"""`KVFolder`: the connector's folder of compiled prefixes (`kv_files`) as one front end owns it, each
file kept exactly while a snapshot of its content lives.

How it differs from `kv_files` (one file's format): this decides when files exist. A file is written
when the first request of a prefix version is prepared, and removed when the last snapshot of that
content is gone: the store drops a version on delete, replace or eviction, and each admitted request
holds its own snapshot until it ends, so a deleted or replaced prefix's file goes once nothing admitted
can still ask the connector for it (a version loaded again is written again). Files left by a server
that stopped without closing are stale: `clear` removes them at start-up and at shutdown. One front
end serves a store folder (two sharing one would remove each other's files).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from pathlib import Path

from torch import Tensor

from .kv_files import HASH_PATTERN, kv_path, write_kv

logger = logging.getLogger(__name__)


class KVFolder:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.lock = threading.RLock()  # an RLock: a snapshot may be collected inside `hash_of` itself
        self.snapshots: dict[int, tuple[weakref.ref, str]] = {}  # id(snapshot) -> (weak ref to it, its hash)
        self.holders: Counter[str] = Counter()  # hash -> live snapshots of that content

    def hash_of(self, key_values: Tensor) -> str:
        """The file hash for the snapshot `key_values` ``[layers, 2, kv_heads, P, head_dim]``, writing the file
        if no live snapshot of its content has (a snapshot never changes: each is hashed once)."""
        ident = id(key_values)
        with self.lock:
            known = self.snapshots.get(ident)
            if known is not None and known[0]() is key_values:
                return known[1]
            prefix_hash = write_kv(self.folder, key_values)  # kept if there (another snapshot, same content)
            self.snapshots[ident] = (weakref.ref(key_values, lambda ref: self._collected(ident, ref)), prefix_hash)
            self.holders[prefix_hash] += 1
            return prefix_hash

    def files(self) -> list[Path]:
        """The compiled prefix files in the folder now."""
        return sorted(p for p in self.folder.glob("*.safetensors") if HASH_PATTERN.match(p.stem))

    def clear(self) -> int:
        """Remove every compiled prefix file and unfinished write in the folder (at start-up: stale ones;
        at shutdown: nothing will read them); returns how many."""
        with self.lock:
            stale = [*self.files(), *self.folder.glob(".*.safetensors.*.tmp")]
            for path in stale:
                path.unlink(missing_ok=True)
            self.snapshots.clear()
            self.holders.clear()
        return len(stale)

    def _collected(self, ident: int, ref: weakref.ref) -> None:
        """A snapshot is gone: remove its file if it was the last of its content."""
        with self.lock:
            entry = self.snapshots.get(ident)
            if entry is None or entry[0] is not ref:
                return  # cleared meanwhile
            del self.snapshots[ident]
            prefix_hash = entry[1]
            self.holders[prefix_hash] -= 1
            if self.holders[prefix_hash] > 0:
                return
            del self.holders[prefix_hash]
            try:
                kv_path(self.folder, prefix_hash).unlink(missing_ok=True)
            except OSError:  # in a weakref callback: log, never raise
                logger.exception("could not remove the compiled prefix %s (remove it by hand)", prefix_hash)
