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
* evaluation can also generate on validation prompts and report BLEU per step;
* float16 (``--fp16`` or a float16 base) gets autocast and loss scaling on CPUs too, where
  Accelerate would silently skip both.

Precision (``--dtype`` for the frozen base, ``--bf16``/``--fp16`` autocast), length-grouped batches
(``--group-by-length``: `Trainer`'s sampler) and FSDP (``--fsdp``) are `TrainingArguments` settings;
trained prefixes are float32 master parameters whatever the base's precision.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

from .config import ConfigError, PrefixConfig, from_flat, option
from .conversations import TooLongError
from .data import (
    DEFAULT_TEMPLATE,
    DataError,
    Fields,
    PromptFormatter,
    example_from_record,
    group_references,
    located,
    pad_batch,
    padding_fractions,
    read_examples,
    read_source,
)
from .evaluation import generate_completions, score
from .files import atomic_write_text
from .loading import DEVICES, load_base_model, resolve_device
from .model import PrefixModel
from .packing import PackedCollator, check_packing
from .plots import plot_history
from .precision import DTYPE_CHOICES, dtype_name, resolve_dtype
from .progress import RichProgress
from .sources import Source, quiet
from .transformers_private import no_split_modules

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PREFIX_DIR, TASKS_DIR = "prefix", "prefixes"


class RunExistsError(FileExistsError):
    """The output folder holds a run already, and ``--resume`` was not given."""


def prefix_folder(folder: str | Path, name: str, multi_task: bool, checkpoint: bool = False) -> Path:
    """The one place that knows where a run keeps its prefixes: one prefix in ``<run>/prefix`` (in a
    checkpoint: the checkpoint folder itself); several (multi-task) in ``<folder>/prefixes/<name>``."""
    folder = Path(folder)
    if multi_task:
        return folder / TASKS_DIR / name
    return folder if checkpoint else folder / PREFIX_DIR


@dataclass
class DataArgs:
    """What the run trains and validates on, and how rows become tokens."""

    data: str = option(
        ..., "Training data: a save_to_disk folder, .parquet/.arrow/.jsonl/.json/.csv files or a glob, or a hub id."
    )
    validation: str | None = option(None, "Validation data, same kinds.")
    split: str | None = option(None, "Split of a folder or hub dataset (default train); files: a slice, train[:100].")
    max_length: int = option(
        256, "Longest tokenized example: prompt + completion is cut to it, a longer conversation refused."
    )
    drop_long: bool = option(False, "Leave out (and count) rows longer than --max-length instead.", "--drop-long")
    packing: bool = option(
        False, "Pack each batch's rows into one row without padding (per-sequence masks and positions).", "--packing"
    )
    template: str = option(DEFAULT_TEMPLATE, "Prompt template with {prompt}.")
    chat_template: bool = option(False, "Wrap prompts in the tokenizer's chat template.", "--chat-template")
    prompt_field: str | None = option(None, "Prompt field/column (default: prompt, or mr for CSV).")
    completion_field: str | None = option(None, "Completion field/column (default: completion, or ref).")
    messages_field: str | None = option(
        None, "Conversation field/column of role/content turns (default: messages, when there is no prompt)."
    )
    task_field: str | None = option(
        None, "Multi-task: this field names each row's prefix; all are trained together, saved to prefixes/."
    )


@dataclass
class TrainArgs:
    """The optimization: steps, batches, AdamW and its schedule, data order."""

    steps: int = option(200, "Optimizer steps.")
    batch_size: int = option(8, "Per-process batch size.")
    lr: float = option(5e-3, "Peak learning rate (AdamW, linear warmup and decay).")
    grad_accum: int = option(1, "Gradient accumulation steps.")
    warmup_steps: int = option(10, "Linear warmup steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    gradient_checkpointing: bool = option(
        False, "Recompute the base's activations in backward (less memory).", "--gradient-checkpointing"
    )
    group_by_length: bool = option(
        False, "Batch rows of similar length together (less padding; same rows per epoch).", "--group-by-length"
    )
    seed: int = option(0, "Seed for initialization and data order.")
    resume: bool = option(False, "Continue from the newest complete checkpoint.", "--resume")


@dataclass
class EvalArgs:
    """Validation: how often, when to stop early, whether to generate too."""

    eval_every: int = option(50, "Validate and checkpoint every N steps.")
    early_stopping_patience: int | None = option(None, "Stop after N validations without improvement.")
    eval_generate: int = option(0, "Also generate on N validation prompts at each validation (BLEU).")


@dataclass
class LogArgs:
    """What the run reports, and where."""

    logging_steps: int = option(5, "Log the training loss every N steps.")
    report_to: str = option(
        "none",
        "Where Trainer also reports: none, or comma-separated integrations (tensorboard, wandb, mlflow, ...; "
        "tensorboard logs to <output>/runs; offline modes by their own variables, e.g. WANDB_MODE=offline).",
    )

    def __post_init__(self) -> None:
        self.integrations()  # checked when the options are made, before anything runs

    def integrations(self) -> list[str]:
        """``--report-to`` as `TrainingArguments.report_to`; unknown or uninstalled ones are a `ConfigError`."""
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if names == ["none"] or names == ["all"]:
            return names
        unknown = sorted(set(names) - set(INTEGRATION_TO_CALLBACK))
        if unknown or not names:
            raise ConfigError(
                f"--report-to {self.report_to!r}: expected none, all or some of {sorted(INTEGRATION_TO_CALLBACK)}"
            )
        missing = sorted(set(names) - set(get_available_reporting_integrations()))
        if missing:
            raise ConfigError(f"--report-to: {missing} not installed here (pip install {' '.join(missing)})")
        return names


@dataclass
class TrainOptions:
    """Everything `prefixtune train` takes, in litgpt-style groups (`DataArgs`, `TrainArgs`, `EvalArgs`,
    `LogArgs`, `PrefixConfig`). The CLI flags and YAML keys are the fields' names, groups unnested
    (``--prefix-length``, ``--steps``), with these defaults and help; `from_flat` builds one from such
    flat names, as the CLI does."""

    output: str = option(..., "Output folder (prefix, checkpoints, plots).")
    dataset: DataArgs
    model: str = option("smollm2-135m", "Base model: local folder, hub id, or 'smollm2-135m'.")
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prefix_name: str = option("default", "Name of the trained prefix.")
    dtype: str = option(
        "auto", "Precision of the frozen base (auto: bfloat16 where native, else float32).", choices=DTYPE_CHOICES
    )
    bf16: bool = option(False, "Mixed precision: bfloat16 autocast through Trainer/Accelerate.", "--bf16")
    fp16: bool = option(False, "Mixed precision: float16 autocast, loss-scaled (implied by --dtype float16).", "--fp16")
    device: str = option("auto", "Where to train: a GPU when there is one (auto), cpu or cuda.", choices=DEVICES)
    fsdp: bool = option(False, "Under torchrun: shard the frozen base with FSDP (Accelerate) instead of DDP.", "--fsdp")
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    log: LogArgs = field(default_factory=LogArgs)

    def __post_init__(self) -> None:
        groups = {"dataset": DataArgs, "prefix": PrefixConfig, "train": TrainArgs, "eval": EvalArgs, "log": LogArgs}
        for name, cls in groups.items():  # from YAML/JSON: a group may come as a mapping
            if isinstance(getattr(self, name), dict):
                setattr(self, name, from_flat(cls, getattr(self, name), source=f"TrainOptions.{name}"))
        autocast = "bfloat16" if self.bf16 else "float16" if self.fp16 else None
        if (self.bf16 and self.fp16) or (autocast and self.dtype not in ("auto", "float32", autocast)):
            raise ConfigError(f"--dtype {self.dtype} --bf16={self.bf16} --fp16={self.fp16}: pick one precision")

    @classmethod
    def from_flat(cls, **values: Any) -> TrainOptions:
        """Options from flat names (``data=..., steps=..., prefix_length=...``; a group may also be given
        whole: ``prefix=PrefixConfig(...)``); unknown names are a `ConfigError`."""
        return from_flat(cls, values, source="TrainOptions")


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
        if self.args.fp16 and self.accelerator.scaler is None:
            # Accelerate gives float16 autocast and loss scaling only on GPUs; on a CPU it would
            # silently train without either (and a float16 base's gradients underflow). torch has
            # both on CPUs: switch them on. The scaler scales the loss in backward, unscales before
            # clipping, skips steps with inf/NaN gradients, and is checkpointed by Trainer.
            self.accelerator.native_amp = True
            self.accelerator.scaler = torch.amp.GradScaler(self.args.device.type)
        self.prefix_names = prefix_names
        self.multi_task = multi_task
        self.prompt_format = prompt_format
        self.generation_eval = generation_eval

    def save_prefixes(self, folder: str | Path, checkpoint: bool = True) -> list[Path]:
        """Save every prefix into a checkpoint folder, or (``checkpoint=False``) the run's folder."""
        return [
            self.model.save_prefix(prefix_folder(folder, name, self.multi_task, checkpoint), name, self.extra_fields())
            for name in self.prefix_names
        ]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:  # rank 0 only
            self.save_prefixes(output_dir or self.args.output_dir)

    def extra_fields(self) -> dict[str, Any]:
        """Saved beside the prefix, so evaluation and serving format prompts as training did."""
        return {"prompt_format": self.prompt_format} if self.prompt_format else {}

    def restore_prefixes(self, folder: str | Path) -> None:
        for name in self.prefix_names:
            self.model.restore_prefix(prefix_folder(folder, name, self.multi_task, checkpoint=True), name)

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


FSDP_ON_CPU = (
    "--fsdp needs GPUs: Accelerate 1.15 turns FSDP on only for multi-GPU runs; on CPUs (distributed type "
    "MULTI_CPU) Trainer would silently run plain DDP instead. torch's own FSDP2 (fully_shard) does run on "
    "CPU with gloo, but not through Trainer/Accelerate. Use torchrun without --fsdp (DDP) on CPUs."
)


def _fsdp_arguments(fsdp: bool, base: Any) -> dict[str, Any]:
    """`TrainingArguments` that shard the frozen base with FSDP2, one unit per decoder layer."""
    if not fsdp:
        return {}
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ConfigError("--fsdp shards the base over processes: launch with torchrun --nproc_per_node N (N > 1)")
    layers = no_split_modules(base)
    if not layers:
        raise ConfigError(f"--fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
    return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers}}


