"""Prefix files: ``prefix.safetensors`` (tensors only, never executable) plus ``prefix_config.json``
(the `PrefixConfig`, the resolved length and a fingerprint of the base model it was trained on).

Writes are atomic (temp file then rename), so an interrupted save never leaves a loadable half
file. Loads check everything before touching the model and say exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from .config import PrefixConfig
from .injection import Geometry

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT_VERSION = 1
CONFIG_HASH_KEY = "prefix_config_sha256"


class PrefixFileError(ValueError):
    """A prefix file is missing, corrupt, or belongs to another base model."""


def fingerprint(model: PreTrainedModel, geometry: Geometry) -> dict[str, Any]:
    """What a prefix depends on: architecture sizes and a hash of a few weights.

    Weights are hashed after rounding to bfloat16, so the same checkpoint loaded in float32 or
    bfloat16 gives the same fingerprint while a different checkpoint does not.
    """
    digest = hashlib.sha256()
    named = [p for _, p in model.named_parameters()]
    for parameter in (model.get_input_embeddings().weight, named[len(named) // 2], named[-1]):
        sample = parameter.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(sample.numpy().tobytes())
    sizes = {
        "model_type": model.config.model_type,
        "num_layers": geometry.num_layers,
        "kv_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
        "hidden_size": geometry.hidden_size,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "weights_sha256": digest.hexdigest()[:16],
    }
    if (geometry.key_head_dim, geometry.value_head_dim) != (geometry.head_dim, geometry.head_dim):
        # keys and values of different head sizes (MLA); absent elsewhere, so older prefix files still load
        sizes |= {"key_head_dim": geometry.key_head_dim, "value_head_dim": geometry.value_head_dim}
    if geometry.layer_shapes:  # layers of different key/value shapes (Gemma 4); absent elsewhere, as above
        sizes["layer_shapes"] = [list(shape) for shape in geometry.layer_shapes]
    if geometry.reusing_layers:  # layers reusing another's keys/values (KV sharing); absent elsewhere
        sizes["reusing_layers"] = geometry.reusing_layers
    if geometry.attention_input_size:  # attention reading wider inputs (Zamba 2); absent elsewhere
        sizes["attention_input_size"] = geometry.attention_input_size
    if geometry.state_layers:  # hybrid models' linear-attention states; absent elsewhere, as above
        sizes |= {
            "state_layers": geometry.state_layers,
            "conv_state_shape": list(geometry.conv_state_shape),
            "recurrent_state_shape": list(geometry.recurrent_state_shape),
        }
    return sizes


def _atomic_write(path: Path, write) -> None:
    """Write to a temp file beside `path`, flush it to disk, then rename over `path`."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; prefixes are meant to be shared
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


atomic_write = _atomic_write  # public: peft_format.py writes PEFT's files the same way


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda temp: Path(temp).write_bytes(text.encode()))


def save(
    directory: str | Path,
    name: str,
    config: PrefixConfig,
    length: int,
    tensors: dict[str, Tensor],
    model_fingerprint: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clashes = sorted(set(extra or {}) & {"format_version", "name", "prefix_length", "config", "base_model"})
    if clashes:
        raise ValueError(f"extra prefix fields {clashes} would overwrite the file's own fields")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "prefix_length": length,
        "config": config.to_dict(),
        "base_model": model_fingerprint,
        **(extra or {}),
    }
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    config_text = json.dumps(meta, indent=2)
    # Each file is replaced atomically; the weights carry the hash of their config, so a pair torn
    # apart by a crash between the two renames is refused on load instead of loading mismatched.
    metadata = {"name": name, CONFIG_HASH_KEY: _sha256(config_text.encode())}
    _atomic_write(directory / WEIGHTS_NAME, lambda temp: save_file(tensors, temp, metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda temp: Path(temp).write_bytes(config_text.encode()))
    return directory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PrefixFileError(f"{path}: no prefix config here (is {directory} a prefix folder?)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrefixFileError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise PrefixFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for field, kind in (
        ("format_version", int),
        ("prefix_length", int),
        ("config", dict),
        ("base_model", dict),
        ("name", str),
    ):
        value = meta.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PrefixFileError(f"{path}: field {field!r} missing or not {kind.__name__} (got {value!r})")
    if meta["prefix_length"] < 1 or not meta["name"]:
        raise PrefixFileError(f"{path}: field 'prefix_length' must be >= 1 and 'name' non-empty")
    if meta["format_version"] != FORMAT_VERSION:
        raise PrefixFileError(
            f"{path}: format_version {meta['format_version']} unsupported (expected {FORMAT_VERSION})"
        )
    meta["config"] = PrefixConfig.from_dict(meta["config"], source=str(path))
    declared = meta["config"].prefix_length
    if declared is not None and declared != meta["prefix_length"]:
        raise PrefixFileError(
            f"{path}: prefix_length {meta['prefix_length']} disagrees with config.prefix_length {declared}"
        )
    return meta


def check_fingerprint(directory: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    differences = [
        f"{key}: prefix was trained on {saved.get(key)!r}, this base has {current[key]!r}"
        for key in current
        if saved.get(key) != current[key]
    ]
    if differences:
        raise PrefixFileError(
            f"{Path(directory) / CONFIG_NAME}: prefix belongs to a different base model; " + "; ".join(differences)
        )


def load_tensors(directory: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Load the safetensors file and check it has exactly the expected names and shapes."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise PrefixFileError(f"{path}: missing prefix weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise PrefixFileError(f"{path}: corrupt or truncated safetensors file ({error})") from error
    config_hash = _sha256((Path(directory) / CONFIG_NAME).read_bytes())
    if metadata.get(CONFIG_HASH_KEY) != config_hash:
        raise PrefixFileError(
            f"{path}: weights and {CONFIG_NAME} come from different saves (an interrupted or mixed-up save?)"
        )
    if set(tensors) != set(expected):
        raise PrefixFileError(f"{path}: expected tensors {sorted(expected)}, got {sorted(tensors)}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise PrefixFileError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")
        if not torch.isfinite(tensors[key]).all():
            raise PrefixFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return tensors
