"""Per-request attention for transformers' continuous batching where no flash kernel exists (CPU).

transformers' engine runs one flattened batch per step: all rows' new tokens as one sequence of
queries, all rows' cached keys/values gathered after each other (``cu_seq_lens_q``/``_k`` give each
request's span). Its ``sdpa`` path then attends every query to *every* row's keys through one dense
``[queries, keys]`` mask that it rebuilds each step, so attention costs rows x what it needs.
Flash kernels avoid that with variable-length attention; on a CPU there is none.

``prefixtune_paged_sdpa`` is that variable-length attention on plain ``sdpa``: each request's
queries attend to its own keys only, causally aligned to the end of its keys (a prefill chunk sees
the request's earlier tokens and its prefix; a decode row needs no mask). Per request it calls the
same ``sdpa_attention_forward`` as transformers' own path, so each row computes what it did there
minus the columns the dense mask blocked. The engine builds no dense mask for it (transformers
builds one only for its own ``sdpa``/``eager`` names), and its mask function returns none.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

PAGED_ATTENTION = "prefixtune_paged_sdpa"


def paged_sdpa(
    module: nn.Module,
    query: Tensor,  # [1, heads, queries of all rows, head_dim]
    key: Tensor,  # [1, kv_heads, keys of all rows, head_dim]
    value: Tensor,  # [1, kv_heads, keys of all rows, head_dim]
    attention_mask: Tensor | None,  # none is built for this implementation
    cu_seq_lens_q: Tensor | None = None,  # [rows + 1] where each row's queries start
    cu_seq_lens_k: Tensor | None = None,  # [rows + 1] where each row's keys start
    **kwargs,
) -> tuple[Tensor, None]:
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(f"{PAGED_ATTENTION} serves transformers' continuous batching only (no cu_seq_lens given)")
    if isinstance(cu_seq_lens_k, dict):  # the paged cache picks the layer's entry; this layer bypassed it
        raise ValueError(
            f"{type(module).__name__}: {PAGED_ATTENTION} got key spans per layer type, not this layer's "
            "(the layer did not go through the paged cache's update)"
        )
    kwargs.pop("is_causal", None)
    outputs = []
    for (q_start, q_end), (k_start, k_end) in zip(
        pairwise(cu_seq_lens_q.tolist()), pairwise(cu_seq_lens_k.tolist()), strict=True
    ):
        queries, keys = q_end - q_start, k_end - k_start
        mask = None  # one query (decode) sees every key; as many queries as keys: plain causal
        if 1 < queries < keys:  # a chunk after earlier tokens: causal, aligned to the end of the keys
            mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)[None, None]
        output, _ = sdpa_attention_forward(
            module,
            query[:, :, q_start:q_end],
            key[:, :, k_start:k_end],
            value[:, :, k_start:k_end],
            mask,
            is_causal=queries > 1,
            **kwargs,
        )
        outputs.append(output)  # [1, queries, heads, head_dim]
    return torch.cat(outputs, dim=1), None


def no_mask(*args, **kwargs) -> None:
    """The mask function for `PAGED_ATTENTION`: masks come from the request spans, not from here."""
    return None


AttentionInterface.register(PAGED_ATTENTION, paged_sdpa)
AttentionMaskInterface.register(PAGED_ATTENTION, no_mask)
