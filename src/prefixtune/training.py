"""Training on Hugging Face's `Trainer`.

Why `Trainer` and not a home-made loop: it already does what a trustworthy run needs and users
already know it: AdamW with warmup + decay, gradient accumulation and clipping, evaluation every N
steps, early stopping, best/latest checkpoints, exact resume (optimizer, scheduler, RNG states and
the data order: it skips the batches already seen), progress bars, and `torchrun` DDP/FSDP through
Accelerate with only rank 0 writing. `PrefixTrainer` changes only what is prefix-specific:

* checkpoints hold the prefix file (kilobytes), not the frozen base (hundreds of MB);
* a checkpoint counts only once its ``checkpoint_complete.json`` is written, last and atomically:
  ``--resume`` takes the newest complete one, so a run killed mid-save never resumes from half a
  checkpoint;
* evaluation can also generate on validation prompts and report BLEU per step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from .config import PrefixConfig
from .data import DEFAULT_TEMPLATE, DataError, PromptFormatter, group_references, pad_batch, read_examples
from .evaluation import generate_completions, score
from .files import atomic_write_text
from .loading import load_base_model
from .model import PrefixModel
from .plots import plot_history

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainOptions:
    """Everything `prefixtune train` takes (CLI flags and YAML keys have these names)."""

    data: str
    output: str
    model: str = "smollm2-135m"
    validation: str | None = None
    prefix_length: int | None = 10
    parameterization: str = "kv"
    init: str = "random"
    init_text: str | None = None
    mlp_hidden_size: int = 512
    dropout: float = 0.0
    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-3
    grad_accum: int = 1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_every: int = 50
    early_stopping_patience: int | None = None
    eval_generate: int = 0
    logging_steps: int = 5
    seed: int = 0
    resume: bool = False
    max_length: int = 256
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = False
    prompt_field: str | None = None
    completion_field: str | None = None
    prefix_name: str = "default"
    task_field: str | None = None
    encoder: bool = True
    decoder: bool = True
    cross: bool = True

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(
            prefix_length=self.prefix_length,
            parameterization=self.parameterization,
            mlp_hidden_size=self.mlp_hidden_size,
            init=self.init,
            init_text=self.init_text,
            dropout=self.dropout,
            encoder=self.encoder,
            decoder=self.decoder,
            cross=self.cross,
        )


class TokenizedExamples(Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


class PrefixTrainer(Trainer):
    """`Trainer` whose checkpoints are prefix files; see the module docstring. The private `Trainer`
    hooks it overrides are listed, with why, in `transformers_private.py`."""

    def __init__(
        self,
        *args: Any,
        prefix_names: list[str],
        multi_task: bool = False,
        prompt_format: dict[str, Any] | None = None,
        generation_eval=None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.prefix_names = prefix_names
        self.multi_task = multi_task
        self.prompt_format = prompt_format
        self.generation_eval = generation_eval

    def prefix_folder(self, folder: str | Path, name: str) -> Path:
        """One prefix: the folder itself; several (multi-task): ``<folder>/prefixes/<name>``."""
        return Path(folder) / "prefixes" / name if self.multi_task else Path(folder)

    def save_prefixes(self, folder: str | Path) -> None:
        for name in self.prefix_names:
            self.model.save_prefix(self.prefix_folder(folder, name), name, self.extra_fields())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:  # rank 0 only
            self.save_prefixes(output_dir or self.args.output_dir)

    def extra_fields(self) -> dict[str, Any]:
        """Saved beside the prefix, so evaluation and serving format prompts as training did."""
        return {"prompt_format": self.prompt_format} if self.prompt_format else {}

    def restore_prefixes(self, folder: str | Path) -> None:
        for name in self.prefix_names:
            self.model.restore_prefix(self.prefix_folder(folder, name), name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self.restore_prefixes(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.restore_prefixes(self.state.best_model_checkpoint)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"step": self.state.global_step}))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None and self.is_world_process_zero():
            generated = {f"eval_{key}": value for key, value in self.generation_eval().items()}
            self.log(generated)
            metrics.update(generated)
        return metrics


def latest_complete_checkpoint(output: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose completion marker exists (half-written ones are skipped)."""
    folder = Path(output)
    if not folder.is_dir():
        return None
    steps = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / COMPLETE_MARKER).is_file()
    ]
    return max(steps)[1] if steps else None


