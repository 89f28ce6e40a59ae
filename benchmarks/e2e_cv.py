"""E2E quality by K-fold cross-validation over MR-disjoint folds of train.csv, several seeds per
setting: the protocol that chooses the E2E recipe and measures the baselines beside it.

How it differs from `e2e_quality.py` (one split, one seed, scored on the 53 validation MRs it also
selected on): every selection here is made on held-out folds of `train.csv` only; `validation.csv`
is read once, after the recipe is chosen, as its final check.

Folds (deterministic, independent of row order): the distinct MRs of train.csv sorted by the
SHA-256 of their text, MR number i goes to fold i mod K, so every reference of an MR is in one
fold. For fold k the model trains on the other folds' rows, except an inner fold (the
`--inner-fraction` of those MRs first by SHA-256 of "inner:" + MR) whose loss drives early stopping
and best-of-N; every setting leaves the inner fold out, whether it uses it or not, so all train on
the same rows. Each run decodes its held-out fold's MRs (the first `--eval-limit` if set).

Score of a setting for one seed: corpus sacreBLEU (multi-reference) over the hypotheses of all K
held-out folds pooled (every train MR scored once); the official E2E BLEU beside it. Reported: mean,
standard deviation (n - 1) and standard error over the seeds, with seconds per training step and
trainable parameters.

Stages (each a list of runs = setting x fold x seed; resume skips the runs already in `runs*.jsonl`):
1. baselines: `e2e_grid.BASELINES`, one budget (steps x batch) and the same seeds for all.
2. levers: each `e2e_grid.LEVERS` value on the best of ours kv / mlp / hidden.
3. recipe: `select_recipe`'s choice (see there), through the same folds and seeds.
4. final: the recipe trained on all of train.csv (inner fold left out), scored on validation.csv.

The recipe's cross-validated score is measured on the folds that also chose it, so it is optimistic;
the final check on validation.csv is the honest estimate, and the goal compares the two.

    .venv/bin/python benchmarks/e2e_cv.py --quick                      # tiny random model, seconds
    .venv/bin/python benchmarks/e2e_cv.py --device cuda --dtype float32  # the protocol (scripts/gpu_quality.sh)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from e2e_grid import BASELINES, LEVERS, OURS, QUICK_LEVERS, Setting, lever_settings
from e2e_run import Budget, train_and_decode
from prefixtune.data import Example, PromptFormatter, group_references, read_examples
from prefixtune.e2e_metrics import bleu as official_bleu
from prefixtune.evaluation import score
from prefixtune.precision import cpu_record

STAGES = ("baselines", "levers", "recipe", "final")


# --------------------------------------------------------------------------- folds
def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mr_folds(examples: list[Example], k: int) -> dict[str, int]:
    """MR -> fold: the distinct MRs sorted by SHA-256 of their text, the i-th in fold i mod k."""
    mrs = sorted({e.prompt for e in examples}, key=digest)
    if len(mrs) < k:
        raise ValueError(f"{len(mrs)} distinct MRs cannot fill {k} folds")
    return {mr: rank % k for rank, mr in enumerate(mrs)}


def inner_mrs(mrs: set[str], fraction: float) -> set[str]:
    """The inner fold: the first ceil(fraction x n) of `mrs` by SHA-256 of "inner:" + MR."""
    return set(sorted(mrs, key=lambda mr: digest("inner:" + mr))[: math.ceil(fraction * len(mrs))])


@dataclass
class Split:
    """One outer fold: training rows, inner-fold rows, and the held-out MRs with their references."""

    train: list[dict]
    inner: list[dict]
    prompts: list[str]
    references: list[list[str]]


def split(examples: list[Example], held_out: set[str], protocol: Protocol, formatter: PromptFormatter) -> Split:
    """Train on the MRs not in `held_out`, minus the inner fold; decode (the first eval_limit of) `held_out`."""
    inner = inner_mrs({e.prompt for e in examples} - held_out, protocol.inner_fraction)
    rows = [formatter.training_features(e, 128) for e in examples if e.prompt not in held_out | inner]
    inner_rows = [formatter.training_features(e, 128) for e in examples if e.prompt in inner]
    groups = group_references([e for e in examples if e.prompt in held_out])[: protocol.eval_limit]
    return Split(rows, inner_rows[: protocol.inner_rows], [g.prompt for g in groups], [g.references for g in groups])


# --------------------------------------------------------------------------- protocol and its results
@dataclass
class Protocol:
    """Everything runs depend on besides their setting, fold and seed (`protocol.json`): a folder's runs
    are resumed only under the same protocol. Not the levers tried: no run depends on them, so a folder
    adds levers as it adds baselines, session by session (the summary records those its selection saw)."""

    folds: int
    seeds: list[int]
    steps: int
    batch_size: int
    max_new_tokens: int
    eval_limit: int | None
    inner_fraction: float
    inner_rows: int
    train_sha256: str
    dtype: str
    device: str
    quick: bool

    def budget(self, eval_batch_size: int) -> Budget:
        return Budget(self.steps, self.batch_size, self.max_new_tokens, eval_batch_size, self.device)


class Store:
    """The runs so far, one JSON line each in `runs*.jsonl` (a file per shard), and the protocol they
    belong to (`protocol.json`; a different protocol in the same folder is refused, not mixed)."""

    def __init__(self, folder: Path, protocol: Protocol, shard: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.file = folder, folder / f"runs-{shard.replace('/', 'of')}.jsonl"
        header, wanted = folder / "protocol.json", asdict(protocol)
        if header.exists() and json.loads(header.read_text()) != wanted:
            raise SystemExit(
                f"{header}: these results belong to another protocol {json.loads(header.read_text())}, "
                f"not {wanted}: use another --output"
            )
        header.write_text(json.dumps(wanted, indent=2))
        self.runs: dict[str, dict] = {}
        for path in sorted(folder.glob("runs*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.runs[row["key"]] = row
        self.trained = 0  # runs this process trained (the rest were resumed)

    def append(self, row: dict) -> None:
        with self.file.open("a") as out:
            out.write(json.dumps(row) + "\n")
        self.runs[row["key"]] = row
        self.trained += 1


def run_key(setting: Setting, fold: int | str, seed: int) -> str:
    return f"{setting.key()}/fold-{fold}/seed-{seed}"


def seed_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    return {
        "sacrebleu": score(hypotheses, references, ("sacrebleu",))["sacrebleu"],
        "official_bleu": official_bleu(hypotheses, references),
    }


def spread(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "std": std, "se": std / math.sqrt(len(values)), "n": len(values)}


def summarize(setting: Setting, runs: dict[str, dict], protocol: Protocol, folds: list[int | str]) -> dict | None:
    """Mean/std/SE over seeds of the pooled held-out BLEU; None until every fold x seed run is in."""
    keys = {(f, s): run_key(setting, f, s) for f in folds for s in protocol.seeds}
    if any(key not in runs for key in keys.values()):
        return None
    per_seed = []
    for seed in protocol.seeds:
        rows = [runs[keys[fold, seed]] for fold in folds]
        per_seed.append(
            seed_scores([h for r in rows for h in r["hypotheses"]], [x for r in rows for x in r["references"]])
        )
    rows = [runs[key] for key in keys.values()]
    return {
        "setting": asdict(setting),
        "sacrebleu": spread([s["sacrebleu"] for s in per_seed]),
        "official_bleu": spread([s["official_bleu"] for s in per_seed]),
        "per_seed": per_seed,
        "trainable_parameters": rows[0]["trainable_parameters"],
        "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in rows),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in rows),
        "steps_done": statistics.fmean(r["steps_done"] for r in rows),
        "mrs_scored": sum(len(r["hypotheses"]) for r in rows) // len(protocol.seeds),
        "cpu_capabilities": sorted({r.get("cpu_capability", "not recorded") for r in rows}),
    }


# --------------------------------------------------------------------------- selection (train folds only)
def better(candidate: dict, incumbent: dict) -> bool:
    """The candidate's mean beats the incumbent's by more than the standard error of the difference."""
    a, b = candidate["sacrebleu"], incumbent["sacrebleu"]
    return a["mean"] - b["mean"] > math.sqrt(a["se"] ** 2 + b["se"] ** 2)


def best_parameterization(baselines: dict[str, dict]) -> str:
    """The name of ours kv / mlp / hidden with the highest cross-validated mean."""
    ours = {name: row for name, row in baselines.items() if row["setting"]["method"] in OURS}
    return max(ours, key=lambda name: ours[name]["sacrebleu"]["mean"])


def select_recipe(base: Setting, base_row: dict, levers: dict[str, list[dict]]) -> tuple[Setting, dict]:
    """The recipe: `base` with, per lever, its best value's changes if that value is `better` than the
    base (mean gain > SE of the difference); otherwise the base's value stays. Where two kept levers
    change the same field, the larger gain wins. Given only cross-validation rows: no validation data.
    Returns (recipe, the decision per lever)."""
    decisions, kept = {}, []
    base_fields = asdict(base)
    for lever, rows in levers.items():
        best = max(rows, key=lambda row: row["sacrebleu"]["mean"])
        gain = best["sacrebleu"]["mean"] - base_row["sacrebleu"]["mean"]
        changes = {k: v for k, v in best["setting"].items() if v != base_fields[k]}
        decisions[lever] = {"best": changes, "gain": gain, "kept": better(best, base_row)}
        if decisions[lever]["kept"]:
            kept.append((gain, changes))
    recipe: dict = {}
    for _, changes in sorted(kept, key=lambda item: item[0]):  # larger gains last: they win a shared field
        recipe.update(changes)
    return base.changed(**recipe), decisions


# --------------------------------------------------------------------------- running the stages
class Incomplete(Exception):
    """A stage's runs are not all in the store (other shards still at work on them)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass
