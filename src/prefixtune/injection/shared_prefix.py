"""Attention to one prefix that every row of the batch shares, without a copy of it per row.

How it differs from the concatenating path in `attention` (same result, up to float rounding):
there each layer concatenates the prefix, expanded to the batch, in front of the text's keys and
values, and transformers' SDPA reads the ``[B, kv_heads, P + T, head_dim]`` result. For a long
prefix (a distillation teacher holding a 1,300-token context) that copy and the per-row reads of
the same prefix cost more than the model's own layers at every decoding step. Here the softmax
over ``[prefix; text]`` is split in its two parts and merged by their maxima and sums, as in
Hydragen (Juravsky et al. 2024) and FlashInfer's cascade attention: the prefix part is one matmul
of all rows' queries against the single ``[kv_heads, P, head_dim]`` prefix, the text part is the
text's own attention, masked as transformers masked it.

Taken only where it reproduces transformers' generic ``sdpa_attention_forward`` exactly: the
``sdpa`` delegate, no gradient (inference: `generate`, a teacher's forward), a prefix tensor whose
batch rows are one expanded row (`PrefixArguments.batch` of one prefix), every slot of the layer's
prefix valid, no position bias, softcap, sliding-window or chunk tag, no dropout. And only where
it pays: the prefix has `MIN_SLOTS_PER_TEXT_KEY` slots per text key or more, and the scores
``[B, heads, T, P + T_text]`` stay under `MAX_SCORES` floats (a long prefill goes the
concatenating way, whose SDPA kernel does not hold the scores). A text mask with a head count
other than 1 or the query heads (which sdpa would refuse) goes that way too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

MAX_SCORES = 1 << 25  # float32 attention scores (prefix and text) held at once: 128 MB
# Taken where the prefix has at least this many slots per text key: on SmolLM2 (2-core CPU, 16 rows,
# 16-token prompts; `benchmarks/speed.py --only shared-prefix`) a 1,280-slot prefix generated 1.43x
# faster this way, a 128-slot one broke even, a 10-slot one was 0.84x (the split costs a few small
# float32 matmuls that one SDPA call over a short concatenation does not).
MIN_SLOTS_PER_TEXT_KEY = 16
SHARED_KEY = "shared-prefix-layers"  # the mask cache's entry: which layers' prefix slots are all valid


def one_shared_prefix(
    module: nn.Module,
    prefix_key_values: Tensor | Sequence[Tensor],  # [B, layers, 2, kv_heads, P, head_dim]
    prefix_attention_mask: Tensor,  # [B, layers, P]
    layer: int,
    query: Tensor,  # [B, heads, T, head_dim]
    key: Tensor,  # [B, kv_heads, T_text, head_dim]
    masks: dict | None,
    kwargs: dict,
) -> Tensor | None:
    """The layer's one shared prefix ``[2, kv_heads, P, head_dim]``, or None where this path does not apply."""
    if torch.is_grad_enabled() or not isinstance(prefix_key_values, Tensor):
        return None
    batch = prefix_key_values.shape[0]
    if batch < 2 or prefix_key_values.stride(0) != 0 or prefix_attention_mask.stride(0) != 0:
        return None  # rows of different prefixes (or one row: nothing to share)
    if query.shape[0] != batch or key.shape[0] != batch:
        return None
    if any(kwargs.get(name) is not None for name in ("position_bias", "softcap")):
        return None  # T5's bias columns; softcap, which transformers' sdpa refuses on the concatenating path
    if getattr(module, "prefixtune_window", None) is not None or getattr(module, "prefixtune_chunk", None) is not None:
        return None
    if kwargs.get("dropout"):  # sdpa applies it whenever it is passed; this path has none
        return None
    slots = prefix_key_values.shape[-2]
    if slots < MIN_SLOTS_PER_TEXT_KEY * key.shape[2]:
        return None  # a short prefix: concatenating it is cheaper
    if batch * query.shape[1] * query.shape[2] * (slots + key.shape[2]) > MAX_SCORES:
        return None  # a long prefill: SDPA's kernel does not hold the scores, this path would
    if not _all_slots_valid(prefix_attention_mask, layer, masks):
        return None
    return prefix_key_values[0, layer]


