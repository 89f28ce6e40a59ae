"""`prefixtune distill`: make a prefix that stands for a context, check it, and write it.

The output folder is an ordinary prefix folder (``prefix.safetensors`` + ``prefix_config.json``
with the prompt format, so it loads, exports and serves like a trained one) plus
``distill_report.json``, ``log_history.json`` and ``loss.png``. It appears only when everything
is done: the run works in ``.<output>.distill-work`` beside it (checkpoints, for ``--resume``
after a kill), assembles the result in a temp folder and renames that into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ..config import ConfigError, PrefixConfig, option
from ..data import DEFAULT_TEMPLATE, PromptFormatter
from ..files import atomic_write_text
from ..loading import DEVICES, cache_dir, load_base_model, resolve_device
from ..model import PrefixModel
from ..plots import plot_history
from ..precision import DTYPE_CHOICES, dtype_name, resolve_dtype
from ..training import RunExistsError, latest_complete_checkpoint
from .context import check_fits, load_context
from .prefixes import add_prefix_from_ids, add_teacher, freeze_first_position
from .report import evaluate_variants
from .selfstudy import SEEDS, StudySettings, cache_key, cached_samples
from .trainer import DistillTrainer, add_context_weights, collate, distill_rows

logger = logging.getLogger(__name__)
REPORT_NAME = "distill_report.json"
TRUNCATED = "distill-truncated"


@dataclass
class DistillOptions:
    """Everything `prefixtune distill` takes (flags and YAML keys are these names)."""

    context: str = option(..., "The context to distil: a UTF-8 text file (handbook, style guide, system prompt).")
    output: str = option(..., "Output prefix folder (with distill_report.json and loss.png).")
    model: str = option("smollm2-135m", "Base model: local folder, hub id, or 'smollm2-135m'.")
    prefix_length: int = option(32, "Prefix positions P that replace the context.")
    parameterization: str = option("kv", "How the prefix is parameterized.", choices=("kv", "mlp", "hidden"))
    init: str = option(
        "activations",
        "Start from the context's first P tokens' activations, their embeddings, or noise.",
        choices=("activations", "vocab", "random"),
    )
    freeze_first: bool = option(False, "Keep the first prefix position fixed (an attention sink).", "--freeze-first")
    prompts: str | None = option(
        None, "Prompts to answer (one per line, or JSONL 'prompt'); default: the teacher writes them."
    )
    samples: int = option(256, "Self-study prompts to write (ignored with --prompts).")
    seed_kinds: str = option(
        ",".join(SEEDS),
        "Self-study: the prompt kinds the teacher writes, in turn (keys of selfstudy.SEEDS; ignored with --prompts).",
    )
    held_out: float = option(0.1, "Share of the prompts held out for the report.")
    top_k: int = option(
        20, "Teacher log-probabilities kept per answer token (0: full vocabulary, teacher runs each step)."
    )
    max_prompt_tokens: int = option(48, "Longest prompt the teacher writes.")
    max_answer_tokens: int = option(96, "Longest teacher answer.")
    answer_stop: str | None = option(
        None,
        "End each teacher answer at this text as well as at EOS (a blank line, $'\\n\\n', under a plain template).",
    )
    chunk_tokens: int = option(192, "Self-study: the context is cut into chunks of about this many tokens.")
    answer_with_chunk: bool = option(
        False,
        "Self-study: the teacher answers with the prompt's chunk quoted again before it (the student never sees it).",
        "--answer-with-chunk",
    )
    context_weight: float = option(
        0.0,
        "Weight each answer token's KL by how far the context moves the teacher from the bare model there: "
        "0 plain mean, 1 fully weighted (needs --top-k > 0).",
    )
    steps: int = option(200, "Optimizer steps.")
    batch_size: int = option(8, "Training batch size.")
    lr: float = option(2e-2, "Peak learning rate (AdamW, linear warmup and decay).")
    warmup_steps: int = option(10, "Linear warmup steps.")
    grad_accum: int = option(1, "Gradient accumulation steps.")
    template: str = option(DEFAULT_TEMPLATE, "Prompt template with {prompt} (the context goes before it).")
    chat_template: bool = option(
        False, "Use the tokenizer's chat template (the context is the system message).", "--chat-template"
    )
    dtype: str = option(
        "auto", "Precision of the frozen base (auto: bfloat16 where native, else float32).", choices=DTYPE_CHOICES
    )
    bf16: bool = option(False, "Mixed precision: bfloat16 autocast.", "--bf16")
    device: str = option("auto", "Where to run: a GPU when there is one (auto), cpu or cuda.", choices=DEVICES)
    gradient_checkpointing: bool = option(
        False, "Recompute the base's activations in backward.", "--gradient-checkpointing"
    )
    group_by_length: bool = option(False, "Batch rows of similar length together.", "--group-by-length")
    save_every: int = option(50, "Checkpoint every N steps (for --resume).")
    resume: bool = option(False, "Continue an interrupted run from its newest complete checkpoint.", "--resume")
    cache: str | None = option(None, "Folder for generated samples (default: <prefixtune cache>/distill).")
    generation_batch_size: int = option(16, "Rows per batch when the teacher generates.")
    seed: int = option(0, "Seed for self-study sampling, the held-out split, init and data order.")
    data_seed: int | None = option(
        None, "Seed for the order of the training batches only (default: --seed); samples and split stay --seed's."
    )
    prefix_name: str = option("default", "Name of the prefix in its folder.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.held_out < 1.0:
            raise ConfigError(f"--held-out: expected 0 <= share < 1, got {self.held_out}")
        for name in ("samples", "steps", "batch_size", "max_answer_tokens", "max_prompt_tokens", "prefix_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: expected >= 0, got {self.top_k}")
        if not 0.0 <= self.context_weight <= 1.0:
            raise ConfigError(f"--context-weight: expected 0 <= weight <= 1, got {self.context_weight}")
        if self.context_weight and not self.top_k:
            raise ConfigError("--context-weight: needs the teacher's stored top-k (--top-k > 0), got --top-k 0")
        if self.answer_with_chunk and self.prompts:
            raise ConfigError("--answer-with-chunk: a --prompts file's prompts come from no chunk of the context")
        if not all(kind in SEEDS for kind in self.kinds):
            raise ConfigError(f"--seed-kinds: expected comma-separated kinds of {list(SEEDS)}, got {self.seed_kinds!r}")

    @property
    def order_seed(self) -> int:
        """The seed of the training batches' order: --data-seed, else --seed."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind.strip() for kind in self.seed_kinds.split(","))

    @property
    def study(self) -> StudySettings:
        return StudySettings(
            self.samples if not self.prompts else 0,
            self.prompts,
            self.held_out,
            self.top_k,
            self.max_prompt_tokens,
            self.max_answer_tokens,
            self.answer_stop,
            self.chunk_tokens,
            self.answer_with_chunk,
            kinds=() if self.prompts else self.kinds,  # a prompts file's samples do not depend on them
            batch_size=self.generation_batch_size,
            seed=self.seed,
        )

    @property
    def prefix(self) -> PrefixConfig:
        text = "-" if self.init != "random" else None  # replaced by the context's first P tokens
        return PrefixConfig(
            prefix_length=self.prefix_length, parameterization=self.parameterization, init=self.init, init_text=text
        )


