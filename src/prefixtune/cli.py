"""The `prefixtune` command: train, distill, eval, score, convert, generate, serve, demo (typer + rich).

Every command takes ``--config FILE.yaml`` whose keys are the command's option names (``prefix_length``
or ``prefix-length``); flags given on the command line win over the file. ``train``'s options are
generated from `TrainOptions` (its groups `DataArgs`, `TrainArgs`, `EvalArgs`, `LogArgs` and
`PrefixConfig` unnested) by `options_command`, which can host any other command whose options are a
dataclass.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .config import ConfigError, from_flat
from .data import DataError
from .distillation.run import DistillOptions
from .files import PrefixFileError, read_meta
from .injection import UnsupportedModelError
from .loading import DEVICES, ModelLoadError
from .names import PrefixNameError
from .precision import DTYPE_CHOICES, dtype_name
from .training import PREFIX_DIR, RunExistsError, TrainOptions

# The project's own errors for bad input: printed as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    PrefixFileError,
    PrefixNameError,
    UnsupportedModelError,
    ModelLoadError,
    RunExistsError,
)

app = typer.Typer(
    help="Prefix tuning for frozen Hugging Face language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _read_yaml_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager --config: load the YAML into click's default_map, so flags still override it."""
    if value is None:
        return value
    try:
        data = yaml.safe_load(Path(value).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise typer.BadParameter(f"{value}: cannot read YAML ({error})") from error
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name != "config"}
    data = {str(key).replace("-", "_"): item for key, item in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {unknown}; expected some of {sorted(known)}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


CONFIG = typer.Option(
    None,
    "--config",
    help="YAML file setting any of this command's options.",
    callback=_read_yaml_config,
    is_eager=True,
    exists=True,
    dir_okay=False,
)
MODEL = typer.Option("smollm2-135m", help="Base model: local folder, hub id, or 'smollm2-135m'.")
Dtype = Literal[DTYPE_CHOICES]  # the CLI offers exactly these choices
Device = Literal[DEVICES]
DTYPE = typer.Option("auto", help="Precision of the frozen base (auto: bfloat16 where it is native, else float32).")
DEVICE = typer.Option("auto", help="Where the base runs: a GPU when there is one (auto), cpu or cuda.")
MESSAGES_FIELD = typer.Option(None, help="Conversation field (default: messages, when there is no prompt field).")
SPLIT = typer.Option(None, help="Split of a folder or hub dataset (default train); files: a slice, train[:100].")


def _dataclass_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter with a `typer.Option` per field of `cls`, nested dataclasses unnested
    (``TrainOptions.prefix.prefix_length`` is ``--prefix-length``, ``TrainOptions.train.steps`` is
    ``--steps``): name, default and help come
    from the field (`prefixtune.config.option`)."""
    hints = get_type_hints(cls)
    parameters = []
    for item in fields(cls):
        if is_dataclass(hints[item.name]):
            parameters += _dataclass_parameters(hints[item.name])
            continue
        default = item.default if item.default is not MISSING else ...
        choices = item.metadata.get("choices")
        option = typer.Option(
            default,
            *item.metadata.get("flags", ()),
            help=item.metadata.get("help"),
            show_default=default is not ... and not isinstance(default, bool),
        )
        annotation = Literal[tuple(choices)] if choices else hints[item.name]
        parameters.append(
            inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        )
    return parameters


def options_command(cls: type) -> Callable[[Callable], Callable]:
    """Make ``function(options: cls)`` a command whose options (and ``--config`` YAML keys) are
    `cls`'s fields, as litgpt builds its CLI from config objects; one dataclass, no repeated list."""

    def decorate(function: Callable) -> Callable:
        def command(**values: Any) -> Any:
            values.pop("config", None)
            try:
                options = from_flat(cls, values, source=cls.__name__)
            except USER_ERRORS as error:
                _fail(error)
            return function(options)

        parameters = [
            *_dataclass_parameters(cls),
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=CONFIG, annotation=Path | None),
        ]
        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__name__, command.__doc__ = function.__name__, function.__doc__
        return command

    return decorate


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {Text(str(error))}")
    raise typer.Exit(2)