def _check_output(options: TrainOptions) -> None:
    output = Path(options.output)
    if options.train.resume or not output.exists():
        return
    finished = (output / PREFIX_DIR).exists() or (output / TASKS_DIR).exists()
    if finished or any(CHECKPOINT_PATTERN.match(p.name) for p in output.iterdir()):
        raise RunExistsError(
            f"{output} already holds a training run; pass --resume to continue it, or choose another --output"
        )


def _source(spec: str, data: DataArgs) -> tuple[Source, Fields]:
    return read_source(spec, data.prompt_field, data.completion_field, data.task_field, data.split, data.messages_field)


def _check_rows(spec: str, data: DataArgs) -> Fields:
    """Read every row of `spec` once (streaming from the memory-mapped table), before the model loads:
    a bad row is a `DataError` naming file, line and field."""
    source, fields = _source(spec, data)
    for index, record in enumerate(source.dataset):
        with located(source, index) as where:
            example_from_record(record, fields, where)
    return fields


def _tokenize(spec: str, data: DataArgs, formatter: PromptFormatter, workdir: Path) -> tuple[datasets.Dataset, int]:
    """`spec`'s rows as features (input_ids, labels, length; multi-task: the prefix each trains),
    memory-mapped in `workdir`, and how many rows ``--drop-long`` left out. Bad rows are `DataError`s
    naming file, line and field."""
    source, fields = _source(spec, data)

    def features(record: dict[str, Any], index: int) -> dict[str, Any]:
        with located(source, index) as where:
            example = example_from_record(record, fields, where)
            try:
                row = formatter.training_features(example, data.max_length, fields.messages or "messages")
            except TooLongError:
                if not data.drop_long:
                    raise
                row = {"input_ids": [], "labels": []}  # dropped below
        return row | {"length": len(row["input_ids"])} | ({"prefix": example.task} if example.task else {})

    with quiet():
        rows = source.dataset.map(
            features,
            with_indices=True,
            remove_columns=source.dataset.column_names,
            cache_file_name=str(workdir / f"{uuid.uuid4().hex}.arrow"),  # never into the user's dataset folder
            new_fingerprint=uuid.uuid4().hex,  # fresh: the tokenizer is not part of datasets' cache key
        )
        kept = rows.filter(lambda row: row["length"] > 0, cache_file_name=str(workdir / f"{uuid.uuid4().hex}.arrow"))
    return kept, len(rows) - len(kept)


