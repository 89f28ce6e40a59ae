"""Evaluation: batched generation (greedy or beam) and corpus metrics against several references
per prompt: sacreBLEU and chrF (multi-reference), ROUGE-1/2/L (rouge-score, best reference), and the
E2E challenge's official five (`e2e_metrics.py`).

Metric names and the keys they write: ``bleu`` -> ``bleu`` (sacreBLEU), ``sacrebleu`` -> ``sacrebleu``
(the same, under a name that cannot clash), ``chrf`` -> ``chrf``, ``rouge`` -> ``rouge1/2/L``,
``e2e`` -> ``bleu nist meteor rouge_l cider`` (``None`` where unavailable, e.g. METEOR without Java).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sacrebleu
from rich.progress import Progress
from rouge_score import rouge_scorer

from . import e2e_metrics
from .config import ConfigError
from .data import DataError, PromptFormatter, jsonl_records, pad_batch
from .model import PrefixChoice, PrefixModel

METRICS = ("bleu", "sacrebleu", "chrf", "rouge", "e2e")


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
    if {"bleu", "e2e"} <= set(metrics):
        raise ConfigError(
            "metrics 'bleu' (sacreBLEU) and 'e2e' would both write the key 'bleu'; "
            "ask for 'sacrebleu' to get sacreBLEU beside the official E2E BLEU"
        )


def score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf", "rouge")
) -> dict[str, float | None]:
    """Corpus scores; ``references[i]`` holds every reference for hypothesis i."""
    check_metrics(metrics)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    most = max(len(refs) for refs in references)
    # sacreBLEU takes reference streams; prompts with fewer references pad with None.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    results: dict[str, float | None] = {}
    for name in ("bleu", "sacrebleu"):
        if name in metrics:
            results[name] = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    if "chrf" in metrics:
        results["chrf"] = sacrebleu.corpus_chrf(list(hypotheses), streams).score
    if "rouge" in metrics:
        kinds = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
        best = [scorer.score_multi(list(refs), hyp) for hyp, refs in zip(hypotheses, references, strict=True)]
        for kind in kinds:  # F1 against the best-matching reference, averaged over prompts
            results[kind] = 100 * sum(scores[kind].fmeasure for scores in best) / len(best)
    if "e2e" in metrics:
        results.update(e2e_metrics.e2e_scores(hypotheses, references)[0])
    return results


def unavailable(results: dict[str, float | None]) -> dict[str, str]:
    """Why each metric that came back as None could not be computed here."""
    reason = e2e_metrics.java_missing_reason() or "not computable here"
    return {key: reason for key, value in results.items() if value is None}


def read_predictions(path: str | Path, prompts: Sequence[str]) -> list[str]:
    """One system output per prompt, in the order of `prompts`.

    ``.jsonl``: objects with ``prompt`` and ``generation`` (what ``prefixtune eval`` writes), matched
    by prompt; every prompt needs exactly one. ``.txt``: one line per prompt, in order (the E2E
    challenge's system-output format).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line; it does not start another
        if len(lines) != len(prompts):
            raise DataError(
                f"{path}: {len(lines)} lines, expected {len(prompts)} (one per distinct prompt of the data, in order)"
            )
        return [line.strip() for line in lines]
    if suffix != ".jsonl":
        raise DataError(f"{path}: unsupported predictions format {suffix!r}; expected .jsonl or .txt")
    by_prompt: dict[str, str] = {}
    for where, record in jsonl_records(path):
        fields = [record.get("prompt"), record.get("generation")]
        if not all(isinstance(value, str) for value in fields):
            raise DataError(f"{where}: expected string fields 'prompt' and 'generation', got {fields}")
        prompt, generation = (value.strip() for value in fields)
        if prompt in by_prompt:
            raise DataError(f"{where}: a second prediction for prompt {prompt!r}")
        by_prompt[prompt] = generation
    missing = [prompt for prompt in prompts if prompt not in by_prompt]
    extra = sorted(set(by_prompt) - set(prompts))
    if missing or extra:
        raise DataError(
            f"{path}: predictions do not match the data's prompts: {len(missing)} prompt(s) without a prediction "
            f"{missing[:3]}, {len(extra)} prediction(s) for prompts not in the data {extra[:3]}"
        )
    return [by_prompt[prompt] for prompt in prompts]
