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

`context_weights` (``--context-weight``): most answer tokens are ones the bare model predicts as
well as the teacher ("A: The ..."), and a plain mean spends most of the loss on them; the token
that carries a fact (" Lan" of "Lantern Line") is one position among fifteen, and a student can
reach a low mean KL while still getting exactly that token wrong. Weighting each position by how
far the context moves the teacher from the bare model there puts the loss where the context is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_kl(
    student_logits: Tensor, indices: Tensor, logprobs: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mean over masked positions of the top-k KL, each position times its weight if given.

    student_logits [B, T, V]; indices, logprobs [B, T, k] (the teacher's top-k at each position);
    mask [B, T] (True where position t predicts an answer token); weights [B, T]."""
    per_position = topk_kl_per_position(student_logits, indices, logprobs)  # [B, T]
    return _masked_mean(per_position if weights is None else per_position * weights, mask)


def topk_kl_per_position(logits: Tensor, indices: Tensor, logprobs: Tensor) -> Tensor:
    """[B, T]: the top-k KL of the teacher's (indices, logprobs [B, T, k]) to `logits` [B, T, V]."""
    other = torch.log_softmax(logits.float(), dim=-1).gather(-1, indices)  # [B, T, k]
    return (logprobs.exp() * (logprobs - other)).sum(-1)


def context_weights(bare_kl: list[Tensor], strength: float) -> list[Tensor]:
    """Per-position loss weights from each answer's top-k KL of the teacher to the bare model
    (``bare_kl``: one [A] tensor per answer): ``(1 - strength) + strength * kl / mean(kl)``, the
    mean over every answer token, so the weights average 1 and the loss keeps its scale."""
    mean = torch.cat(bare_kl).clamp_min(0.0).mean().clamp_min(1e-8)
    return [(1.0 - strength) + strength * kl.clamp_min(0.0) / mean for kl in bare_kl]


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


def answer_positions(width: int, answer: int) -> slice:
    """The columns of a left-padded row `width` wide that predict its last `answer` tokens."""
    return slice(width - answer - 1, width - 1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