class Context:
    """What every run needs: the protocol, the frozen base, the data and where results go."""

    protocol: Protocol
    store: Store
    pristine: torch.nn.Module
    formatter: PromptFormatter
    examples: list[Example]
    shard: tuple[int, int]  # (index, count): this process runs job i of a stage when i % count == index
    eval_batch_size: int
    splits: dict[int, Split] = field(default_factory=dict)

    def fold_split(self, fold: int) -> Split:
        if fold not in self.splits:
            assignment = mr_folds(self.examples, self.protocol.folds)
            held_out = {mr for mr, f in assignment.items() if f == fold}
            self.splits[fold] = split(self.examples, held_out, self.protocol, self.formatter)
            gc.freeze()  # the Trainer's gc.collect() at every run then skips the data (~1 s a run here)
        return self.splits[fold]


def run_jobs(context: Context, jobs: list[tuple[Setting, int | str, int, Split]], stage: str) -> None:
    """Train and score this shard's share of `jobs` that are not in the store yet, appending each."""
    index, count = context.shard
    for number, (setting, fold, seed, data) in enumerate(jobs):
        key = run_key(setting, fold, seed)
        if number % count != index or key in context.store.runs:
            continue
        print(f"[{stage}] {number + 1}/{len(jobs)} {setting.method} {key}", flush=True)
        output = tempfile.mkdtemp(prefix="e2e_cv-trainer-")  # the Trainer's output_dir; it saves nothing there
        row = train_and_decode(
            setting,
            context.pristine,
            context.formatter,
            data.train,
            data.inner,
            data.prompts,
            context.protocol.budget(context.eval_batch_size),
            seed,
            output,
        )
        shutil.rmtree(output, ignore_errors=True)
        context.store.append(
            {
                "key": key,
                "stage": stage,
                "setting": asdict(setting),
                "fold": fold,
                "seed": seed,
                "references": data.references,
                "prompts": data.prompts,
                **row,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # s/step differs by machine
                "load_average_1m": os.getloadavg()[0],  # at the run's end: others' load inflates s/step
            }
        )