def _all_slots_valid(prefix_attention_mask: Tensor, layer: int, masks: dict | None) -> bool:
    """Whether every prefix slot of `layer` is valid, read once per forward call for all layers."""
    if masks is None:
        return bool(prefix_attention_mask[0, layer].all())
    known = masks.get(SHARED_KEY)
    if known is None or known[0] is not prefix_attention_mask:  # the entry holds the mask: its id stays unique
        known = masks[SHARED_KEY] = (prefix_attention_mask, prefix_attention_mask[0].all(-1).tolist())
    return known[1][layer]


def shared_prefix_attention(
    query: Tensor,  # [B, heads, T, head_dim]
    key: Tensor,  # [B, kv_heads, T_text, head_dim]
    value: Tensor,  # [B, kv_heads, T_text, value_head_dim]
    text_mask: Tensor,  # [B or 1, 1 or heads, T, T_text]: bool (True attends) or additive float
    key_prefix: Tensor,  # [kv_heads, P, head_dim]
    value_prefix: Tensor,  # [kv_heads, P, value_head_dim]
    scaling: float | None,
) -> Tensor:
    """softmax([q·P_k; q·K] * scale + [0; mask]) · [P_v; V] as transformers' SDPA returns it:
    ``[B, T, heads, value_head_dim]``, computed in float32."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.float().view(batch, kv_heads, groups, length, dim) * scale  # [B, kv, g, T, d]

    # Prefix part: every row's queries against the one prefix, one matmul per kv head.
    q_rows = q.permute(1, 0, 2, 3, 4).reshape(kv_heads, batch * groups * length, dim)  # [kv, B*g*T, d]
    prefix_scores = q_rows @ key_prefix.float().transpose(-1, -2)  # [kv, B*g*T, P]
    prefix_scores = prefix_scores.view(kv_heads, batch, groups, length, -1).transpose(0, 1)  # [B, kv, g, T, P]

    # Text part: each row against its own keys, masked as transformers masked it.
    text_scores = q @ key.float()[:, :, None].transpose(-1, -2)  # [B, kv, g, T, T_text]
    mask = text_mask[:, :, None]  # [B or 1, 1, 1, T, T_text] (one mask for all heads, as transformers builds it)
    if text_mask.shape[1] == heads:  # a mask per query head
        mask = text_mask.reshape(text_mask.shape[0], kv_heads, groups, length, -1)
    if mask.dtype == torch.bool:
        text_scores = text_scores.masked_fill(~mask, float("-inf"))
    else:
        text_scores = text_scores + mask.float()

    # Merge: one maximum over both parts (the prefix slots are always visible, so it is finite).
    top = torch.maximum(prefix_scores.amax(-1, keepdim=True), text_scores.amax(-1, keepdim=True))
    prefix_weights, text_weights = (prefix_scores - top).exp(), (text_scores - top).exp()
    total = prefix_weights.sum(-1, keepdim=True) + text_weights.sum(-1, keepdim=True)  # [B, kv, g, T, 1]
    prefix_out = prefix_weights.transpose(0, 1).reshape(kv_heads, batch * groups * length, -1) @ value_prefix.float()
    prefix_out = prefix_out.view(kv_heads, batch, groups, length, -1).transpose(0, 1)  # [B, kv, g, T, dv]
    text_out = text_weights @ value.float()[:, :, None]  # [B, kv, g, T, dv]
    out = ((prefix_out + text_out) / total).reshape(batch, heads, length, -1)
    return out.transpose(1, 2).contiguous().to(query.dtype)  # [B, T, heads, dv]
