"""The check on held-out prompts: how close the student, the bare model and the truncated context
(the context's first P tokens as the prompt) come to the teacher.

Per variant: mean per-token KL(teacher || variant) over the full vocabulary on the teacher's answer
tokens, top-1 agreement with the teacher's most likely token there, and ROUGE-L (F1, x100) of the
variant's greedy output against the teacher's greedy answer. The truncated context runs as a prefix
of its own P tokens' activations, which is the same as those tokens in the prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table
from rouge_score import rouge_scorer

from ..data import PromptFormatter
from ..evaluation import generate_completions
from ..model import PrefixModel
from .loss import full_kl
from .prefixes import TEACHER
from .selfstudy import Sample
from .trainer import collate, distill_rows

VARIANT_LABELS = {"student": "student (prefix)", "bare": "bare model", "truncated": "truncated context"}


@torch.no_grad()
def agreement(model: PrefixModel, formatter: PromptFormatter, samples: list[Sample], prefix: str, batch_size: int):
    """(mean per-token KL to the teacher, top-1 agreement) of `prefix` ("" = bare) on the answers."""
    rows = distill_rows([Sample(s.prompt, s.answer_ids, s.kind) for s in samples], formatter)
    kl_sum = agree = tokens = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate(
            [rows[i] for i in range(start, min(start + batch_size, len(rows)))], formatter.tokenizer.pad_token_id
        )
        batch = {key: value.to(model.device) for key, value in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        teacher = model(**inputs, prefix=TEACHER).logits  # [B, W, V]
        names = [prefix] * len(batch["input_ids"])
        logits = model(**inputs, prefix=names).logits if prefix else _bare(model, inputs)
        mask = batch["answer_mask"]
        count = mask.sum().item()
        kl_sum += full_kl(logits, teacher, mask).item() * count
        agree += ((logits.argmax(-1) == teacher.argmax(-1)) & mask).sum().item()
        tokens += count
    return kl_sum / tokens, agree / tokens


def _bare(model: PrefixModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with model.disable_prefix():
        return model(**inputs).logits


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return 100 * sum(scores) / len(scores)


def evaluate_variants(
    model: PrefixModel,
    formatter: PromptFormatter,
    samples: list[Sample],
    variants: dict[str, str],
    max_new_tokens: int,
    batch_size: int,
    stop: str | None = None,
) -> dict[str, Any]:
    """The report's numbers for each variant (name -> prefix name, "" for the bare model); greedy
    outputs end at `stop` as the teacher's answers did."""
    tokenizer = formatter.tokenizer
    prompts = [s.prompt for s in samples]
    references = [tokenizer.decode(s.answer_ids, skip_special_tokens=True).strip() for s in samples]
    results: dict[str, Any] = {}
    for variant, prefix in variants.items():
        kl, top1 = agreement(model, formatter, samples, prefix, batch_size)
        outputs = generate_completions(
            model, formatter, prompts, prefix=prefix, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        outputs = [output.split(stop)[0] for output in outputs] if stop else outputs
        results[variant] = {"kl": kl, "top1_agreement": top1, "rougeL": rouge_l(outputs, references)}
    return results


def report_table(report: dict[str, Any]) -> Table:
    """The CLI's table: one row per variant, and the compression ratio in the title."""
    title = (
        f"distilled {report['context_tokens']} context tokens into P={report['prefix_length']} "
        f"({report['compression_ratio']:.1f}x), {report['held_out_prompts']} held-out prompts"
    )
    table = Table("", "KL to teacher", "top-1 agreement", "ROUGE-L vs teacher", title=title)
    for variant, label in VARIANT_LABELS.items():
        row = report["held_out"][variant]
        table.add_row(label, f"{row['kl']:.4f}", f"{row['top1_agreement']:.3f}", f"{row['rougeL']:.1f}")
    return table