def _ddp_backend() -> str | None:
    """gloo on CPU, nccl on GPU, when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return "nccl" if torch.cuda.is_available() else "gloo"


def _check_output(options: TrainOptions) -> None:
    output = Path(options.output)
    if options.resume or not output.exists():
        return
    finished = (output / "prefix").exists() or (output / "prefixes").exists()
    if finished or any(CHECKPOINT_PATTERN.match(p.name) for p in output.iterdir()):
        raise FileExistsError(
            f"{output} already holds a training run; pass --resume to continue it, or choose another --output"
        )


def _tokenize(examples, formatter: PromptFormatter, max_length: int) -> TokenizedExamples:
    """Features per example; multi-task rows also carry the name of the prefix they train."""
    rows = []
    for example in examples:
        features = formatter.training_features(example, max_length)
        rows.append(features | {"prefix": example.task} if example.task else features)
    return TokenizedExamples(rows)


def _tasks(train_examples, validation_examples) -> list[str]:
    tasks = sorted({example.task for example in train_examples})
    for example in validation_examples or []:
        if example.task not in tasks:
            raise DataError(f"{example.where}: task {example.task!r} has no training rows (tasks: {tasks})")
    return tasks


def _collate(rows: list[dict[str, Any]], pad_token_id: int, side: str) -> dict[str, Any]:
    batch = pad_batch([{k: v for k, v in row.items() if k != "prefix"} for row in rows], pad_token_id, side)
    if "prefix" in rows[0]:
        batch["prefix"] = [row["prefix"] for row in rows]  # one prefix per row
    return batch


def train(options: TrainOptions) -> dict[str, Any]:
    """Train a prefix as `options` say; returns a summary (also written to ``train_summary.json``)."""
    # Read and check all input before creating or touching the output folder.
    fields = (options.prompt_field, options.completion_field, options.task_field)
    train_examples = read_examples(options.data, *fields)
    validation_examples = read_examples(options.validation, *fields) if options.validation else None
    multi_task = options.task_field is not None
    names = _tasks(train_examples, validation_examples) if multi_task else [options.prefix_name]
    _check_output(options)
    prefix_config = options.prefix_config()

    torch.manual_seed(options.seed)
    base, tokenizer = load_base_model(options.model)
    formatter = PromptFormatter(tokenizer, options.template, options.chat_template, base.config.is_encoder_decoder)
    train_set = _tokenize(train_examples, formatter, options.max_length)
    validation_set = _tokenize(validation_examples, formatter, options.max_length) if validation_examples else None

    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    for name in names:  # multi-task: one prefix per task, trained together in mixed batches
        model.add_prefix(name, prefix_config)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    generation_eval = None
    if validation_examples and options.eval_generate > 0:
        groups = group_references(validation_examples)[: options.eval_generate]

        def generation_eval() -> dict[str, float]:
            prefixes = [group.task or names[0] for group in groups]
            hypotheses = generate_completions(model, formatter, [group.prompt for group in groups], prefix=prefixes)
            return score(hypotheses, [group.references for group in groups], metrics=("bleu",))

    has_validation = validation_set is not None
    args = TrainingArguments(
        output_dir=options.output,
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=options.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=options.eval_every if has_validation else None,
        save_strategy="steps",
        save_steps=options.eval_every,
        save_total_limit=2,  # the latest and, with validation, the best
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False if has_validation else None,
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,
        label_names=["labels"],  # PrefixModel.forward takes **kwargs, so Trainer cannot find it by itself
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=_ddp_backend(),
        dataloader_num_workers=0,
    )
    callbacks = []
    if has_validation and options.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=options.early_stopping_patience))
    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=lambda rows: _collate(rows, tokenizer.pad_token_id, formatter.padding_side),
        callbacks=callbacks,
        prefix_names=names,
        multi_task=multi_task,
        prompt_format={"template": options.template, "chat_template": options.chat_template},
        generation_eval=generation_eval,
    )
    checkpoint = latest_complete_checkpoint(options.output) if options.resume else None
    if options.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", options.output)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started

    summary = {
        "options": asdict(options),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "best_eval_loss": trainer.state.best_metric,
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "seconds": seconds,
        "world_size": args.world_size,
    }
    if trainer.is_world_process_zero():
        output = Path(options.output)
        trainer.save_prefixes(output if multi_task else output / "prefix")
        history = trainer.state.log_history
        atomic_write_text(output / "log_history.json", json.dumps(history, indent=2))
        summary["plots"] = [str(path) for path in plot_history(history, output)]
        atomic_write_text(output / "train_summary.json", json.dumps(summary, indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary
