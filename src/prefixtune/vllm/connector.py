"""`PrefixKVConnector`: vLLM fills a request's first P cache slots with a prefixtune prefix's
keys/values instead of computing them (vLLM loads it by module path: `prompts.kv_transfer_config`).

How it differs from vLLM's own connectors (which move a request's computed KV between instances):
the KV it loads was never computed by vLLM. A request names its prefix in ``kv_transfer_params``
(``{"prefixtune": {"prefix": <content hash>, "length": P}}``, made by `prompts.prefixed_prompt`)
and its prompt starts with P placeholder ids.

- Scheduler side: `get_num_new_matched_tokens` reports the placeholders vLLM's prefix cache does not
  hold yet as externally cached (a synchronous load), so vLLM allocates their blocks, never computes
  them, and starts the text at position P. Blocks loaded once are cached under the request's
  ``cache_salt`` (the same hash) like any computed block, so later requests of that prefix load nothing.
- Worker side: `start_load_kv` writes each layer's prefix keys (position-free, as prefixtune stores
  them) and values into those slots with the attention backend's own writer
  (`vllm_private.write_layer`: CPU, FlashAttention, FlashInfer, Triton and FlexAttention, each by its own
  ``do_kv_cache_update``; any other backend is refused by name at start-up), before the forward pass
  that attends to them. With tensor parallelism each worker writes its own slice of KV heads
  (`local_key_values`, split as vLLM's ``QKVParallelLinear`` splits them). A prefix that cannot be read
  (missing, corrupt, or the wrong shape for this model) fails its request
  (``kv_load_failure_policy="fail"``); the engine goes on.

Only models with one group of plain full attention are served (`vllm_private.cache_refusal`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .kv_files import KVFileError, read_kv
from .prompts import PARAMS_KEY
from .vllm_private import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    attention_layers,
    backend_refusal,
    cache_block_size,
    cache_refusal,
    connector_option,
    init_logger,
    layer_device,
    layer_index,
    model_attention_layers,
    model_dtype,
    model_geometry,
    request_block_ids,
    request_fields,
    tensor_parallel,
    write_layer,
)

logger = init_logger("vllm.prefixtune.connector")  # vLLM shows only loggers under "vllm."
CACHED_PREFIXES = 64  # compiled prefixes a worker keeps on its device (LRU), unless kv_connector_extra_config says


@dataclass
class PrefixLoad:
    """Write positions ``start..length-1`` of prefix `prefix` into the request's blocks."""

    request_id: str
    prefix: str  # the content hash (the file name in the kv folder)
    length: int  # P
    start: int  # positions before this are in vLLM's prefix cache already
    block_ids: list[int]
    error: str | None = None  # bad kv_transfer_params: fail the request instead of loading


@dataclass
class PrefixLoads(KVConnectorMetadata):
    loads: list[PrefixLoad] = field(default_factory=list)


def prefix_params(kv_transfer_params: dict[str, Any] | None, num_prompt_tokens: int) -> tuple[str, int, str | None]:
    """(hash, P, error) from a request's ``kv_transfer_params``; P is kept within the prompt so a bad request
    still gets blocks to fail on. ("", 0, None): the request has no prefix."""
    params = (kv_transfer_params or {}).get(PARAMS_KEY)
    if params is None:
        return "", 0, None
    prefix = params.get("prefix") if isinstance(params, dict) else None
    length = params.get("length") if isinstance(params, dict) else None
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length < num_prompt_tokens:
        error = f"kv_transfer_params {PARAMS_KEY}.length: expected 1..{num_prompt_tokens - 1}, got {length!r}"
        return str(prefix), 1 if num_prompt_tokens > 1 else 0, error
    if not isinstance(prefix, str):
        return "", length, f"kv_transfer_params {PARAMS_KEY}.prefix: expected a content hash, got {prefix!r}"
    return prefix, length, None


def kv_head_slice(total_heads: int, rank: int, world_size: int) -> slice:
    """The KV heads tensor-parallel rank `rank` holds, as vLLM's ``QKVParallelLinear`` splits them:
    contiguous shares when there are at least as many heads as ranks, else each head replicated on
    ``world_size / total_heads`` consecutive ranks."""
    if total_heads >= world_size:
        share = total_heads // world_size
        return slice(rank * share, (rank + 1) * share)
    head = rank // (world_size // total_heads)
    return slice(head, head + 1)


def local_key_values(key_values: Tensor, rank: int, world_size: int) -> Tensor:
    """A prefix ``[layers, 2, kv_heads, P, head_dim]`` -> tensor-parallel rank `rank`'s heads as the cache
    writers take them, ``[layers, 2, P, local kv_heads, head_dim]``."""
    local = key_values[:, :, kv_head_slice(key_values.shape[2], rank, world_size)]
    return local.transpose(2, 3).contiguous()


