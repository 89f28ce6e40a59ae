"""Per-token KL(teacher || student) on answer tokens.

Differs from the language-model loss of `train`: the target at each answer position is the
teacher's distribution, not one token. Stored with the samples are the teacher's top-k
log-probabilities (Cartridges keeps k = 20); the KL is summed over those k tokens,
``sum_i p_t(i) * (log p_t(i) - log p_s(i))`` with the student's log-softmax over the whole
vocabulary, so with k = vocabulary size it is the full KL exactly. With k smaller it is the
cross-entropy on the teacher's top k minus their part of the teacher's entropy: the same gradient
as a KL there, but the value can dip below 0 (the student may put more mass on those k tokens than
the teacher), so reports use `full_kl`. k = 0 means the full vocabulary, from teacher logits
computed on the fly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_kl(student_logits: Tensor, indices: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of the top-k KL.

    student_logits [B, T, V]; indices, logprobs [B, T, k] (the teacher's top-k at each position);
    mask [B, T] (True where position t predicts an answer token)."""
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, indices)  # [B, T, k]
    per_position = (logprobs.exp() * (logprobs - student)).sum(-1)  # [B, T]
    return _masked_mean(per_position, mask)


def full_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of the full-vocabulary KL; logits [B, T, V], mask [B, T]."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)  # [B, T]
    return _masked_mean(per_position, mask)


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's top-k (indices int64, log-probabilities float32), each [..., k]."""
    logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return indices, values


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