@app.command()
@options_command(TrainOptions)
def train(options: TrainOptions) -> None:
    """Train a prefix on a frozen base model (works under torchrun for DDP/FSDP)."""
    from .training import train as run_training

    try:
        summary = run_training(options)
    except USER_ERRORS as error:
        _fail(error)
    table = Table("", "value", title="trained prefix")
    for key in ("global_step", "train_loss", "best_eval_loss", "trainable_parameters", "seconds", "world_size"):
        table.add_row(key, str(summary.get(key)))
    padding = summary["padding_fraction"]
    table.add_row("padding (random / grouped batches)", f"{padding['random']:.1%} / {padding['grouped']:.1%}")
    console.print(table)
    for split, count in summary.get("dropped_long_rows", {}).items():
        if count:
            console.print(f"--drop-long: dropped {count} {split} rows longer than --max-length")
    for path in summary.get("prefixes", []):  # where this run's prefixes actually went
        console.print(Text(f"wrote {path}"), soft_wrap=True)


def _prompt_format(prefix_dir: str | None) -> dict[str, Any]:
    """The prompt format a prefix was trained with (saved beside it by `prefixtune train`; PEFT has none)."""
    from .peft_format import is_peft_folder

    stored = read_meta(prefix_dir).get("prompt_format") if prefix_dir and not is_peft_folder(prefix_dir) else None
    return stored if isinstance(stored, dict) else {}


def _formatter(base, tokenizer, stored: dict[str, Any], template: str | None, chat_template: bool | None):
    """Format prompts as given on the command line, else as the prefix was trained."""
    from .data import PromptFormatter

    return PromptFormatter.from_saved(tokenizer, stored, base.config.is_encoder_decoder, template, chat_template)


def _chat_for_conversations(groups, chat_template: bool | None) -> bool | None:
    """Conversations go through the chat template unless ``--no-chat-template`` says otherwise."""
    return True if chat_template is None and any(group.conversation for group in groups) else chat_template


def _prefix_name(item: str) -> tuple[str, str]:
    """``name=folder``, or a folder named after itself (its parent's name for a run's ``prefix/``)."""
    if "=" in item:
        name, folder = item.split("=", 1)
        return name, folder
    path = Path(item).resolve()
    return (path.parent.name if path.name == PREFIX_DIR else path.name), item


@app.command("eval")
def evaluate(
    data: str = typer.Option(
        ..., help="Evaluation data (any --data of train); rows sharing a prompt are its references."
    ),
    prefix: str | None = typer.Option(None, help="Prefix folder; omit to evaluate the bare base model."),
    model: str = MODEL,
    metrics: str = typer.Option("bleu,chrf,rouge", help="Comma-separated: bleu, sacrebleu, chrf, rouge, e2e."),
    num_beams: int = typer.Option(1),
    batch_size: int = typer.Option(16),
    max_new_tokens: int = typer.Option(64),
    limit: int | None = typer.Option(None, help="Evaluate only the first N prompts."),
    output: str | None = typer.Option(None, help="Folder for metrics.json and generations.jsonl."),
    template: str | None = typer.Option(None, help="Prompt template (default: the prefix's, else '{prompt}\\n')."),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template"),
    prompt_field: str | None = typer.Option(None),
    completion_field: str | None = typer.Option(None),
    messages_field: str | None = MESSAGES_FIELD,
    split: str | None = SPLIT,
    dtype: Dtype = DTYPE,
    device: Device = DEVICE,
    config: Path | None = CONFIG,
) -> None:
    """Generate for every distinct prompt (a conversation's turns before its last assistant turn) and
    score against all its references."""
    from .evaluation import generate_completions, score
    from .loading import load_base_model
    from .model import PrefixModel

    try:
        wanted, groups = _metrics_and_references(metrics, data, prompt_field, completion_field, messages_field, split)
        groups = groups[:limit]
        stored = _prompt_format(prefix)
        base, tokenizer = load_base_model(model, dtype=dtype, device=device)
        chat_template = _chat_for_conversations(groups, chat_template)
        formatter = _formatter(base, tokenizer, stored, template, chat_template)
        prefixed = (
            PrefixModel.from_pretrained(base, prefix, tokenizer)
            if prefix
            else PrefixModel(base, name=None, tokenizer=tokenizer)
        )
        prompts, references = [g.prompt for g in groups], [g.references for g in groups]
        hypotheses = generate_completions(
            prefixed,
            formatter,
            [g.model_input for g in groups],
            prefix=None if prefix else "",
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            show_progress=True,
        )
        results = score(hypotheses, references, wanted)
    except USER_ERRORS as error:
        _fail(error)
    # Default: beside the prefix folder (never inside it: it holds only the prefix files).
    default = Path(prefix).resolve().parent if prefix else Path("runs")
    folder = Path(output) if output else default / f"eval-{Path(data).stem}{'' if prefix else '-bare'}"
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "data": data,
        "prefix": prefix,
        "model": model,
        "num_beams": num_beams,
        "dtype": dtype_name(base.dtype),
        "prompts": len(prompts),
        "metrics": results,
        **_unavailable(results),
    }
    (folder / "metrics.json").write_text(json.dumps(report, indent=2))
    with (folder / "generations.jsonl").open("w") as handle:
        for prompt, hypothesis, refs in zip(prompts, hypotheses, references, strict=True):
            handle.write(json.dumps({"prompt": prompt, "generation": hypothesis, "references": refs}) + "\n")
    _print_metrics(results, f"{len(prompts)} prompts from {data}")
    console.print(f"wrote {folder / 'metrics.json'} and {folder / 'generations.jsonl'}")


