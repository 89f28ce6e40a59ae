"""Attention-level injection: how prefix keys/values get into a frozen `transformers` model.

Differences from the base model, and nothing else:

* The model's attention implementation (``sdpa`` or ``eager``) is swapped for ``prefixtune_sdpa`` /
  ``prefixtune_eager``, registered with transformers' ``AttentionInterface``. When the forward call
  carries ``prefix_key_values`` ``[B, layers, 2, kv_heads, P, head_dim]`` and ``prefix_attention_mask``
  ``[B, layers, P]``, each layer puts its slice in front of the text's keys/values, adds
  always-visible columns for the valid prefix slots to the mask (T5: with no position bias), and
  hands over to the model's own ``sdpa`` / ``eager`` function. Without those arguments the model
  computes exactly what it did before. Layers are numbered model-wide; encoder-decoders have three
  places (encoder self-, decoder self- and cross-attention), told apart by a probe forward.
* The same name is registered with ``AttentionMaskInterface`` (transformers builds padding masks
  through it; a name without a mask function silently gets none). Where transformers skips the
  mask (no padding: "causal" as a flag), the prefix path builds it explicitly, since the flag would
  be aligned wrongly once prefix columns come first; the bare path keeps the fast flag.
* A forward pre-hook shifts text positions per row by that row's prefix length: the prefix owns
  positions ``0..P-1``. Positions come from the attention mask, so left padding is exact. (BART-style
  decoders, which take no position ids, get the same shift on their position embedding.)

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

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .transformers_private import (
    attn_implementation,
    override_validate_model_kwargs,
    restore_validate_model_kwargs,
    set_attn_implementation,
    validate_model_kwargs,
)

PREFIX_KWARGS = ("prefix_key_values", "prefix_attention_mask")
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


class UnsupportedModelError(TypeError):
    """The model does not route its attention through transformers' ``AttentionInterface``."""


@dataclass
class AttentionCall:
    module: nn.Module
    query: Tensor
    key: Tensor
    value: Tensor


class Capture:
    """Records every attention call's module, queries, keys and values (pass as ``prefixtune_capture``)."""

    def __init__(self) -> None:
        self.calls: list[AttentionCall] = []


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


def _layer_mask(
    module: nn.Module, text_mask: Tensor | None, prefix_mask: Tensor, query: Tensor, length: int, owner: Tensor
) -> Tensor:
    """`_prefix_columns`, built once per forward and place rather than per layer: every layer of a
    place gets the same text mask object and the same prefix mask row. The result is kept on the
    text mask (it dies with it), or, where transformers skipped the text mask (no padding), on the
    prefix mask `owner`, where only the latest entry per place is kept: without a text mask the
    result depends on nothing but the signature."""
    causal = getattr(module, "is_causal", True)
    place = getattr(module, "prefixtune_place", None)
    signature = (query.shape[0], query.shape[2], length, causal)
    if text_mask is not None:
        cache = text_mask.__dict__.setdefault("_prefixtune_masks", {})
        if (place, signature) not in cache:
            cache[(place, signature)] = _prefix_columns(text_mask, prefix_mask, query, length, causal)
        return cache[(place, signature)]
    cache = owner.__dict__.setdefault("_prefixtune_masks", {})
    if place not in cache or cache[place][0] != signature:
        cache[place] = (signature, _prefix_columns(None, prefix_mask, query, length, causal))
    return cache[place][1]


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
            prefixtune_capture.calls.append(AttentionCall(module, query, key, value))
        layer = getattr(module, "prefixtune_layer", None)
        if prefix_key_values is not None and layer is not None:
            prefix = prefix_key_values[:, layer].to(key.device, key.dtype)  # [B, 2, kv_heads, P, head_dim]
            attention_mask = _layer_mask(
                module, attention_mask, prefix_attention_mask[:, layer], query, key.shape[2], prefix_attention_mask
            )
            if kwargs.get("position_bias") is not None:  # T5: prefix columns get no relative-position bias
                bias = kwargs["position_bias"]
                kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], prefix.shape[3]), bias], -1)
            key = torch.cat([prefix[:, 0], key], dim=2)
            value = torch.cat([prefix[:, 1], value], dim=2)
            kwargs["is_causal"] = False  # the mask above says everything
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in SUPPORTED_IMPLEMENTATIONS:
    AttentionInterface.register(f"prefixtune_{_name}", _prefix_attention(_name))
AttentionMaskInterface.register("prefixtune_sdpa", sdpa_mask)
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