def cross_validate(context: Context, settings: dict[str, Setting], stage: str) -> dict[str, dict]:
    """Every setting through every fold and seed; their summaries (all must be complete)."""
    folds = list(range(context.protocol.folds))
    jobs = [
        (s, f, seed, context.fold_split(f)) for s in settings.values() for f in folds for seed in context.protocol.seeds
    ]
    run_jobs(context, jobs, stage)
    summaries = {name: summarize(s, context.store.runs, context.protocol, folds) for name, s in settings.items()}
    missing = [name for name, row in summaries.items() if row is None]
    if missing:
        raise Incomplete(stage, f"stage {stage!r}: runs of {missing} are not done yet")
    return summaries


def final_check(context: Context, recipe: Setting, validation: str) -> dict:
    """The chosen recipe trained on all of train.csv (inner fold left out), scored on validation.csv:
    the only place validation.csv is read."""
    examples = read_examples(validation)
    data = split(context.examples, set(), context.protocol, context.formatter)
    groups = group_references(examples)  # all of them: --eval-limit caps the folds only
    data.prompts, data.references = [g.prompt for g in groups], [g.references for g in groups]
    fold = "validation-" + digest(Path(validation).read_text())[:12]
    run_jobs(context, [(recipe, fold, seed, data) for seed in context.protocol.seeds], "final")
    row = summarize(recipe, context.store.runs, context.protocol, [fold])
    if row is None:
        raise Incomplete("final", "stage 'final': runs not done yet")
    return {**row, "validation": validation, "mrs": len(groups)}