def _metrics_and_references(
    metrics: str,
    data: str,
    prompt_field: str | None,
    completion_field: str | None,
    messages_field: str | None = None,
    split: str | None = None,
):
    """The checked metric names of ``--metrics`` and the data's reference groups (one per distinct prompt)."""
    from .data import group_references, read_examples
    from .evaluation import check_metrics

    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    check_metrics(wanted)
    examples = read_examples(data, prompt_field, completion_field, split=split, messages_field=messages_field)
    return wanted, group_references(examples)


def _unavailable(results: dict[str, float | None]) -> dict[str, Any]:
    """``{"unavailable": {metric: reason}}`` for metrics that could not be computed here, else ``{}``."""
    from .evaluation import unavailable

    reasons = unavailable(results)
    return {"unavailable": reasons} if reasons else {}


def _print_metrics(results: dict[str, float | None], title: str) -> None:
    table = Table("metric", "score", title=title)
    for key, value in results.items():
        table.add_row(key, "unavailable" if value is None else f"{value:.2f}")
    console.print(table)
    for key, reason in _unavailable(results).get("unavailable", {}).items():
        console.print(f"[yellow]{key} unavailable:[/] {Text(reason)}")


@app.command("score")
def score_predictions(
    data: str = typer.Option(..., help="References (.csv or .jsonl); rows sharing a prompt are its references."),
    predictions: str = typer.Option(
        ...,
        help="System outputs: generations.jsonl from `prefixtune eval` (matched by prompt), or .txt with one "
        "line per distinct prompt of --data in order of first appearance.",
    ),
    metrics: str = typer.Option("e2e", help="Comma-separated: e2e (the official five), sacrebleu, bleu, chrf, rouge."),
    output: str | None = typer.Option(None, help="Write the scores to this JSON file (e.g. metrics.json)."),
    prompt_field: str | None = typer.Option(None),
    completion_field: str | None = typer.Option(None),
    config: Path | None = CONFIG,
) -> None:
    """Score existing system outputs against multi-reference data (no model needed)."""
    from .evaluation import read_predictions, score
    from .files import atomic_write_text

    try:
        wanted, groups = _metrics_and_references(metrics, data, prompt_field, completion_field)
        hypotheses = read_predictions(predictions, [group.prompt for group in groups])
        results = score(hypotheses, [group.references for group in groups], wanted)
        if output:
            report = {**results, **_unavailable(results), "data": data, "predictions": predictions}
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output, json.dumps(report, indent=2))
    except USER_ERRORS as error:
        _fail(error)
    _print_metrics(results, f"{len(groups)} prompts from {data}")
    if output:
        console.print(f"wrote {output}")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Prefix folder: prefixtune's, or a PEFT prefix-tuning adapter."),
    destination: str = typer.Argument(..., help="New folder to write (must not exist yet)."),
    to: str = typer.Option(..., "--to", help="peft | prefixtune"),
    model: str = MODEL,
    config: Path | None = CONFIG,
) -> None:
    """Convert a prefix between prefixtune's files and PEFT's adapter format (mlp/hidden compiled to keys/values)."""
    from .loading import load_base_model
    from .model import PrefixModel

    try:
        if to not in ("peft", "prefixtune"):
            raise ConfigError(f"--to: expected 'peft' or 'prefixtune', got {to!r}")
        if Path(destination).exists():
            raise ConfigError(f"{destination}: exists already; convert writes a new folder")
        base, tokenizer = load_base_model(model, dtype="float32")  # compiled keys/values in full precision
        prefixed = PrefixModel(base, name=None, tokenizer=tokenizer)
        name = prefixed.load_prefix(source)
        stored = _prompt_format(source)
        extra = {"prompt_format": stored} if stored and to == "prefixtune" else None
        prefixed.save_prefix(destination, name, extra=extra, format=to)
    except USER_ERRORS as error:
        _fail(error)
    if stored and to == "peft":
        console.print(f"[yellow]note:[/] PEFT has no field for the prompt format {Text(json.dumps(stored))}")
    console.print(f"wrote {to} prefix {name!r} to {destination}")


