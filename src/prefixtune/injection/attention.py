"""The attention and mask functions: prefix keys/values go in front of the text's, inside attention.

``prefixtune_sdpa`` / ``prefixtune_eager`` are registered with transformers' ``AttentionInterface``.
They differ from the model's own ``sdpa`` / ``eager`` only when the forward call carries
``prefix_key_values`` ``[B, layers, 2, kv_heads, P, head_dim]`` and ``prefix_attention_mask``
``[B, layers, P]``: then each layer puts its slice in front of the text's keys/values, adds
always-visible columns for the valid prefix slots to the mask (T5: with no position bias), and
hands over to the model's own function (an inference batch of one prefix long enough to pay
goes to `shared_prefix` instead: attended once, not copied per row). A training forward passes
the keys/values split by layer instead (a sequence of ``[B, 2, kv_heads, P, head_dim]``,
`split_by_layer`): a slice of the one tensor per layer would allocate and fill that whole
tensor's gradient in every layer's backward.
Keys and values of different head sizes (multi-head latent attention), and layers of fewer or
smaller heads than others (Gemma 4), are stored zero-padded to ``kv_heads`` x ``head_dim`` and cut
to the layer's own heads and sizes here.

The same names are registered with ``AttentionMaskInterface`` (transformers builds padding masks
through it; a name without a mask function silently gets none). Where transformers skips the mask
(no padding: "causal" as a flag), the prefix path builds it explicitly, since the flag would be
aligned wrongly once prefix columns come first; the bare path keeps the fast flag.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .shared_prefix import one_shared_prefix, shared_prefix_attention

PREFIX_KWARGS = ("prefix_key_values", "prefix_attention_mask")


def split_by_layer(per_row: Tensor) -> tuple[Tensor, ...]:
    """A per-row prefix input ``[B, layers, ...]`` (keys/values ``[B, layers, 2, kv_heads, P, head_dim]``, a
    hybrid model's states) -> one ``[B, ...]`` per layer, with one backward for all of them (``unbind``:
    the layers' gradients stacked once)."""
    return per_row.unbind(1)


def layer_of(per_row: Tensor | Sequence[Tensor], layer: int) -> Tensor:
    """One layer's slice of a per-row prefix input: ``[B, layers, ...]`` or its `split_by_layer` tuple."""
    return per_row[layer] if isinstance(per_row, Sequence) else per_row[:, layer]


MASK_CACHE_KWARG = "prefixtune_masks"
POSITIONS_KWARG = "prefixtune_positions"  # [B, T] each query's position, the prefix owning 0..P-1
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


class UnsupportedModelError(TypeError):
    """The model's type cannot take a prefix exactly (the message names the type and the reason)."""


def model_kind(model: nn.Module) -> str:
    """How a refusal names a model: its class and its ``model_type``."""
    return f"{type(model).__name__} (model_type={model.config.model_type!r})"


@dataclass
class AttentionCall:
    module: nn.Module
    query: Tensor  # [B, heads, T, key_head_dim]
    key: Tensor  # [B, kv_heads, T, key_head_dim]
    value: Tensor  # [B, kv_heads, T, value_head_dim]
    mask: Tensor | None = None  # the text mask the layer passed (bool, or additive float)

    def key_values(self, kv_heads: int, head_dim: int) -> Tensor:
        """Keys and values as a prefix stores them, zero-padded to `kv_heads` heads of `head_dim`
        (see `Geometry`): ``[B, 2, kv_heads, T, head_dim]``."""
        pad = [
            nn.functional.pad(t, (0, head_dim - t.shape[-1], 0, 0, 0, kv_heads - t.shape[1]))
            for t in (self.key, self.value)
        ]
        return torch.stack(pad, dim=1)


def refuse_pooled_keys(model: nn.Module, call: AttentionCall, tokens: int) -> None:
    """A prefix slot stands for one token: refuse attention whose keys or values are fewer or more
    than the `tokens` it was called on (compressed or pooled keys)."""
    if not call.key.shape[2] == call.value.shape[2] == tokens:
        raise UnsupportedModelError(
            f"{model_kind(model)}: {type(call.module).__name__} attends to {call.key.shape[2]} keys for {tokens} "
            "tokens (compressed or pooled keys), so a prefix slot stands for no token"
        )


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


def causal_flag(module: nn.Module, kwargs: dict) -> bool:
    """Whether the layer is causal where no mask was built: the call's ``is_causal``, else the module's
    (as transformers' ``sdpa_attention_forward`` decides)."""
    flag = kwargs.get("is_causal")
    return getattr(module, "is_causal", True) if flag is None else bool(flag)


def text_columns(
    text_mask: Tensor | None, query: Tensor, text_length: int, causal: bool, query_rows: Tensor | None = None
) -> Tensor:
    """The mask the layer passed, cut to the text's keys and expanded to ``[B, h, T_q, T_k]``.

    Where none was built (no padding), causal means: text key ``j`` is visible from a query whose
    text position is at least ``j``. `query_rows` ``[B, T_q]`` gives those positions where known
    (decoder-only models: `query_text_positions`); the keys need not end at the queries: a static
    cache's prefill puts the text in the first of its slots, Gemma 4's KV-shared layers run only the
    last queries over all keys. Without them: what sdpa's ``is_causal`` flag does (query i sees keys
    0..i, torch's upper-left convention; one query sees everything)."""
    batch, query_length = query.shape[0], query.shape[2]
    if text_mask is None:
        cols = torch.arange(text_length, device=query.device)
        if not causal or (query_rows is None and query_length == 1):
            text_mask = torch.ones(1, 1, query_length, text_length, dtype=torch.bool, device=query.device)
        elif query_rows is None:
            rows = torch.arange(query_length, device=query.device)[:, None]
            text_mask = (cols <= rows)[None, None]  # [1, 1, T_q, T_k]
        else:
            text_mask = (cols <= query_rows.to(query.device)[:, :, None])[:, None]  # [B, 1, T_q, T_k]
    return text_mask[..., :text_length].expand(batch, -1, query_length, text_length)


def query_text_positions(positions: Tensor | None, prefix_length: Tensor | int, query_length: int) -> Tensor | None:
    """Each query's text position ``[B, T_q]``: its position (`POSITIONS_KWARG`, the queries are the last
    T_q of them) less its row's prefix length (``[B]``, or one for all rows); None where positions are
    not tracked."""
    if positions is None:
        return None
    if isinstance(prefix_length, Tensor):
        prefix_length = prefix_length.to(positions.device)[:, None]
    return positions[:, positions.shape[1] - query_length :] - prefix_length


def _prefix_columns(
    text_mask: Tensor | None,
    prefix_mask: Tensor,
    query: Tensor,
    text_length: int,
    causal: bool,
    window: int | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """The text mask with prefix columns in front (bool: True attends; float: additive).

    Prefix columns are visible to every query, except in sliding-window layers: there slot ``j``
    stands for a token at position ``j`` and is windowed like it (seen from query position ``q``
    while ``q - j < window``), so a prefix of text T keeps acting exactly like T."""
    batch, query_length = query.shape[0], query.shape[2]
    rows = None if text_mask is not None else query_text_positions(positions, prefix_mask.bool().sum(-1), query_length)
    text_mask = text_columns(text_mask, query, text_length, causal, rows)
    prefix_mask = prefix_mask.to(text_mask.device, torch.bool)  # [B, P]
    prefix = prefix_mask[:, None, None, :].expand(batch, text_mask.shape[1], query_length, -1)  # [B, h, T_q, P]
    if window is not None:
        slots = torch.arange(prefix_mask.shape[-1], device=text_mask.device)
        # The queries are the last T_q text tokens (all of them, except where a model runs only the
        # tokens it keeps logits for through its KV-sharing layers: Gemma 4 in `generate`).
        positions = positions[:, positions.shape[1] - query_length :]
        in_window = positions.to(text_mask.device)[:, :, None] - slots < window  # [B, T_q, P]
        prefix = prefix & in_window[:, None]
    if text_mask.dtype != torch.bool:
        blocked = torch.finfo(text_mask.dtype).min
        prefix = torch.zeros((), dtype=text_mask.dtype, device=text_mask.device).masked_fill(~prefix, blocked)
    return torch.cat([prefix.to(text_mask.device), text_mask], dim=-1)  # [B, h, T_q, P + T_k]


def new_mask_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the whole model: a fresh dict per forward call in which the layers share
    their prefix masks (it travels to the attention functions with the other keyword arguments and
    dies with the call; gradient checkpointing replays layers with the same dict)."""
    if kwargs.get(PREFIX_KWARGS[1]) is None:
        return None
    kwargs[MASK_CACHE_KWARG] = {}
    return args, kwargs


def _layer_mask(
    module: nn.Module,
    text_mask: Tensor | None,
    prefix_mask: Tensor,
    query: Tensor,
    length: int,
    causal: bool,
    cache: dict | None,
    positions: Tensor | None,
) -> Tensor:
    """`_prefix_columns`, built once per forward call and place rather than per layer: the layers of
    a place get the same text mask object (one per layer type, e.g. full or sliding) and the same
    prefix mask row. The cache entry holds the text mask itself, so its ``id`` stays unique while the
    cache lives. Window and chunk sizes are the layer's tags from `probing`."""
    window, chunk = getattr(module, "prefixtune_window", None), getattr(module, "prefixtune_chunk", None)
    if (window is not None or chunk is not None) and positions is None:
        raise UnsupportedModelError(
            f"{type(module).__name__}: a sliding-window or chunked layer outside a decoder-only model's position "
            "shift; prefixtune cannot cut its prefix columns like the tokens they stand for"
        )
    if chunk is not None and int(positions.max()) >= chunk:
        # transformers cuts text into chunks by index, blind to the prefix before it; within the
        # first chunk nothing is cut, beyond it prefixed text would be chunked differently from T + x.
        raise UnsupportedModelError(
            f"{type(module).__name__}: chunked attention (chunk {chunk} tokens) with a prefix is exact only within "
            f"the first chunk; this input reaches position {int(positions.max())} counting the prefix"
        )
    arguments = (text_mask, prefix_mask, query, length, causal, window, positions)
    if cache is None:
        return _prefix_columns(*arguments)
    place = getattr(module, "prefixtune_place", None)
    key = (place, id(text_mask), query.shape[0], query.shape[2], length, causal, window)
    if key not in cache:
        cache[key] = (text_mask, _prefix_columns(*arguments))
    return cache[key][1]


def _shared_prefix_output(
    call: AttentionCall,
    prefix_key_values: Tensor | Sequence[Tensor],
    prefix_attention_mask: Tensor,
    layer: int,
    masks: dict | None,
    positions: Tensor | None,
    kwargs: dict,
) -> Tensor | None:
    """`shared_prefix_attention`'s output ``[B, T, heads, dv]`` where `one_shared_prefix` applies, else None."""
    module, query, key, value = call.module, call.query, call.key, call.value
    shared = one_shared_prefix(module, prefix_key_values, prefix_attention_mask, layer, query, key, masks, kwargs)
    if shared is None:
        return None
    # every slot is valid here, so every row's prefix length is P; text_columns reads rows only without a mask
    rows = (
        None
        if call.mask is not None
        else query_text_positions(positions, prefix_attention_mask.shape[-1], query.shape[2])
    )
    text_mask = text_columns(call.mask, query, key.shape[2], causal_flag(module, kwargs), rows)
    if text_mask.shape[1] not in (1, query.shape[1]):  # a mask per kv head or other: sdpa's own checks decide
        return None
    shared = shared.to(key.device, key.dtype)  # [2, kv_heads, P, head_dim], zero-padded like every prefix
    key_prefix, value_prefix = (
        shared[0, : key.shape[1], :, : key.shape[-1]],
        shared[1, : value.shape[1], :, : value.shape[-1]],
    )
    return shared_prefix_attention(query, key, value, text_mask, key_prefix, value_prefix, kwargs.get("scaling"))


def _prefix_attention(delegate: str) -> Callable:
    def attention(
        module: nn.Module,
        query: Tensor,  # [B, heads, T, key_head_dim]
        key: Tensor,  # [B, kv_heads, T, key_head_dim]
        value: Tensor,  # [B, kv_heads, T, value_head_dim]
        attention_mask: Tensor | None,
        prefix_key_values: Tensor | Sequence[Tensor] | None = None,  # [B, layers, 2, kv_heads, P, head_dim]
        # (a training forward: one [B, 2, kv_heads, P, head_dim] per layer, `split_by_layer`)
        prefix_attention_mask: Tensor | None = None,  # [B, layers, P]
        prefixtune_capture: Capture | None = None,
        prefixtune_masks: dict | None = None,
        prefixtune_positions: Tensor | None = None,  # [B, T]
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        function = sdpa_attention_forward if delegate == "sdpa" else _model_eager_function(module)
        if prefixtune_capture is not None:
            prefixtune_capture.calls.append(AttentionCall(module, query, key, value, attention_mask))
        layer = getattr(module, "prefixtune_layer", None)
        if prefix_key_values is not None and layer is not None:
            if delegate == "sdpa":  # one prefix for every row: attended without a copy per row, where it pays
                call = AttentionCall(module, query, key, value, attention_mask)
                out = _shared_prefix_output(
                    call,
                    prefix_key_values,
                    prefix_attention_mask,
                    layer,
                    prefixtune_masks,
                    prefixtune_positions,
                    kwargs,
                )
                if out is not None:
                    return out, None
            prefix = layer_of(prefix_key_values, layer)
            prefix = prefix.to(key.device, key.dtype)  # [B, 2, kv_heads, P, head_dim]
            attention_mask = _layer_mask(
                module,
                attention_mask,
                prefix_attention_mask[:, layer],
                query,
                key.shape[2],
                causal_flag(module, kwargs),
                prefixtune_masks,
                prefixtune_positions,
            )
            if kwargs.get("position_bias") is not None:  # T5: prefix columns get no relative-position bias
                bias = kwargs["position_bias"]
                kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], prefix.shape[3]), bias], -1)
            # Stored zero-padded to kv_heads x head_dim; a no-op slice unless key and value head sizes
            # differ (MLA) or this layer has fewer or smaller heads than others (see `Geometry`).
            key_prefix = prefix[:, 0, : key.shape[1], :, : key.shape[-1]]
            value_prefix = prefix[:, 1, : value.shape[1], :, : value.shape[-1]]
            key = torch.cat([key_prefix, key], dim=2)  # [B, kv_heads, P + T, key_head_dim]
            value = torch.cat([value_prefix, value], dim=2)  # [B, kv_heads, P + T, value_head_dim]
            kwargs["is_causal"] = False  # the mask above says everything
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in SUPPORTED_IMPLEMENTATIONS:
    AttentionInterface.register(f"prefixtune_{_name}", _prefix_attention(_name))
AttentionMaskInterface.register("prefixtune_sdpa", sdpa_mask)
AttentionMaskInterface.register("prefixtune_eager", eager_mask)