def work_folder(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.distill-work")


def _check_output(options: DistillOptions) -> Path:
    output, work = Path(options.output), work_folder(options.output)
    if output.exists():
        raise RunExistsError(f"{output} exists already; choose another --output")
    if work.exists() and not options.resume:
        raise RunExistsError(f"{work} holds an interrupted distill run; pass --resume to continue it, or delete it")
    return work


def _training_arguments(options: DistillOptions, work: Path, device: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        weight_decay=0.0,  # a frozen first position (--freeze-first) must not decay
        max_grad_norm=1.0,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=max(1, min(5, options.steps // 20)),
        eval_strategy="no",
        save_strategy="steps",
        save_steps=options.save_every,
        save_total_limit=1,
        # Trainer's own randomness here is the batch order alone (no dropout; the prefix is initialised
        # before): its seed too, since its length-grouped sampler draws from the seed, not data_seed
        seed=options.order_seed,
        data_seed=options.order_seed,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        use_cpu=device == "cpu",
        bf16=options.bf16,
        fp16=options.dtype == "float16",  # auto never resolves to float16
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _tokens_after_context(options: DistillOptions, formatter: PromptFormatter, context) -> int:
    """The most tokens the teacher reads after the context: a prompt and its answer, or (self-study)
    a seed instruction with its chunk and the prompt it writes."""
    if options.prompts:
        from .selfstudy import read_prompts

        longest = max(len(formatter.prompt_ids(p)) for p in read_prompts(options.prompts))
        return longest + options.max_answer_tokens
    from .selfstudy import REMINDER, chunks, seed_ids

    pieces = chunks(context, formatter.tokenizer, options.chunk_tokens)
    seeds = max(len(seed_ids(formatter, kind, piece)) for kind in options.kinds for piece in pieces)
    answer = _prompt_and_answer(formatter, options)
    if options.answer_with_chunk:  # the quoted chunk before the written prompt
        quote = max(len(formatter.prompt_ids(REMINDER.format(chunk=piece, prompt=""))) for piece in pieces)
        answer += quote - len(formatter.prompt_ids(""))
    return max(seeds + options.max_prompt_tokens, answer)


def _prompt_and_answer(formatter: PromptFormatter, options: DistillOptions) -> int:
    """A written prompt (at most `max_prompt_tokens`, plus the template's own tokens) and its answer."""
    return len(formatter.prompt_ids("")) + options.max_prompt_tokens + options.max_answer_tokens


def _train(
    options: DistillOptions, model: PrefixModel, rows, work: Path, device: str, prompt_format
) -> tuple[Any, Any, float]:
    trainer = DistillTrainer(
        model=model,
        args=_training_arguments(options, work, device),
        train_dataset=rows,
        data_collator=lambda batch: collate(batch, model.tokenizer.pad_token_id),
        student=options.prefix_name,
        prompt_format=prompt_format,
    )
    checkpoint = latest_complete_checkpoint(work) if options.resume else None
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, result, time.perf_counter() - started


def distill(options: DistillOptions | None = None, **fields: Any) -> dict[str, Any]:
    """Distil a context into a prefix, as `options` (or `DistillOptions` fields by keyword) say;
    returns the report (also written to ``distill_report.json``)."""
    options = options or DistillOptions(**fields)
    work = _check_output(options)
    if options.prompts:  # bad prompts files are refused before anything loads or is written
        from .selfstudy import read_prompts

        read_prompts(options.prompts)
    from .context import read_context

    read_context(options.context)
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    dtype, _ = resolve_dtype(options.dtype, device, autocast=options.bf16)
    base, tokenizer = load_base_model(options.model, dtype=dtype, device=device)
    formatter = PromptFormatter(tokenizer, options.template, options.chat_template)
    context = load_context(options.context, formatter)
    window = getattr(base.config, "max_position_embeddings", None)
    check_fits(context, window, _tokens_after_context(options, formatter, context), options.prefix_length)

    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    add_teacher(model, context.ids)
    settings = options.study
    folder = Path(options.cache or cache_dir() / "distill") / cache_key(
        model, dtype_name(dtype), context, formatter, settings
    )
    started = time.perf_counter()
    samples, from_cache = cached_samples(model, formatter, context, settings, folder)
    sample_seconds = time.perf_counter() - started
    train_samples = [s for s in samples if not s.held_out]
    held_out = [s for s in samples if s.held_out]

    add_prefix_from_ids(model, options.prefix_name, options.prefix, context.ids)
    if options.freeze_first:
        freeze_first_position(model, options.prefix_name)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    work.mkdir(parents=True, exist_ok=True)
    rows = distill_rows(train_samples, formatter)
    started = time.perf_counter()
    if options.context_weight:  # the bare model's pass over the training rows, once
        add_context_weights(model, rows, tokenizer.pad_token_id, options.context_weight, options.generation_batch_size)
    trainer, result, _ = _train(options, model, rows, work, device, formatter.saved)
    train_seconds = time.perf_counter() - started  # the weights' pass counts as training
    model.eval()
    truncated = PrefixConfig(prefix_length=options.prefix_length, init="activations", init_text="-")
    add_prefix_from_ids(model, TRUNCATED, truncated, context.ids)
    variants = {"student": options.prefix_name, "bare": "", "truncated": TRUNCATED}
    checks = (
        evaluate_variants(
            model,
            formatter,
            held_out,
            variants,
            options.max_answer_tokens,
            options.generation_batch_size,
            options.answer_stop,
        )
        if held_out
        else {}
    )
    report = {
        "options": asdict(options),
        "context": {"file": context.source, "sha256": context.sha256},
        "context_tokens": len(context.ids),
        "prefix_length": options.prefix_length,
        "compression_ratio": len(context.ids) / options.prefix_length,
        "samples": {
            "train": len(train_samples),
            "held_out": len(held_out),
            "cache": str(folder),
            "from_cache": from_cache,
        },
        "held_out_prompts": len(held_out),
        "held_out": checks,
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "seconds": {"samples": sample_seconds, "training": train_seconds},
        "trainable_parameters": sum(p.numel() for p in model.prefixes[options.prefix_name].parameters()),
    }
    _write_output(options, model, trainer, report, formatter, context)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _write_output(options, model: PrefixModel, trainer, report: dict[str, Any], formatter, context) -> None:
    """Assemble the output in a temp folder beside it, then rename it into place (all or nothing)."""
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        distilled = {"context_sha256": context.sha256, "context_tokens": len(context.ids)}
        extra = {"prompt_format": formatter.saved, "distilled_from": distilled}
        model.save_prefix(temp, options.prefix_name, extra)
        history = trainer.state.log_history
        atomic_write_text(temp / "log_history.json", json.dumps(history, indent=2))
        report["plots"] = [path.name for path in plot_history(history, temp)]
        atomic_write_text(temp / REPORT_NAME, json.dumps(report, indent=2))
        temp.chmod(0o755)
        temp.rename(output)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