@app.command()
def generate(
    prompt: list[str] = typer.Option([], help="Prompt text (repeatable)."),
    data: str | None = typer.Option(
        None, help="Also prompts from data (any --data of train; conversations: the turns before the last answer)."
    ),
    messages_field: str | None = MESSAGES_FIELD,
    split: str | None = SPLIT,
    limit: int = typer.Option(8, help="With --data: its first N distinct prompts."),
    prefix: list[str] = typer.Option([], help="Prefix folder, or name=folder (repeatable, compared side by side)."),
    model: str = MODEL,
    bare: bool = typer.Option(True, "--bare/--no-bare", help="Also show the bare base model."),
    max_new_tokens: int = typer.Option(64),
    num_beams: int = typer.Option(1),
    template: str | None = typer.Option(None, help="Prompt template (default: the first prefix's)."),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template"),
    dtype: Dtype = DTYPE,
    device: Device = DEVICE,
    config: Path | None = CONFIG,
) -> None:
    """Generate with one or more prefixes (one mixed batch) and show the outputs side by side."""
    from .evaluation import generate_completions
    from .loading import load_base_model
    from .model import PrefixModel

    try:
        inputs: list = list(prompt)
        if data:
            from .data import group_references, read_examples

            groups = group_references(read_examples(data, split=split, messages_field=messages_field))[:limit]
            inputs += [group.model_input for group in groups]
            chat_template = _chat_for_conversations(groups, chat_template)
        if not inputs:
            raise ConfigError("give --prompt (repeatable) or --data")
        named = [_prefix_name(item) for item in prefix]
        repeated = sorted({name for name, _ in named if [n for n, _ in named].count(name) > 1})
        if repeated:
            raise ConfigError(f"--prefix: the name(s) {repeated} are given twice; name them name=folder")
        stored = _prompt_format(named[0][1]) if named else {}
        base, tokenizer = load_base_model(model, dtype=dtype, device=device)
        prefixed = PrefixModel(base, name=None, tokenizer=tokenizer)
        for name, folder in named:
            prefixed.load_prefix(folder, name=name)
        columns = ([("bare", "")] if bare or not named else []) + [(name, name) for name, _ in named]
        formatter = _formatter(base, tokenizer, stored, template, chat_template)
        rows = [(p, choice) for p in inputs for _, choice in columns]
        texts = generate_completions(
            prefixed,
            formatter,
            [p for p, _ in rows],
            prefix=[c for _, c in rows],
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )
    except USER_ERRORS as error:
        _fail(error)
    table = Table("prompt", *[label for label, _ in columns], show_lines=True)
    for i, given in enumerate(inputs):
        shown = given if isinstance(given, str) else "\n".join(f"{m['role']}: {m['content']}" for m in given)
        table.add_row(Text(shown), *[Text(t) for t in texts[i * len(columns) : (i + 1) * len(columns)]])
    console.print(table)


@app.command()
@options_command(DistillOptions)
def distill(options: DistillOptions) -> None:
    """Distil a context (handbook, style guide, long system prompt) into a prefix that replaces it."""
    from .distillation import distill as run_distill
    from .distillation.report import report_table

    try:
        report = run_distill(options)
    except USER_ERRORS as error:
        _fail(error)
    if report["held_out"]:
        console.print(report_table(report))
    seconds = report["seconds"]
    console.print(f"samples {seconds['samples']:.1f} s, training {seconds['training']:.1f} s")
    console.print(Text(f"wrote {options.output}"), soft_wrap=True)


def _vllm_settings(model: str, prefix_store: str, dtype: str, **options: Any):
    """vLLM's settings for `serve --engine vllm`, checked before anything loads; ``auto`` resolves
    here, so vLLM and the base that compiles prefixes run in one precision."""
    import torch

    from .precision import resolve_dtype
    from .serving.vllm_engine import VLLMSettings, require_vllm

    require_vllm()
    from .vllm import KV_FOLDER, model_path

    resolved, _ = resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    kv_folder = str(Path(prefix_store) / KV_FOLDER)
    return VLLMSettings(model=model_path(model), kv_folder=kv_folder, dtype=dtype_name(resolved), **options)


