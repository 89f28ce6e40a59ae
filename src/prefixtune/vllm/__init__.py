"""Serving prefixtune prefixes inside vLLM (needs vLLM installed: ``bash scripts/setup.sh --vllm``).

``import prefixtune`` never imports this package. Pieces:

- `prompts`: the front end's helper (`VLLMPrefixes.prepare`: prefix name + prompt ids -> the vLLM
  prompt with P placeholder ids, its ``cache_salt`` and the connector's parameters) and
  `kv_transfer_config`, which loads the connector into vLLM;
- `connector`: `PrefixKVConnector`, the ``KVConnectorBase_V1`` that writes prefixes into vLLM's paged cache;
- `kv_files`: compiled prefixes (keys/values) as content-addressed files the workers read;
- `kv_folder`: when those files exist (written per version, removed when its last snapshot is gone);
- `front_base`: the front end's base model without the weights vLLM holds;
- `vllm_private`: every vLLM API the connector relies on, in one place.
"""

from __future__ import annotations

from ..loading import SMOLLM2_ALIAS, smollm2_folder
from .kv_files import KVFileError, content_hash, read_kv, write_kv
from .prompts import (
    KV_FOLDER,
    PARAMS_KEY,
    PrefixedPrompt,
    VLLMPrefixError,
    VLLMPrefixes,
    kv_transfer_config,
    prefixed_prompt,
    vllm_refusal,
)

__all__ = [
    "KV_FOLDER",
    "PARAMS_KEY",
    "KVFileError",
    "PrefixedPrompt",
    "VLLMPrefixError",
    "VLLMPrefixes",
    "content_hash",
    "kv_transfer_config",
    "model_path",
    "prefixed_prompt",
    "read_kv",
    "vllm_refusal",
    "write_kv",
]


def model_path(spec: str) -> str:
    """The folder vLLM loads for a `load_base_model` spec (the ``smollm2-135m`` alias: its converted folder)."""
    return str(smollm2_folder()) if spec == SMOLLM2_ALIAS else spec
