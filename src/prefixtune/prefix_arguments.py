"""Prefix -> forward keyword arguments: the one place that lays prefixes out for the attention hook.

A prefix covers some of the model's layers (`Prefix.layers`, model-wide indices) at its own length;
the forward call carries every layer for every row at one length (`PREFIX_KWARGS`, and for hybrid
models `STATE_KWARGS`, see `injection`). `PrefixArguments.row` lays one prefix out over all layers
(zeros and masked slots where it does not reach; None: no prefix at all), `PrefixArguments.batch`
stacks rows of those into one batch's arguments, padding shorter prefixes with masked slots.
Computed without autograd (``torch.no_grad()``), a row is detached: what a server admits a request
with. Nothing here looks at names: `PrefixModel.prefix_inputs` resolves them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from .injection import PREFIX_KWARGS, STATE_KWARGS, Geometry, KeyValuePath
from .parameterizations import Prefix

KEY_VALUES, MASK = PREFIX_KWARGS  # [.., layers, 2, kv_heads, P, head_dim], [.., layers, P]
CONV_STATES, RECURRENT_STATES = STATE_KWARGS  # [.., state_layers, conv_dim, K-1], [.., state_layers, v, k, v_dim]


class PrefixArguments:
    """One model's prefix arguments: its `Geometry`, its key/value path, and its input embeddings'
    dtype and device (read at each call: the model may be moved or cast)."""

    def __init__(self, geometry: Geometry, kv_path: KeyValuePath, model: PreTrainedModel) -> None:
        self.geometry = geometry
        self.kv_path = kv_path
        self.model = model

    def row(self, prefix: Prefix | None, length: int | None = None) -> dict[str, Tensor]:
        """One row's arguments for `prefix` (None: no prefix), `length` slots (default: its own):
        keys/values ``[layers, 2, kv_heads, length, head_dim]`` in the model's dtype, mask ``[layers,
        length]``; hybrid models also conv ``[state_layers, conv_dim, K-1]`` (model dtype) and recurrent
        ``[state_layers, v_heads, k_head_dim, v_head_dim]`` (float32, as the model keeps it) states,
        zeros when there is no prefix (the model's own start)."""
        length = (prefix.length if prefix is not None else 0) if length is None else length
        key_values, mask = self._key_values(prefix, length)
        row = {KEY_VALUES: key_values, MASK: mask}
        geometry = self.geometry
        if geometry.state_layers:
            states = None if prefix is None else prefix.states(self.kv_path)
            if states is None:  # no prefix, or one that does not cover the decoder
                device = mask.device
                conv = torch.zeros(geometry.state_layers, *geometry.conv_state_shape, device=device)
                states = conv, torch.zeros(geometry.state_layers, *geometry.recurrent_state_shape, device=device)
            row[CONV_STATES] = states[0].to(key_values.dtype)
            row[RECURRENT_STATES] = states[1].float()
        if not torch.is_grad_enabled():
            row = {key: value.detach() for key, value in row.items()}
        return row

    def batch(self, rows: Sequence[dict[str, Tensor] | None]) -> dict[str, Tensor]:
        """Rows' arguments (`row`, or None: no prefix) as one batch's ``[B, ...]``; shorter prefixes
        get masked slots up to the longest. One row object for every row is expanded, not copied."""
        first = rows[0]
        if first is not None and all(row is first for row in rows):
            return {key: value[None].expand(len(rows), *value.shape) for key, value in first.items()}
        longest = max((row[MASK].shape[-1] for row in rows if row is not None), default=0)
        empty = self.row(None, longest) if any(row is None for row in rows) else None
        padded = [empty if row is None else _pad_slots(row, longest) for row in rows]
        return {key: torch.stack([row[key] for row in padded]) for key in padded[0]}

    def _key_values(self, prefix: Prefix | None, length: int) -> tuple[Tensor, Tensor]:
        """A prefix's keys/values over all layers ``[layers, 2, kv_heads, length, head_dim]`` and mask
        ``[layers, length]``: zeros and False for layers it does not cover and slots past its length."""
        geometry = self.geometry
        weight = self.model.get_input_embeddings().weight  # cast once to the model's dtype, not per layer and step
        mask = torch.zeros(geometry.num_layers, length, dtype=torch.bool, device=weight.device)
        if prefix is None:
            shape = (geometry.num_layers, 2, geometry.kv_heads, length, geometry.head_dim)
            return torch.zeros(shape, dtype=weight.dtype, device=weight.device), mask
        key_values = prefix(self.kv_path).to(weight.dtype)
        layers = list(prefix.layers)
        mask[layers, : prefix.length] = True
        if len(layers) == geometry.num_layers and prefix.length == length:
            return key_values, mask
        full = key_values.new_zeros(geometry.num_layers, 2, geometry.kv_heads, length, geometry.head_dim)
        full[layers, :, :, : prefix.length] = key_values
        return full, mask


def _pad_slots(row: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """One row's arguments with masked zero slots up to `length` (states do not depend on it)."""
    key_values, mask = row[KEY_VALUES], row[MASK]  # [layers, 2, kv_heads, P, head_dim], [layers, P]
    extra = length - mask.shape[-1]
    if extra == 0:
        return row
    padding = key_values.new_zeros(*key_values.shape[:3], extra, key_values.shape[4])
    return row | {
        KEY_VALUES: torch.cat([key_values, padding], 3),
        MASK: torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1),
    }