def lora_decoded_like(recipe: Setting) -> Setting:
    """LoRA r=8 as the goal compares it: the baseline's training, decoded as the recipe decodes (a
    recipe that kept beam search is not compared with a greedy LoRA); the baseline itself when greedy."""
    return BASELINES["PEFT LoRA r=8"].changed(num_beams=recipe.num_beams)


def goals(lora: dict, recipe_row: dict, final: dict | None) -> dict:
    """The issue's two goals, computed: recipe >= LoRA r=8 (decoded alike) by more than the SE of the
    difference, and the recipe's cross-validated estimate within 2 BLEU of its validation score."""
    result = {"recipe_beats_lora_by_more_than_se": better(recipe_row, lora)}
    if final is not None:
        gap = recipe_row["sacrebleu"]["mean"] - final["sacrebleu"]["mean"]
        result |= {"cv_minus_validation": gap, "cv_within_2_bleu_of_validation": abs(gap) <= 2}
    return result


def run_protocol(
    context: Context, validation: str, stages: list[str], levers: dict[str, list[dict]], baselines: dict[str, Setting]
) -> dict:
    """The stages in order; the summary of those done."""
    summary: dict = {"protocol": asdict(context.protocol), "stages_done": []}
    baselines = cross_validate(context, baselines, "baselines")
    summary |= {"baselines": baselines, "stages_done": ["baselines"]}
    if "levers" not in stages:
        return summary
    base_name = best_parameterization(baselines)
    base = BASELINES[base_name]
    tried, skipped = lever_settings(base, levers)
    flat = {f"{lever}/{i}": s for lever, settings in tried.items() for i, s in enumerate(settings)}
    measured = cross_validate(context, flat, "levers")  # all levers' runs first, then any shard may stop
    lever_rows = {lever: [measured[f"{lever}/{i}"] for i in range(len(tried[lever]))] for lever in tried}
    recipe, decisions = select_recipe(base, baselines[base_name], lever_rows)
    summary |= {
        "recipe_base": base_name,
        "levers": lever_rows,
        "levers_skipped": skipped,
        "decisions": decisions,
        "recipe": asdict(recipe),
        "stages_done": ["baselines", "levers"],
    }
    if "recipe" not in stages:
        return summary
    rows = cross_validate(context, {"recipe": recipe, "lora": lora_decoded_like(recipe)}, "recipe")
    recipe_row = rows["recipe"]
    summary |= {"recipe_cv": recipe_row, "lora_decoded_like_recipe": rows["lora"]}
    summary["stages_done"].append("recipe")
    final = final_check(context, recipe, validation) if "final" in stages else None
    summary |= {"final_check": final, "goals": goals(rows["lora"], recipe_row, final)}
    if final is not None:
        summary["stages_done"].append("final")
    return summary


