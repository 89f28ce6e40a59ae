"""``--packing``: a batch's rows concatenated into one row without padding, through transformers' own
packed-sequence path (`DataCollatorWithFlattening`: ``position_ids`` restart at 0 for every packed
sequence, no attention mask). transformers sees the restarts and masks attention block-diagonally,
so no sequence sees another's tokens; prefixtune shifts every position by the prefix length and
puts the prefix columns in front of every query row, so each packed sequence sees the prefix and
its own tokens at the positions it has unpacked. The loss is the same mean over the label tokens
of the batch as unpacked.

transformers takes the packed path only without a cache, so the batch carries ``use_cache=False``.
A model whose forward does not honour packed ``position_ids`` would silently mix sequences, so
`check_packing` compares packed and unpacked per-example losses on real rows before training and
refuses the run if they differ.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from .config import ConfigError
from .data import pad_batch

# relative, on per-example losses: float32 agrees to rounding; a bfloat16/float16 base rounds each
# forward's sums differently (4e-4 seen on a tiny Llama), far below what mixing sequences does
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-4}
HALF_TOLERANCE = 1e-2


class PackedCollator:
    """Rows -> one packed row ``[1, sum of lengths]`` with restarting ``position_ids``."""

    def __init__(self) -> None:
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_tensors="pt")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.flatten([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows])
        return dict(batch) | {"use_cache": False}  # transformers packs only without a cache


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy per position ``[B, T-1]`` (0 where the label is -100)."""
    shifted = labels[:, 1:].to(logits.device)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100, reduction="none"
    )
    return losses


def packed_example_losses(model: Any, rows: list[dict[str, Any]], prefix: str | None) -> list[float]:
    """Each row's mean loss, computed from one packed forward over all `rows`."""
    batch = PackedCollator()(rows)
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}, prefix=prefix)
    losses, labels = per_token_losses(logits.logits, batch["labels"])[0], batch["labels"][0, 1:]
    means, start = [], 0
    for row in rows:
        span = slice(start, start + len(row["input_ids"]) - 1)  # this row's next-token predictions
        counted = labels[span] != -100
        means.append((losses[span][counted.to(losses.device)].sum() / counted.sum()).item())
        start += len(row["input_ids"])
    return means


def padded_example_losses(model: Any, rows: list[dict[str, Any]], prefix: str | None, pad_id: int) -> list[float]:
    """Each row's mean loss from its own unpacked forward."""
    means = []
    for row in rows:
        batch = pad_batch([{"input_ids": row["input_ids"], "labels": row["labels"]}], pad_id)
        with torch.no_grad():
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}, prefix=prefix).logits
        losses, counted = per_token_losses(logits, batch["labels"])[0], batch["labels"][0, 1:] != -100
        means.append((losses[counted.to(losses.device)].sum() / counted.sum()).item())
    return means


def check_packing(model: Any, rows: list[dict[str, Any]], prefix: str | None, pad_id: int) -> None:
    """Refuse ``--packing`` unless packed and unpacked per-example losses agree on `rows`."""
    was_training = model.training
    model.eval()  # no dropout: the two forwards must be comparable
    try:
        packed = packed_example_losses(model, rows, prefix)
        unpacked = padded_example_losses(model, rows, prefix, pad_id)
    finally:
        model.train(was_training)
    tolerance = TOLERANCES.get(model.base_model.dtype, HALF_TOLERANCE)
    for index, (a, b) in enumerate(zip(packed, unpacked, strict=True)):
        if abs(a - b) > tolerance * max(1.0, abs(b)):
            name = type(model.base_model).__name__
            raise ConfigError(
                f"--packing: {name} mixes packed sequences (row {index}: packed loss {a:.6f}, unpacked {b:.6f}); "
                "its forward does not honour packed position_ids. Train without --packing."
            )
