"""Compiled prefixes for vLLM: one prefix's keys/values as a content-addressed file
``<kv folder>/<content hash>.safetensors``.

How it differs from a prefix folder (`prefixtune.files`): it holds no parameterization, only the keys
and values every layer attends to (an `mlp` or `hidden` prefix compiled once, by the front end, with
the base model's fingerprint checked there), so vLLM's workers read it without a Hugging Face model.
The name is the hash of the content, which is also the requests' ``cache_salt``: a replaced prefix is
a new file under a new name, and a request admitted before the replacement keeps reading its own.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..files import atomic_write

KEY = "prefix_key_values"
HASH_FIELD = "content_hash"
HASH_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class KVFileError(ValueError):
    """A compiled prefix file is missing, corrupt or not what its name says."""


def content_hash(key_values: Tensor) -> str:
    """Hash of the keys/values' shape, dtype and bytes ``[layers, 2, kv_heads, P, head_dim]``."""
    tensor = key_values.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def kv_path(folder: str | Path, prefix_hash: str) -> Path:
    if not isinstance(prefix_hash, str) or not HASH_PATTERN.match(prefix_hash):
        raise KVFileError(f"prefix hash: expected 32 lowercase hex digits, got {prefix_hash!r}")
    return Path(folder) / f"{prefix_hash}.safetensors"


def write_kv(folder: str | Path, key_values: Tensor) -> str:
    """Write the keys/values (once: an existing file of that content is kept) and return their hash."""
    if key_values.ndim != 5 or key_values.shape[1] != 2:
        raise KVFileError(f"keys/values: expected [layers, 2, kv_heads, P, head_dim], got {tuple(key_values.shape)}")
    prefix_hash = content_hash(key_values)
    path = kv_path(folder, prefix_hash)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {KEY: key_values.detach().to("cpu").contiguous()}
        atomic_write(path, lambda temp: save_file(tensors, temp, metadata={HASH_FIELD: prefix_hash}))
    return prefix_hash


def read_kv(folder: str | Path, prefix_hash: str) -> Tensor:
    """The keys/values ``[layers, 2, kv_heads, P, head_dim]`` stored under `prefix_hash`, checked against it."""
    path = kv_path(folder, prefix_hash)
    if not path.is_file():
        raise KVFileError(f"{path}: no compiled prefix of hash {prefix_hash} (was it written by this front end?)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get(HASH_FIELD)
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise KVFileError(f"{path}: corrupt or truncated safetensors file ({error})") from error
    if set(tensors) != {KEY} or stored != prefix_hash:
        raise KVFileError(f"{path}: expected one tensor {KEY!r} stored as {prefix_hash}, got {sorted(tensors)}")
    key_values = tensors[KEY]
    if content_hash(key_values) != prefix_hash:
        raise KVFileError(f"{path}: content does not match its hash {prefix_hash} (file changed after writing?)")
    return key_values