def table(summary: dict) -> str:
    """Markdown: one row per baseline (and the recipe), mean ± std (SE) over seeds."""
    lines = [
        "| setting | sacreBLEU mean ± std (SE) | official BLEU mean | seeds | s/step | train s | trainable | CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = dict(summary.get("baselines", {}))
    if "recipe_cv" in summary:
        rows["recipe (cross-validated)"] = summary["recipe_cv"]
    if summary.get("final_check"):
        rows["recipe on validation.csv (final check)"] = summary["final_check"]
    for name, row in rows.items():
        b = row["sacrebleu"]
        lines.append(
            f"| {name} | {b['mean']:.2f} ± {b['std']:.2f} ({b['se']:.2f}) | {row['official_bleu']['mean']:.2f} "
            f"| {b['n']} | {row['seconds_per_step']:.3f} | {row['train_seconds']:.1f} "
            f"| {row['trainable_parameters']:,} | {', '.join(row.get('cpu_capabilities', []))} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Time to quality: each setting's mean BLEU (± SE over seeds) against its mean training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**summary.get("baselines", {}), **({"recipe": summary["recipe_cv"]} if "recipe_cv" in summary else {})}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, row in rows.items():
        bleu = row["sacrebleu"]
        axes.errorbar(row["train_seconds"], bleu["mean"], yerr=bleu["se"], marker="o", capsize=3, label=name)
    axes.set(xlabel="training seconds per run (steps only)", ylabel="cross-validated sacreBLEU (± SE)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# --------------------------------------------------------------------------- models and the command line
def quick_base(examples: list[Example]):
    """A tiny random Llama and a word-level tokenizer over the data's words (no download, seconds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    words = sorted(
        {w for e in examples for text in (e.prompt, e.completion) for w, _ in splitter.pre_tokenize_str(text)}
    )
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {word: i + 3 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def device_record(device: str, dtype: str) -> dict:
    record = {"device": device, "dtype": dtype, "cpu": cpu_record()}
    if device == "cuda":
        record["cuda"] = {"name": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
    return record


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="E2E: K-fold cross-validation over MR-disjoint folds of train.csv")
    parser.add_argument("--train", default="../shared/data/e2e/train.csv")
    parser.add_argument("--validation", default="../shared/data/e2e/validation.csv", help="final check only")
    parser.add_argument("--output", default="benchmarks/results/e2e_cv")
    parser.add_argument("--folds", type=int, default=None, help="K (default 5; --quick: 2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-limit", type=int, default=None, help="decode only the first N MRs of each fold")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--inner-fraction", type=float, default=0.1)
    parser.add_argument("--inner-rows", type=int, default=256, help="at most this many inner-fold rows")
    parser.add_argument(
        "--baselines",
        default=None,
        help="a slice: these e2e_grid.BASELINES only (past --stages baselines it needs LoRA and one of ours)",
    )
    parser.add_argument(
        "--levers",
        default=None,
        help="comma-separated subset of e2e_grid.LEVERS (default: all; 'none': the base is the recipe)",
    )
    parser.add_argument("--stages", default="final", choices=STAGES, help="run the stages up to this one")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shard", default="0/1", help="i/N: run job j of each stage when j %% N == i")
    parser.add_argument("--note", default="", help="stored in summary.json (e.g. 'a slice, not the protocol')")
    parser.add_argument("--quick", action="store_true", help="tiny random model, tiny budget: checks it all runs")
    args = parser.parse_args(argv)
    args.folds = args.folds or (2 if args.quick else 5)
    shard = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not shard or int(shard[1]) >= int(shard[2]):
        parser.error(f"--shard: expected i/N with 0 <= i < N, got {args.shard!r}")
    if args.folds < 2:
        parser.error(f"--folds: expected at least 2, got {args.folds}")
    if args.quick:
        args.steps, args.batch_size, args.max_new_tokens = min(args.steps, 4), min(args.batch_size, 4), 8
        args.eval_limit = min(args.eval_limit or 2, 2)
        args.inner_rows = min(args.inner_rows, 16)
    return args


def grid_of(args: argparse.Namespace) -> tuple[dict[str, Setting], dict[str, list[dict]]]:
    """The baselines and levers asked for (every one by default), or a clear error."""
    grid = QUICK_LEVERS if args.quick else LEVERS
    baselines = args.baselines.split(",") if args.baselines else list(BASELINES)
    levers = [] if args.levers == "none" else args.levers.split(",") if args.levers else list(grid)
    for option, names, known in (("--baselines", baselines, BASELINES), ("--levers", levers, grid)):
        if set(names) - set(known):
            raise SystemExit(f"{option}: unknown {sorted(set(names) - set(known))}; expected some of {list(known)}")
    selecting = args.stages != "baselines"
    if (
        args.baselines
        and selecting
        and not ("PEFT LoRA r=8" in baselines and {BASELINES[n].method for n in baselines} & set(OURS))
    ):
        raise SystemExit(
            "--baselines: a slice that goes past --stages baselines needs 'PEFT LoRA r=8' (the goal's reference) "
            f"and one of ours (the recipe's base); got {baselines}"
        )
    return {name: BASELINES[name] for name in baselines}, {name: grid[name] for name in levers}


def make_context(args: argparse.Namespace, levers: dict[str, list[dict]]) -> Context:
    """The protocol from the arguments, the frozen base (tiny with --quick), the data and the store."""
    examples = read_examples(args.train)
    protocol = Protocol(
        args.folds,
        [int(s) for s in args.seeds.split(",")],
        args.steps,
        args.batch_size,
        args.max_new_tokens,
        args.eval_limit,
        args.inner_fraction,
        args.inner_rows,
        digest(Path(args.train).read_text()),
        args.dtype,
        args.device,
        args.quick,
    )
    if len(protocol.seeds) < 2:
        raise SystemExit("--seeds: at least two (a standard deviation over seeds needs them; the protocol uses 3)")
    if args.quick:
        pristine, tokenizer = quick_base(examples)
        pristine = pristine.to(device=args.device, dtype=getattr(torch, args.dtype))
    else:
        from prefixtune import load_base_model

        pristine, tokenizer = load_base_model("smollm2-135m", dtype=args.dtype, device=args.device)
    shard = tuple(int(x) for x in args.shard.split("/"))
    store = Store(Path(args.output), protocol, args.shard)
    return Context(protocol, store, pristine, PromptFormatter(tokenizer), examples, shard, args.eval_batch_size)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    baselines, levers = grid_of(args)
    context = make_context(args, levers)
    store, count = context.store, context.shard[1]
    stages = list(STAGES[: STAGES.index(args.stages) + 1])
    try:
        summary = run_protocol(context, args.validation, stages, levers, baselines)
    except Incomplete as error:
        if count > 1 and error.stage == args.stages:  # this shard's share of its stage is done
            print(f"shard {args.shard}: its {store.trained} runs of stage {args.stages!r} done; others still running")
            return {"trained_now": store.trained}
        raise SystemExit(f"{error} (an earlier stage's shards not finished?)") from error
    record = device_record(args.device, args.dtype)
    summary |= {"note": args.note, "record": record, "trained_now": store.trained, "runs": len(store.runs)}
    summary["baselines_slice"] = list(baselines) if args.baselines else None  # None: every e2e_grid.BASELINES
    summary["levers_tried"] = list(levers)
    if count == 1:  # shards write their runs only; one process (count 1) writes the summary
        (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(summary, Path(args.output) / "bleu_vs_train_seconds.png")
    print(table(summary))
    print(
        f"{store.trained} runs trained now, {len(store.runs) - store.trained} already there; "
        f"stages done: {summary['stages_done']}"
    )
    return summary


if __name__ == "__main__":
    main()
