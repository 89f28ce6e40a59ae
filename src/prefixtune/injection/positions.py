"""Position shifting: the prefix owns positions ``0..P-1``, so text positions move up by each row's
prefix length.

Decoder-only models get shifted ``position_ids`` from a forward pre-hook; positions come from the
attention mask, so left padding is exact, and start where the model's own do (RoBERTa family:
after ``padding_idx``). Decoders that take no position ids but count positions themselves into a
position embedding (BART family, Marian, Pegasus, Blenderbot: as encoder-decoders or as
``*ForCausalLM``) get the same shift on that embedding's output. Encoder text keeps its positions
(as in Li & Liang's BART).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention import POSITIONS_KWARG, PREFIX_KWARGS, UnsupportedModelError


def text_positions(kwargs: dict) -> Tensor:
    """Per-row positions ``[B, T]`` of the new tokens, counting only real (unpadded) text tokens."""
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
    """Per-row prefix length ``[B]`` (over the given layers) from ``prefix_attention_mask`` ``[B, layers, P]``."""
    if layers is not None:
        prefix_mask = prefix_mask[:, list(layers)]
    return prefix_mask.any(dim=1).sum(-1)


def first_position(model: nn.Module) -> int:
    """The position id of a sequence's first token: 0, except for embeddings that count positions
    from the input ids after ``padding_idx`` (RoBERTa family: ``padding_idx + 1``)."""
    for module in model.modules():
        if hasattr(module, "create_position_ids_from_input_ids") and isinstance(module.padding_idx, int):
            return module.padding_idx + 1
    return 0


def position_shifter(model: nn.Module) -> Callable:
    """The forward pre-hook of a decoder-only `model` that shifts its ``position_ids``."""
    return partial(_offset_positions, first=first_position(model))


def _offset_positions(module: nn.Module, args: tuple, kwargs: dict, first: int) -> tuple[tuple, dict] | None:
    """Shift ``position_ids`` by each row's prefix length (positions from the mask start at `first`),
    and hand each query's position counted from the prefix's first slot to the attention functions
    (sliding-window layers window the prefix columns by it)."""
    prefix_mask = kwargs.get(PREFIX_KWARGS[1])  # [B, layers, P]
    if prefix_mask is None:
        return None
    if args:
        raise TypeError("prefixtune: pass model inputs by keyword (input_ids=...) when a prefix is active")
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = text_positions(kwargs) + first
    kwargs["position_ids"] = positions + prefix_lengths(prefix_mask)[:, None].to(positions.dtype)
    kwargs[POSITIONS_KWARG] = kwargs["position_ids"] - first  # [B, T]
    return args, kwargs


def counts_own_positions(stack: nn.Module) -> bool:
    """A decoder stack that takes no position ids but has a position embedding (BART family)."""
    return (
        getattr(stack, "embed_positions", None) is not None
        and "position_ids" not in inspect.signature(stack.forward).parameters
    )


def shift_stack_positions(stack: nn.Module, layers: tuple[int, ...]) -> list[RemovableHandle]:
    """Decoders that count their own positions into an ``embed_positions`` table (BART family,
    learned with an ``offset``; Marian, Pegasus: sinusoidal) take no position ids, so that
    embedding is recomputed per row at text position + that row's decoder prefix length. Decoders
    without one (T5: relative bias) need nothing."""
    embedding = getattr(stack, "embed_positions", None)
    if embedding is None:
        return []
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModelError(
            f"{type(stack).__name__}: its position embedding {type(embedding).__name__} is no lookup table whose "
            "output prefixtune can recompute at shifted positions"
        )

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        prefix_mask = kwargs.get(PREFIX_KWARGS[1])  # [B, layers, P]
        embedding.prefixtune_shift = None if prefix_mask is None else prefix_lengths(prefix_mask, layers)

    def forget(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        embedding.prefixtune_shift = None

    def shifted(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        shift = getattr(module, "prefixtune_shift", None)  # [B]
        if shift is None or not bool(shift.any()):
            return None
        # output[b, t] is the embedding of position index (start + t + offset); recompute at + shift[b].
        positions = kwargs.get("position_ids")
        if positions is None:
            start = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
            positions = torch.arange(start, start + output.shape[-2], device=output.device)
        offset = getattr(module, "offset", 0)  # BART's learned table starts at index 2
        positions = positions.reshape(1, -1) + shift.to(output.device)[:, None] + offset  # [B, T]
        return nn.functional.embedding(positions, module.weight)

    return [
        stack.register_forward_pre_hook(remember, with_kwargs=True),
        stack.register_forward_hook(forget, with_kwargs=True),
        embedding.register_forward_hook(shifted, with_kwargs=True),
    ]
