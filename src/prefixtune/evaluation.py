"""Evaluation: batched generation (greedy or beam) and corpus metrics against several references
per prompt: sacreBLEU and chrF (multi-reference) and ROUGE-1/2/L (rouge-score, best reference)."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rich.progress import Progress
from rouge_score import rouge_scorer

from .config import ConfigError
from .data import PromptFormatter, pad_batch
from .model import PrefixChoice, PrefixModel

METRICS = ("bleu", "chrf", "rouge")


def generate_completions(
    model: PrefixModel,
    formatter: PromptFormatter,
    prompts: Sequence[str],
    prefix: PrefixChoice = None,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    show_progress: bool = False,
) -> list[str]:
    """One completion per prompt. ``prefix=""`` generates with the bare base model."""
    was_training = model.training
    model.eval()
    try:
        return _generate(model, formatter, prompts, prefix, batch_size, num_beams, max_new_tokens, show_progress)
    finally:
        model.train(was_training)


def _generate(model, formatter, prompts, prefix, batch_size, num_beams, max_new_tokens, show_progress) -> list[str]:
    tokenizer = formatter.tokenizer
    outputs: list[str] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows = [{"input_ids": formatter.prompt_ids(p)} for p in chunk]
            batch = pad_batch(rows, tokenizer.pad_token_id, formatter.padding_side)
            batch = {key: value.to(model.device) for key, value in batch.items()}
            names = prefix if isinstance(prefix, str) or prefix is None else list(prefix[start : start + batch_size])
            tokens = model.generate(
                **batch,
                prefix=names,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            # decoder-only outputs repeat the prompt; encoder-decoder outputs are all new
            new_tokens = tokens if formatter.encoder_decoder else tokens[:, batch["input_ids"].shape[1] :]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.advance(task, len(chunk))
    return outputs


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ConfigError(f"unknown metric(s) {unknown}; expected some of {list(METRICS)}")


def score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """Corpus scores; ``references[i]`` holds every reference for hypothesis i."""
    check_metrics(metrics)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    most = max(len(refs) for refs in references)
    # sacreBLEU takes reference streams; prompts with fewer references pad with None.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    results: dict[str, float] = {}
    if "bleu" in metrics:
        results["bleu"] = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    if "chrf" in metrics:
        results["chrf"] = sacrebleu.corpus_chrf(list(hypotheses), streams).score
    if "rouge" in metrics:
        kinds = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
        best = [scorer.score_multi(list(refs), hyp) for hyp, refs in zip(hypotheses, references, strict=True)]
        for kind in kinds:  # F1 against the best-matching reference, averaged over prompts
            results[kind] = 100 * sum(scores[kind].fmeasure for scores in best) / len(best)
    return results
