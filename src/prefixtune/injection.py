"""Attention-level injection: how prefix keys/values get into a frozen `transformers` model.

Differences from the base model, and nothing else:

* The model's attention implementation (``sdpa`` or ``eager``) is swapped for ``prefixtune_sdpa`` /
  ``prefixtune_eager``, registered with transformers' ``AttentionInterface``. When the forward call
  carries ``prefix_key_values`` ``[B, layers, 2, kv_heads, P, head_dim]`` and ``prefix_attention_mask``
  ``[B, P]``, each layer puts its slice in front of the text's keys/values, adds always-visible
  columns for the valid prefix slots to the mask, and hands over to the model's own ``sdpa`` /
  ``eager`` function. Without those arguments the model computes exactly what it did before.
* The same name is registered with ``AttentionMaskInterface`` (transformers builds padding masks
  through it; a name without a mask function silently gets none). The mask is always materialised,
  because "causal" as a flag would be aligned wrongly once prefix columns come first.
* A forward pre-hook shifts text positions per row by that row's prefix length: the prefix owns
  positions ``0..P-1``. Positions come from the attention mask, so left padding is exact.

The prefix travels as forward keyword arguments, never through the KV cache. So the generation
cache holds only text (greedy, beam, sampling, streaming all keep the prefix: `generate` expands
the tensors per beam like any model input), and gradient checkpointing replays layers with the same
arguments.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

PREFIX_KWARGS = ("prefix_key_values", "prefix_attention_mask")
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


class UnsupportedModelError(TypeError):
    """The model does not route its attention through transformers' ``AttentionInterface``."""


class Capture:
    """Records, per attention call, the module and the keys/values it computed (pass as ``prefixtune_capture``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []

    def record(self, module: nn.Module, key: Tensor, value: Tensor) -> None:
        self.calls.append((module, key, value))


def _model_eager_function(module: nn.Module) -> Callable:
    """The model's own eager attention (each modeling file defines one; some add softcapping etc.)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no module-level eager_attention_forward")
    return function


def _prefix_columns(
    text_mask: Tensor | None, prefix_mask: Tensor, query: Tensor, text_length: int, causal: bool
) -> Tensor:
    """The text mask with always-visible prefix columns in front (bool: True attends; float: additive)."""
    batch, query_length = query.shape[0], query.shape[2]
    if text_mask is None:
        # No mask was built: full attention, or causal aligned to the end of the keys.
        rows = torch.arange(query_length, device=query.device)[:, None] + (text_length - query_length)
        cols = torch.arange(text_length, device=query.device)[None, :]
        text_mask = (cols <= rows) if causal else torch.ones_like(cols <= rows)
        text_mask = text_mask[None, None]
    text_mask = text_mask[..., :text_length].expand(batch, -1, query_length, text_length)
    prefix_mask = prefix_mask.to(text_mask.device, torch.bool)
    prefix = prefix_mask[:, None, None, :].expand(batch, text_mask.shape[1], query_length, -1)
    if text_mask.dtype != torch.bool:
        blocked = torch.finfo(text_mask.dtype).min
        prefix = torch.zeros((), dtype=text_mask.dtype, device=text_mask.device).masked_fill(~prefix, blocked)
    return torch.cat([prefix.to(text_mask.device), text_mask], dim=-1)


def _prefix_attention(delegate: str) -> Callable:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        prefix_key_values: Tensor | None = None,
        prefix_attention_mask: Tensor | None = None,
        prefixtune_capture: Capture | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        function = sdpa_attention_forward if delegate == "sdpa" else _model_eager_function(module)
        if prefixtune_capture is not None:
            prefixtune_capture.record(module, key, value)
        layer = getattr(module, "prefixtune_layer", None)
        if prefix_key_values is not None and layer is not None:
            prefix = prefix_key_values[:, layer].to(key.device, key.dtype)  # [B, 2, kv_heads, P, head_dim]
            attention_mask = _prefix_columns(
                attention_mask, prefix_attention_mask, query, key.shape[2], getattr(module, "is_causal", True)
            )
            key = torch.cat([prefix[:, 0], key], dim=2)
            value = torch.cat([prefix[:, 1], value], dim=2)
            kwargs["is_causal"] = False  # the mask above says everything
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in SUPPORTED_IMPLEMENTATIONS:
    AttentionInterface.register(f"prefixtune_{_name}", _prefix_attention(_name))
AttentionMaskInterface.register("prefixtune_sdpa", partial(sdpa_mask, allow_is_causal_skip=False))
AttentionMaskInterface.register("prefixtune_eager", eager_mask)


