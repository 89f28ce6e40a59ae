"""Position shifting: the prefix owns positions ``0..P-1``, so text positions move up by each row's
prefix length.

Decoder-only models get shifted ``position_ids`` from a forward pre-hook; positions come from the
attention mask, so left padding is exact. Decoders of encoder-decoders with learned absolute
positions (BART family), which take no position ids, get the same shift on their position
embedding. Encoder text keeps its positions (as in Li & Liang's BART).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention import UnsupportedModelError


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


def offset_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of decoder-only models: shift ``position_ids`` by each row's prefix length."""
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


def shift_stack_positions(stack: nn.Module, layers: tuple[int, ...]) -> list[RemovableHandle]:
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
        shift = getattr(module, "prefixtune_shift", None)  # [B]
        if shift is None or not bool(shift.any()):
            return None
        # output[b, t] is the embedding of position index (start + t + offset); recompute at + shift[b].
        positions = kwargs.get("position_ids")
        if positions is None:
            start = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
            positions = torch.arange(start, start + output.shape[-2], device=output.device)
        positions = positions.reshape(1, -1) + shift.to(output.device)[:, None] + module.offset  # [B, T]
        return nn.functional.embedding(positions, module.weight)

    return [
        stack.register_forward_pre_hook(remember, with_kwargs=True),
        stack.register_forward_hook(forget, with_kwargs=True),
        embedding.register_forward_hook(shifted, with_kwargs=True),
    ]