def _tasks(train_set: datasets.Dataset, validation_set: datasets.Dataset | None, validation: str | None) -> list[str]:
    tasks = sorted(set(train_set["prefix"]))
    unknown = sorted(set(validation_set["prefix"]) - set(tasks)) if validation_set is not None else []
    if unknown:
        raise DataError(f"{validation}: task(s) {unknown} have no training rows (tasks: {tasks})")
    return tasks


def _collate(rows: list[dict[str, Any]], pad_token_id: int, side: str) -> dict[str, Any]:
    batch = pad_batch([{k: v for k, v in row.items() if k != "prefix"} for row in rows], pad_token_id, side)
    if "prefix" in rows[0]:
        batch["prefix"] = [row["prefix"] for row in rows]  # one prefix per row
    return batch


@dataclass
class Run:
    """A training run set up and ready to fit: what `setup` builds, `fit` runs and `summarize` reads."""

    options: TrainOptions
    trainer: PrefixTrainer
    train_set: datasets.Dataset
    checkpoint: Path | None  # the complete checkpoint --resume continues from
    dropped: dict[str, int]  # rows --drop-long left out, per data source
    dtype: str  # what --dtype (auto by default) resolved to on this device
    dtype_reason: str  # and why


def _generation_eval(model: PrefixModel, formatter: PromptFormatter, examples, count: int, names: list[str]):
    """BLEU of generations on the first `count` validation prompts, for `PrefixTrainer.evaluate`."""
    if not examples or count <= 0:
        return None
    groups = group_references(examples)[:count]

    def generation_eval() -> dict[str, float]:
        prefixes = [group.task or names[0] for group in groups]
        prompts = [group.model_input for group in groups]
        hypotheses = generate_completions(model, formatter, prompts, prefix=prefixes)
        return score(hypotheses, [group.references for group in groups], metrics=("bleu",))

    return generation_eval


