"""Training the student on the teacher's distributions with the project's `PrefixTrainer`.

Differs from `train` only in the loss: each row carries the teacher's top-k log-probabilities at its
answer positions (the collator lays them out beside the left-padded ids) and `DistillTrainer`
minimises the per-token KL(teacher || student) instead of the next-token loss; with ``top_k = 0`` the
teacher prefix runs on the same batch for the full-vocabulary KL. With ``--context-weight`` each
answer position's KL is weighted by how far the context moves the teacher from the bare model
there (`loss.context_weights`; the bare model's pass runs once, before training). Checkpoints, exact resume after
``kill -9``, bf16/fp16, gradient checkpointing and length-grouped batches are `PrefixTrainer`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..data import PromptFormatter, pad_batch
from ..training import PrefixTrainer
from .loss import answer_positions, context_weights, full_kl, topk_kl, topk_kl_per_position
from .prefixes import TEACHER
from .selfstudy import Sample


def distill_rows(samples: list[Sample], formatter: PromptFormatter) -> list[dict[str, Any]]:
    """Student rows: prompt ids (as the server sends them) + the teacher's answer, loss on the answer
    (a list is a map-style dataset to `Trainer`, length-grouped by its rows' ``input_ids``)."""
    rows = []
    for sample in samples:
        prompt = formatter.prompt_ids(sample.prompt)
        row = {"input_ids": prompt + sample.answer_ids, "labels": [-100] * len(prompt) + sample.answer_ids}
        if sample.topk_indices is not None:
            row |= {"topk_indices": sample.topk_indices, "topk_logprobs": sample.topk_logprobs}
        rows.append(row)
    return rows


def collate(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Left-padded ids plus ``answer_mask`` [B, W] (True where position t predicts an answer token) and
    the teacher's top-k laid out on those positions, ``topk_indices``/``topk_logprobs`` [B, W, k]."""
    batch = pad_batch([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_token_id, "left")
    width = batch["input_ids"].shape[1]
    labels = batch["labels"]  # [B, W], -100 outside the answers
    batch["answer_mask"] = torch.zeros_like(labels, dtype=torch.bool)
    batch["answer_mask"][:, :-1] = labels[:, 1:] != -100
    if "topk_indices" in rows[0]:
        k = rows[0]["topk_indices"].shape[-1]
        indices = torch.zeros(len(rows), width, k, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width, k)
        for i, row in enumerate(rows):
            span = answer_positions(width, row["topk_indices"].shape[0])
            indices[i, span], logprobs[i, span] = row["topk_indices"].long(), row["topk_logprobs"]
        batch |= {"topk_indices": indices, "topk_logprobs": logprobs}
    if "kl_weight" in rows[0]:
        weights = torch.zeros(len(rows), width)  # [B, W], on the answer positions
        for i, row in enumerate(rows):
            weights[i, answer_positions(width, len(row["kl_weight"]))] = row["kl_weight"]
        batch["kl_weight"] = weights
    return batch


@torch.no_grad()
def add_context_weights(model, rows: list[dict[str, Any]], pad_token_id: int, strength: float, batch_size: int):
    """Give each row ``kl_weight`` [A]: `context_weights` of the teacher's top-k KL to the bare model
    (the frozen base, no prefix) at each answer position."""
    bare_kl = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_token_id)
        device = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(input_ids=device["input_ids"], attention_mask=device["attention_mask"], prefix="").logits
        per_position = topk_kl_per_position(logits, device["topk_indices"], device["topk_logprobs"]).cpu()  # [B, W]
        for i, row in enumerate(rows[start : start + batch_size]):
            bare_kl.append(per_position[i, answer_positions(per_position.shape[1], row["topk_indices"].shape[0])])
    for row, weights in zip(rows, context_weights(bare_kl, strength), strict=True):
        row["kl_weight"] = weights


class DistillTrainer(PrefixTrainer):
    """`PrefixTrainer` with the KL loss (see the module docstring)."""

    def __init__(self, *args: Any, student: str, **kwargs: Any) -> None:
        super().__init__(*args, prefix_names=[student], **kwargs)
        self.student = student
        self.model_accepts_loss_kwargs = False  # the loss is a per-token mean already: Trainer divides by accumulation

    def compute_loss(self, model, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch=None):
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        outputs = model(input_ids=ids, attention_mask=attention, prefix=self.student)
        mask = inputs["answer_mask"]
        if "topk_indices" in inputs:
            weights = inputs.get("kl_weight")
            loss = topk_kl(outputs.logits, inputs["topk_indices"], inputs["topk_logprobs"], mask, weights)
        else:
            with torch.no_grad():
                teacher = model(input_ids=ids, attention_mask=attention, prefix=TEACHER).logits
            loss = full_kl(outputs.logits, teacher, mask)
        return (loss, outputs) if return_outputs else loss