@app.command()
def serve(
    prefix_store: str = typer.Option(..., help="Folder of prefixes, one subfolder per name."),
    model: str = MODEL,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    admin_token: str | None = typer.Option(
        None, envvar="PREFIXTUNE_ADMIN_TOKEN", help="Bearer token for the upload/delete endpoints (off without one)."
    ),
    engine: str = typer.Option(
        "auto", help="continuous | microbatch | vllm | auto (continuous unless encoder-decoder; vllm: setup.sh --vllm)."
    ),
    max_batch_size: int = typer.Option(16, help="Rows decoded together (vllm: its max_num_seqs)."),
    max_batch_tokens: int = typer.Option(256, help="Continuous engine: tokens per step (prefill chunk size)."),
    max_prompt_tokens: int = typer.Option(1024),
    max_tokens: int = typer.Option(256, help="Largest max_tokens a request may ask for."),
    max_upload_mb: float = typer.Option(64.0),
    max_queue: int = typer.Option(256, help="Waiting requests beyond which the server answers 429."),
    request_timeout: float | None = typer.Option(None, help="Seconds a request may take before it is cancelled (504)."),
    prefix_cache_mb: float | None = typer.Option(None, help="LRU budget for prefix keys/values in memory (MB)."),
    tensor_parallel_size: int = typer.Option(1, help="vllm: workers the model is split over (tensor parallelism)."),
    vllm_kv_cache_gb: float | None = typer.Option(None, help="vllm: KV cache size in GiB (CPU and GPU)."),
    gpu_memory_utilization: float | None = typer.Option(None, help="vllm on GPU: fraction of GPU memory it takes."),
    max_num_seqs: int | None = typer.Option(None, help="vllm: rows decoded together (default: --max-batch-size)."),
    max_model_len: int | None = typer.Option(
        None, help="vllm: prefix placeholders + prompt + output tokens per row (default: the model's window)."
    ),
    dtype: Dtype = DTYPE,
    device: Device = DEVICE,
    config: Path | None = CONFIG,
) -> None:
    """Serve the base model and every prefix in the store: OpenAI-style API and a playground at /."""
    import uvicorn

    from .loading import load_base_model
    from .serving import Limits, build_app

    vllm = None
    if engine == "vllm":
        try:
            vllm = _vllm_settings(
                model,
                prefix_store,
                dtype,
                tensor_parallel_size=tensor_parallel_size,
                kv_cache_gb=vllm_kv_cache_gb,
                gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs or max_batch_size,
                max_model_len=max_model_len,
            )
        except USER_ERRORS as error:
            _fail(error)
    try:  # with vLLM, the base here (the store's fingerprints, compiling prefixes) runs in vLLM's precision
        base, tokenizer = load_base_model(model, dtype=vllm.dtype if vllm else dtype, device="cpu" if vllm else device)
        limits = Limits(
            max_prompt_tokens=max_prompt_tokens,
            max_tokens=max_tokens,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_queue=max_queue,
            request_timeout=request_timeout,
        )
        cache_bytes = None if prefix_cache_mb is None else int(prefix_cache_mb * 1024 * 1024)
        server, running, store = build_app(
            base,
            tokenizer,
            prefix_store,
            admin_token=admin_token,
            limits=limits,
            max_batch_size=max_batch_size,
            engine=engine,
            model_id=model,
            prefix_cache_bytes=cache_bytes,
            max_batch_tokens=max_batch_tokens,
            vllm=vllm,
            close_at_shutdown=True,  # on SIGTERM/Ctrl-C too: vLLM shuts down, its compiled prefix files go
        )
    except USER_ERRORS as error:
        _fail(error)
    console.print(
        f"serving base + {len(store.names())} prefixes with the {running.name} engine on http://{host}:{port}"
    )
    uvicorn.run(server, host=host, port=port, log_level="warning")


@app.command()
def demo(
    output: str = typer.Option("runs/demo", help="Where data, prefix, plots and results go."),
    steps: int = typer.Option(60, help="Training steps (about 1.3 s each on 2 CPU cores)."),
    model: str = MODEL,
    dtype: Dtype = DTYPE,
    config: Path | None = CONFIG,
) -> None:
    """Train a prefix on generated table-to-text data and compare bare vs prefixed SmolLM2."""
    from .demo import run_demo

    try:
        run_demo(output, steps=steps, model=model, dtype=dtype)
    except USER_ERRORS as error:
        _fail(error)


def main() -> None:
    app()