def text_positions(kwargs: dict) -> Tensor:
    """Per-row positions of the new tokens, counting only real (unpadded) text tokens."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs.get("decoder_input_ids")
    if tokens is None:
        raise ValueError("prefixtune: pass input_ids or inputs_embeds by keyword when a prefix is active")
    query_length = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -query_length:]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + query_length, device=tokens.device)[None].expand(tokens.shape[0], -1)


def _offset_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    prefix_mask = kwargs.get("prefix_attention_mask")
    if prefix_mask is None:
        return None
    if args:
        raise TypeError("prefixtune: pass model inputs by keyword (input_ids=...) when a prefix is active")
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = text_positions(kwargs)
    kwargs["position_ids"] = positions + prefix_mask.sum(-1, keepdim=True).to(positions.dtype)
    return args, kwargs


@dataclass(frozen=True)
class Geometry:
    """The shape of a prefix for one base model (what the probe found)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, 2, self.kv_heads)


class KeyValuePath:
    """Sends hidden states through one layer's own frozen key/value path, as a real token at
    positions 0..P-1 would go: its projections, any key norm and rotary embedding. It calls the
    attention module itself and keeps the keys/values it hands to the attention function."""

    def __init__(self, model: PreTrainedModel, attention_modules: list[nn.Module]) -> None:
        self.attention_modules = attention_modules
        self.rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)

    def __call__(self, layer: int, hidden: Tensor) -> Tensor:
        """hidden ``[P, d_model]`` -> keys/values ``[2, kv_heads, P, head_dim]``."""
        module = self.attention_modules[layer]
        hidden = hidden[None].to(next(module.parameters()).dtype)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        accepted = inspect.signature(module.forward).parameters
        kwargs: dict = {"hidden_states": hidden}
        if "attention_mask" in accepted:
            kwargs["attention_mask"] = None
        if "position_embeddings" in accepted:
            if self.rotary is None:
                raise UnsupportedModelError(f"{type(module).__name__} wants rotary embeddings but none was found")
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        if "position_ids" in accepted:
            kwargs["position_ids"] = positions
        capture = Capture()
        module(**kwargs, prefixtune_capture=capture)
        _, key, value = capture.calls[-1]
        return torch.stack([key[0], value[0]])


def _accept_prefix_in_generate(model: PreTrainedModel) -> None:
    """`generate` refuses keyword arguments its forward signature does not name; ours are consumed
    by the attention function, so they are taken out of that check (on this instance only)."""
    validate = model._validate_model_kwargs

    def validate_without_prefix(model_kwargs: dict) -> None:
        validate({key: value for key, value in model_kwargs.items() if key not in PREFIX_KWARGS})

    model._validate_model_kwargs = validate_without_prefix


def inject(model: PreTrainedModel) -> tuple[Geometry, KeyValuePath]:
    """Switch `model` to the prefix attention functions and find its attention layers.

    A probe forward records the attention modules in call order (= layer order) and the shape of
    their keys; each module is tagged with its layer index. A model whose attention does not go
    through ``AttentionInterface`` (or drops the extra keyword arguments) records nothing and is refused.
    """
    name = model.config._attn_implementation
    if name not in SUPPORTED_IMPLEMENTATIONS and not (name or "").startswith("prefixtune_"):
        model.set_attn_implementation("sdpa")
        name = "sdpa"
    model.set_attn_implementation(name if name.startswith("prefixtune_") else f"prefixtune_{name}")

    capture = Capture()
    probe = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    inputs = {"input_ids": probe, "use_cache": False, "prefixtune_capture": capture}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = probe
    try:
        with torch.no_grad():
            model(**inputs)
    except TypeError as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not pass attention arguments through AttentionInterface: {error}"
        ) from error
    modules: list[nn.Module] = []
    for module, _key, _value in capture.calls:
        if all(module is not seen for seen in modules):
            modules.append(module)
            module.prefixtune_layer = len(modules) - 1
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model.config.model_type!r}) does not route attention through "
            "transformers' AttentionInterface, so prefixtune cannot inject a prefix into it"
        )
    shapes = {tuple(key.shape[1::2]) for module, key, _ in capture.calls}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: layers disagree on key shapes {sorted(shapes)}")
    ((kv_heads, head_dim),) = shapes
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if not getattr(model, "_prefixtune_injected", False):
        model.register_forward_pre_hook(_offset_positions, with_kwargs=True)
        _accept_prefix_in_generate(model)
        model._prefixtune_injected = True
    return Geometry(len(modules), kv_heads, head_dim, hidden_size), KeyValuePath(model, modules)