def prefix_lengths(prefix_mask: Tensor, layers: tuple[int, ...] | None = None) -> Tensor:
    """Per-row prefix length (over the given layers) from ``prefix_attention_mask`` ``[B, layers, P]``."""
    if layers is not None:
        prefix_mask = prefix_mask[:, list(layers)]
    return prefix_mask.any(dim=1).sum(-1)


def _offset_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Decoder-only models: shift ``position_ids`` by each row's prefix length."""
    prefix_mask = kwargs.get("prefix_attention_mask")
    if prefix_mask is None:
        return None
    if args:
        raise TypeError("prefixtune: pass model inputs by keyword (input_ids=...) when a prefix is active")
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = text_positions(kwargs)
    kwargs["position_ids"] = positions + prefix_lengths(prefix_mask)[:, None].to(positions.dtype)
    return args, kwargs


def _shift_stack_positions(stack: nn.Module, layers: tuple[int, ...]) -> list[RemovableHandle]:
    """Decoders of encoder-decoders with learned absolute positions (BART family: an
    ``embed_positions`` embedding with an ``offset``) take no position ids, so their position
    embedding is recomputed per row at text position + that row's decoder prefix length. Decoders
    without one (T5: relative bias) need nothing."""
    embedding = getattr(stack, "embed_positions", None)
    if embedding is None:
        return []
    if not isinstance(embedding, nn.Embedding) or not hasattr(embedding, "offset"):
        raise UnsupportedModelError(f"{type(stack).__name__}: cannot shift positions of {type(embedding).__name__}")

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        prefix_mask = kwargs.get("prefix_attention_mask")
        embedding.prefixtune_shift = None if prefix_mask is None else prefix_lengths(prefix_mask, layers)

    def forget(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        embedding.prefixtune_shift = None

    def shifted(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        shift = getattr(module, "prefixtune_shift", None)
        if shift is None or not bool(shift.any()):
            return None
        # output[b, t] is the embedding of position index (start + t + offset); recompute at + shift[b].
        positions = kwargs.get("position_ids")
        if positions is None:
            start = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
            positions = torch.arange(start, start + output.shape[-2], device=output.device)
        positions = positions.reshape(1, -1) + shift.to(output.device)[:, None] + module.offset
        return nn.functional.embedding(positions, module.weight)

    return [
        stack.register_forward_pre_hook(remember, with_kwargs=True),
        stack.register_forward_hook(forget, with_kwargs=True),
        embedding.register_forward_hook(shifted, with_kwargs=True),
    ]


PLACES = ("encoder", "decoder", "cross")


@dataclass(frozen=True)
class Geometry:
    """The shape of a prefix for one base model (what the probe found).

    Layers are numbered across the whole model; ``places`` says which belong to the encoder's
    self-attention, the decoder's self-attention and the decoder's cross-attention (decoder-only
    models have just ``decoder``).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    places: dict[str, tuple[int, ...]]

    def layers_for(self, places: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(sorted(layer for place in places for layer in self.places.get(place, ())))


class KeyValuePath:
    """Sends hidden states through one layer's own frozen key/value path, as a real token at
    positions 0..P-1 would go: its projections, any key norm and rotary embedding. It calls the
    attention module itself and keeps the keys/values it hands to the attention function
    (cross-attention modules get the states as their encoder states)."""

    def __init__(self, model: PreTrainedModel, attention_modules: list[nn.Module], cross: tuple[int, ...]) -> None:
        self.attention_modules = attention_modules
        self.cross = set(cross)
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
        if layer in self.cross:
            source = "key_value_states" if "key_value_states" in accepted else "encoder_hidden_states"
            kwargs[source] = hidden
        if "position_embeddings" in accepted:
            if self.rotary is None:
                raise UnsupportedModelError(f"{type(module).__name__} wants rotary embeddings but none was found")
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        if "position_ids" in accepted:
            kwargs["position_ids"] = positions
        capture = Capture()
        module(**kwargs, prefixtune_capture=capture)
        call = capture.calls[-1]
        return torch.stack([call.key[0], call.value[0]])


def _accept_prefix_in_generate(model: PreTrainedModel) -> None:
    """`generate` refuses keyword arguments its forward signature does not name; ours are consumed
    by the attention function, so they are taken out of that check (on this instance only)."""
    validate = validate_model_kwargs(model)

    def validate_without_prefix(model_kwargs: dict) -> None:
        validate({key: value for key, value in model_kwargs.items() if key not in PREFIX_KWARGS})

    override_validate_model_kwargs(model, validate_without_prefix)


def _probe(model: PreTrainedModel) -> Capture:
    """One forward on dummy tokens, recording every attention call. Encoder-decoders get inputs of
    different lengths (3 source, 2 target tokens) so the three kinds of attention tell apart."""
    capture = Capture()
    inputs = {
        "input_ids": torch.zeros(
            (1, 3 if model.config.is_encoder_decoder else 2), dtype=torch.long, device=model.device
        ),
        "use_cache": False,
        "prefixtune_capture": capture,
    }
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    try:
        with torch.no_grad():
            model(**inputs)
    except TypeError as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not pass attention arguments through AttentionInterface: {error}"
        ) from error
    return capture


def _place(model: PreTrainedModel, call: AttentionCall) -> str:
    if not model.config.is_encoder_decoder:
        return "decoder"
    shape = (call.query.shape[2], call.key.shape[2])
    places = {(3, 3): "encoder", (2, 2): "decoder", (2, 3): "cross"}
    if shape not in places:
        raise UnsupportedModelError(f"{type(call.module).__name__}: unexpected attention shape {shape} in the probe")
    return places[shape]


def inject(model: PreTrainedModel) -> tuple[Geometry, KeyValuePath]:
    """Switch `model` to the prefix attention functions and find its attention layers.

    A probe forward records the attention modules in call order (= layer order) and the shape of
    their keys; each module is tagged with its layer index. A model whose attention does not go
    through ``AttentionInterface`` (or drops the extra keyword arguments) records nothing and is refused.
    """
    name = original = attn_implementation(model)
    if name not in SUPPORTED_IMPLEMENTATIONS and not (name or "").startswith("prefixtune_"):
        set_attn_implementation(model, "sdpa")
        name = "sdpa"
    set_attn_implementation(model, name if name.startswith("prefixtune_") else f"prefixtune_{name}")

    calls = _probe(model).calls
    by_place: dict[str, list[nn.Module]] = {place: [] for place in PLACES}
    for call in calls:
        modules = by_place[_place(model, call)]
        if all(call.module is not seen for seen in modules):
            modules.append(call.module)
    ordered = [module for place in PLACES for module in by_place[place]]
    if not ordered:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model.config.model_type!r}) does not route attention through "
            "transformers' AttentionInterface, so prefixtune cannot inject a prefix into it"
        )
    for index, module in enumerate(ordered):
        module.prefixtune_layer = index
    for place, modules in by_place.items():
        for module in modules:
            module.prefixtune_place = place
    places, start = {}, 0
    for place in PLACES:
        if by_place[place]:
            places[place] = tuple(range(start, start + len(by_place[place])))
            start += len(by_place[place])
    shapes = {(call.key.shape[1], call.key.shape[3]) for call in calls}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: layers disagree on key shapes {sorted(shapes)}")
    ((kv_heads, head_dim),) = shapes
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if not getattr(model, "_prefixtune_injected", None):
        if model.config.is_encoder_decoder:
            # Decoder text follows its prefix (as with Li & Liang's past_key_values); encoder positions
            # stay put, as in the paper's BART, so an encoder prefix never moves the source text.
            hooks = _shift_stack_positions(model.get_decoder(), places["decoder"])
        else:
            hooks = [model.register_forward_pre_hook(_offset_positions, with_kwargs=True)]
        _accept_prefix_in_generate(model)
        model._prefixtune_injected = Injected(original, hooks)
    geometry = Geometry(len(ordered), kv_heads, head_dim, hidden_size, places)
    return geometry, KeyValuePath(model, ordered, places.get("cross", ()))


TAGS = ("prefixtune_layer", "prefixtune_place", "prefixtune_shift")  # attributes inject puts on modules


@dataclass
class Injected:
    """What `inject` changed on a model beyond `TAGS`, kept on it so `uninject` can undo it."""

    attn_implementation: str | None  # the model's own, before prefixtune's
    hooks: list[RemovableHandle]


def uninject(model: PreTrainedModel) -> None:
    """Undo `inject`: remove its hooks and module tags, give `generate` back its own keyword check,
    and restore the model's own attention implementation."""
    injected = model.__dict__.pop("_prefixtune_injected", None)
    if not isinstance(injected, Injected):
        raise ValueError(f"{type(model).__name__} has no prefixtune injection to undo")
    for hook in injected.hooks:
        hook.remove()
    for module in model.modules():
        for tag in TAGS:
            module.__dict__.pop(tag, None)
    restore_validate_model_kwargs(model)
    set_attn_implementation(model, injected.attn_implementation)