def write_prefix(
    layers: dict[str, torch.nn.Module],
    key_values: Tensor,
    start: int,
    length: int,
    block_ids: list[int],
    block_size: int,
) -> None:
    """Write positions ``start..length-1`` of this worker's prefix ``[layers, 2, P, local heads, head_dim]`` into
    each layer's cache, in the request's blocks `block_ids` (scheduler blocks of `block_size` tokens), with the
    backend's own writer (`vllm_private.write_layer`)."""
    device = layer_device(next(iter(layers.values())))
    positions = torch.arange(start, length)
    blocks = torch.tensor(block_ids)[positions // block_size]
    slots = (blocks * block_size + positions % block_size).to(device)  # [n]
    for name, layer in layers.items():
        layer_kv = key_values[layer_index(name), :, start:length]  # [2, n, local heads, hd]
        write_layer(layer, layer_kv[0], layer_kv[1], slots)


class PrefixKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        refusal = cache_refusal(kv_cache_config)
        if refusal:
            raise ValueError(f"prefixtune's vLLM connector cannot serve prefixes of this model: {refusal}")
        folder = connector_option(self, "kv_folder")
        if not folder:
            raise ValueError("prefixtune's vLLM connector needs kv_connector_extra_config={'kv_folder': ...}")
        self.kv_folder = Path(folder)
        self.block_size = cache_block_size(kv_cache_config)
        self.geometry = model_geometry(vllm_config)  # every prefix is [layers, 2, kv_heads, P, head_dim] of these
        self.dtype = model_dtype(vllm_config)
        self.cached_prefixes = int(connector_option(self, "cached_prefixes") or CACHED_PREFIXES)
        self._pending: list[PrefixLoad] = []  # scheduler side: loads for the next step
        self._prefixes: OrderedDict[str, Tensor] = OrderedDict()  # worker side: hash -> [layers, 2, P, heads, hd]
        self._failed_blocks: set[int] = set()
        self.stats = {"loads": 0, "loaded_tokens": 0, "failed_loads": 0}  # worker side, for tests and metrics

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """The placeholders not in vLLM's prefix cache yet (`num_computed_tokens`: its hit, block-aligned)."""
        _, params, prompt_tokens = request_fields(request)
        _, length, _ = prefix_params(params, prompt_tokens)
        return max(length - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        request_id, params, prompt_tokens = request_fields(request)
        prefix, length, error = prefix_params(params, prompt_tokens)
        start = length - num_external_tokens
        self._pending.append(PrefixLoad(request_id, prefix, length, start, request_block_ids(blocks), error))

    def build_connector_meta(self, scheduler_output: Any) -> PrefixLoads:
        loads, self._pending = self._pending, []
        return PrefixLoads(loads)

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, Tensor]) -> None:
        """Refuse, at start-up, attention backends the connector has no cache writer for (by name)."""
        refusal = backend_refusal(model_attention_layers(self))
        if refusal:
            raise ValueError(f"prefixtune's vLLM connector cannot serve prefixes here: {refusal}")

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, PrefixLoads) or not metadata.loads:
            return
        layers = attention_layers(forward_context)
        for load in metadata.loads:
            try:
                self._load(load, layers)
                self.stats["loads"] += 1
                self.stats["loaded_tokens"] += load.length - load.start
            except (KVFileError, ValueError, OSError) as error:
                logger.error("request %s: prefix %s not loaded, failing it: %s", load.request_id, load.prefix, error)
                self.stats["failed_loads"] += 1
                first, last = load.start // self.block_size, (load.length - 1) // self.block_size
                self._failed_blocks.update(load.block_ids[first : last + 1])

    def _load(self, load: PrefixLoad, layers: dict[str, torch.nn.Module]) -> None:
        if load.error:
            raise ValueError(load.error)
        key_values = self._prefix(load.prefix, load.length, layer_device(next(iter(layers.values()))))
        write_prefix(layers, key_values, load.start, load.length, load.block_ids, self.block_size)

    def _prefix(self, prefix_hash: str, length: int, device: torch.device) -> Tensor:
        """This worker's slice of the prefix ``[layers, 2, P, local kv_heads, head_dim]`` in the model's dtype,
        on the cache's device (kept for the next request that misses vLLM's prefix cache)."""
        if prefix_hash in self._prefixes:
            self._prefixes.move_to_end(prefix_hash)
            local = self._prefixes[prefix_hash]
            if local.shape[2] != length:
                raise KVFileError(f"prefix {prefix_hash} has {local.shape[2]} positions, the request says {length}")
            return local
        key_values = read_kv(self.kv_folder, prefix_hash)  # [layers, 2, kv_heads, P, head_dim]
        layers, heads, head_dim = self.geometry
        expected = (layers, 2, heads, length, head_dim)
        if tuple(key_values.shape) != expected:
            raise KVFileError(
                f"prefix {prefix_hash}: keys/values of shape {tuple(key_values.shape)}, this model needs "
                f"[layers, 2, kv_heads, P, head_dim] = {expected} (a prefix for another base model?)"
            )
        local = local_key_values(key_values, *tensor_parallel()).to(device, self.dtype)  # [layers, 2, P, heads, hd]
        self._prefixes[prefix_hash] = local
        while len(self._prefixes) > self.cached_prefixes:
            self._prefixes.popitem(last=False)
        return local

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv wrote every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # prefixes are loaded, never saved

    def wait_for_save(self) -> None:
        return