def _training_arguments(options: TrainOptions, device: str, has_validation: bool, base: Any) -> TrainingArguments:
    """`Trainer`'s arguments for these options: schedule, evaluation and checkpoints, precision, DDP/FSDP."""
    train, evaluation = options.train, options.eval
    return TrainingArguments(
        output_dir=options.output,
        max_steps=train.steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=options.log.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=evaluation.eval_every if has_validation else None,
        save_strategy="steps",
        save_steps=evaluation.eval_every,
        save_total_limit=2,  # the latest and, with validation, the best
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False if has_validation else None,
        seed=train.seed,
        data_seed=train.seed,
        remove_unused_columns=False,
        label_names=["labels"],  # PrefixModel.forward takes **kwargs, so Trainer cannot find it by itself
        report_to=options.log.integrations(),
        disable_tqdm=True,  # RichProgress shows the run instead of tqdm and printed log dicts
        include_num_input_tokens_seen="non_padding",  # for its tokens/s
        use_cpu=device == "cpu",
        bf16=options.bf16,
        fp16=options.fp16 or base.dtype == torch.float16,  # a float16 base needs loss scaling
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        ddp_backend=_ddp_backend(),
        dataloader_num_workers=0,
        **_fsdp_arguments(options.fsdp, base),
    )


def setup(options: TrainOptions, workdir: Path) -> Run:
    """Check the data, load the base, tokenize the data (memory-mapped in `workdir`), check the output
    folder (a data error leaves it untouched), add the prefixes and build the `PrefixTrainer`."""
    data = options.dataset
    device = resolve_device(options.device)  # Trainer places the model (on each rank's own GPU)
    if options.fsdp and device == "cpu":
        raise ConfigError(FSDP_ON_CPU)
    fields = _check_rows(data.data, data)  # bad data fails before the model loads
    if data.validation:
        _check_rows(data.validation, data)
    dtype, dtype_reason = resolve_dtype(options.dtype, device, autocast=options.bf16 or options.fp16)
    torch.manual_seed(options.train.seed)
    base, tokenizer = load_base_model(options.model, dtype=dtype)
    chat = data.chat_template or fields.messages is not None  # conversations always go through the chat template
    formatter = PromptFormatter(tokenizer, data.template, chat, base.config.is_encoder_decoder)
    train_set, dropped = _tokenize(data.data, data, formatter, workdir)
    validation_set, validation_dropped = (None, 0)
    if data.validation:
        validation_set, validation_dropped = _tokenize(data.validation, data, formatter, workdir)
    if not len(train_set):
        raise DataError(f"{data.data}: --drop-long left no rows (all {dropped} are longer than --max-length)")
    multi_task = data.task_field is not None
    names = _tasks(train_set, validation_set, data.validation) if multi_task else [options.prefix_name]
    _check_output(options)

    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    for name in names:  # multi-task: one prefix per task, trained together in mixed batches
        model.add_prefix(name, options.prefix)  # float32 master parameters, cast where they meet the base
    if options.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    has_validation = validation_set is not None
    callbacks = []
    if has_validation and options.eval.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=options.eval.early_stopping_patience))
    generation_examples = _generation_examples(data) if has_validation and options.eval.eval_generate > 0 else None
    trainer = PrefixTrainer(
        model=model,
        args=_training_arguments(options, device, has_validation, base),
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=_collator(options, model, formatter, train_set, names),
        callbacks=callbacks,
        prefix_names=names,
        multi_task=multi_task,
        prompt_format=formatter.saved,
        generation_eval=_generation_eval(model, formatter, generation_examples, options.eval.eval_generate, names),
    )
    trainer.remove_callback(PrinterCallback)  # Trainer's print(logs) under disable_tqdm
    trainer.add_callback(RichProgress())
    if options.fsdp and not trainer.is_fsdp_enabled:  # never fall back to DDP silently
        raise ConfigError(FSDP_ON_CPU)
    checkpoint = latest_complete_checkpoint(options.output) if options.train.resume else None
    if options.train.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", options.output)
    dropped_rows = {"train": dropped, "validation": validation_dropped}
    return Run(options, trainer, train_set, checkpoint, dropped_rows, dtype_name(dtype), dtype_reason)


def _collator(
    options: TrainOptions, model: PrefixModel, formatter: PromptFormatter, train_set: datasets.Dataset, names: list[str]
):
    """Padded batches, or with ``--packing`` packed ones (checked exact on this model first)."""
    tokenizer = formatter.tokenizer
    if not options.dataset.packing:
        return lambda rows: _collate(rows, tokenizer.pad_token_id, formatter.padding_side)
    if model.base_model.config.is_encoder_decoder:
        raise ConfigError("--packing packs decoder-only sequences; this model is encoder-decoder")
    if options.dataset.task_field is not None:
        raise ConfigError("--packing with --task-field: a packed row holds several rows but takes one prefix")
    check_packing(model, [train_set[i] for i in range(min(4, len(train_set)))], names[0], tokenizer.pad_token_id)
    return PackedCollator()


def _generation_examples(data: DataArgs) -> list:
    fields = (data.prompt_field, data.completion_field, data.task_field, data.split, data.messages_field)
    return read_examples(data.validation, *fields)


def fit(run: Run) -> tuple[Any, float]:
    """Train (from the checkpoint `run` resumes, if any); `Trainer`'s result and the seconds it took."""
    started = time.perf_counter()
    result = run.trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    return result, time.perf_counter() - started


def summarize(run: Run, result: Any, seconds: float) -> dict[str, Any]:
    """The run's summary; rank 0 also saves the prefixes, the log history, its plots and
    ``train_summary.json``."""
    options, trainer = run.options, run.trainer
    args = trainer.args
    summary = {
        "options": asdict(options),
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        "dtype": run.dtype,  # what --dtype (auto by default) resolved to on this device, and why
        "dtype_reason": run.dtype_reason,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "best_eval_loss": trainer.state.best_metric,
        "trainable_parameters": sum(p.numel() for p in trainer.model.trainable_parameters()),
        "seconds": seconds,
        "world_size": args.world_size,
        "dropped_long_rows": run.dropped,
        # one epoch's padding with random and with length-grouped batches (this run used the one
        # --group-by-length says)
        "padding_fraction": padding_fractions(
            run.train_set["length"],
            args.train_batch_size,
            options.train.seed,
            args.train_batch_size * options.train.grad_accum,
        ),
    }
    if trainer.is_world_process_zero():
        output = Path(options.output)
        summary["prefixes"] = [str(path) for path in trainer.save_prefixes(output, checkpoint=False)]
        history = trainer.state.log_history
        atomic_write_text(output / "log_history.json", json.dumps(history, indent=2))
        summary["plots"] = [str(path) for path in plot_history(history, output)]
        atomic_write_text(output / "train_summary.json", json.dumps(summary, indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def train(options: TrainOptions) -> dict[str, Any]:
    """Train a prefix as `options` say; returns a summary (also written to ``train_summary.json``)."""
    Path(datasets.config.HF_DATASETS_CACHE).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="prefixtune-", dir=datasets.config.HF_DATASETS_CACHE))
    try:  # the tokenized data lives (memory-mapped) in workdir for the run, then goes
        run = setup(options, workdir)
        result, seconds = fit(run)
        return summarize(run, result, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
