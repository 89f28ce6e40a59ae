"""E2E NLG quality under one training budget: prefixtune against every usual baseline, on ONE split.

Single split, one seed: it trains on train.csv and scores the 53 validation MRs, the same MRs its
numbers were compared on when the E2E recipe was chosen, so its scores are not an estimate for
unseen data (issue 23). Selection and the baselines' comparison with seeds and standard errors are
`e2e_cv.py` (K-fold cross-validation over MR-disjoint folds of train.csv); this script stays for its
`--time-curve` and for comparison with the older results.

Every trained method gets the same data (`--train`, default ../shared/data/e2e/train.csv), order,
batch, number of steps, prompt format ("{mr}\\n" + completion + EOS, loss on the completion) and
the same Hugging Face `Trainer` loop (AdamW, linear warmup + decay); only the learning rate is the
usual one for each method. Evaluation: greedy decoding of every distinct MR of `--eval` (default
validation.csv), multi-reference sacreBLEU and the E2E challenge's official five (BLEU, NIST,
METEOR, ROUGE-L, CIDEr, as its measure_scores.py computes them; see `prefixtune/e2e_metrics.py`),
printed under Li & Liang's own numbers for context. BLEU is also measured on a subset at a few
steps, so "steps to reach a target BLEU" can be read off `bleu_vs_steps.png`.

Decoding notes (also in the table): PEFT 0.21's `generate()` ignores a prefix-tuning prefix with
transformers 5.24 (its scores equal the bare model's), so the PEFT prefix model is decoded greedily
through its own forward pass, which does apply its prefix cache. Everything else uses `generate()`.

    .venv/bin/python benchmarks/e2e_quality.py [--steps 60] [--methods zero-shot,prefixtune-kv-random,...]

`--time-curve` instead trains one method (default: the E2E recipe's, hidden + activations) once per
base precision (float32, bfloat16), the two side by side (one core each), and records validation
BLEU against training wall-clock seconds (evaluation time excluded), then scores all validation MRs
at the same final step for each:

    .venv/bin/python benchmarks/e2e_quality.py --time-curve --steps 250 --curve-every 50 \
        --max-new-tokens 64 --group-by-length --output benchmarks/results/e2e_time_curve
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from e2e_run import greedy_through_forward  # noqa: E402
from prefixtune import PrefixConfig, PrefixModel, load_base_model  # noqa: E402
from prefixtune.data import PromptFormatter, group_references, pad_batch, read_examples  # noqa: E402
from prefixtune.e2e_metrics import NAMES as OFFICIAL  # noqa: E402
from prefixtune.evaluation import score  # noqa: E402
from prefixtune.precision import cpu_record  # noqa: E402

INIT_TEXT = "Describe the restaurant in one sentence."
# Li & Liang (2021), Table 1: GPT-2 medium, prefix-tuning (0.1 % of parameters), official E2E *test*
# set (630 MRs, trained on the full 42k-reference training set). The paper's numbers, not ours.
PAPER_ROW = (
    "Li & Liang 2021, Table 1: GPT-2 medium prefix (paper's numbers, E2E test set)",
    (69.7, 8.81, 46.1, 71.4, 2.49),
)
METHODS = {  # name: (kind, learning rate, how it is decoded); the order is the run order
    "zero-shot (instruct, chat prompt)": ("zero-shot", 0.0, "generate(), chat template, no training"),
    "prefixtune kv activations": ("prefixtune-kv-activations", 5e-3, "generate()"),
    "PEFT prefix tuning": ("peft-prefix", 5e-3, "greedy via forward (PEFT generate ignores the prefix)"),
    "prefixtune kv random": ("prefixtune-kv-random", 5e-3, "generate()"),
    "PEFT LoRA r=8": ("peft-lora", 1e-3, "generate()"),
    "full fine-tuning": ("full", 5e-5, "generate()"),
    "prefixtune hidden activations": ("prefixtune-hidden-activations", 5e-3, "generate()"),
    "prefixtune mlp activations": ("prefixtune-mlp-activations", 5e-4, "generate()"),
    "prefixtune hidden random": ("prefixtune-hidden-random", 5e-3, "generate()"),
    "prefixtune mlp random": ("prefixtune-mlp-random", 5e-4, "generate()"),
}


def build(kind: str, base, tokenizer):
    """(trainable model, a function generating completions for prompt ids)."""
    if kind.startswith("prefixtune"):
        _, parameterization, init = kind.split("-")
        config = PrefixConfig(
            prefix_length=10,
            parameterization=parameterization,
            init=init,
            init_text=INIT_TEXT if init != "random" else None,
        )
        model = PrefixModel(base, config, tokenizer=tokenizer)
        return model, lambda **batch: model.generate(**batch)
    if kind == "peft-prefix":
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
        return model, lambda **batch: greedy_through_forward(model, **batch)
    if kind == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        return model, lambda **batch: model.generate(**batch)
    base.requires_grad_(kind == "full")
    return base, lambda **batch: base.generate(**batch)


def decode_all(generate, formatter: PromptFormatter, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = formatter.tokenizer
    outputs = []
    for start in range(0, len(prompts), 16):
        rows = [{"input_ids": formatter.prompt_ids(p)} for p in prompts[start : start + 16]]
        batch = pad_batch(rows, tokenizer.pad_token_id)
        tokens = generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = tokens[:, batch["input_ids"].shape[1] :]
        outputs += [text.strip().split("\n")[0] for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


class BleuAtSteps(TrainerCallback):
    """BLEU at some steps; `timed` also records the training seconds so far (evaluation excluded)."""

    def __init__(self, evaluate, steps: set[int], timed: bool = False) -> None:
        self.evaluate, self.steps, self.curve, self.timed = evaluate, steps, [], timed
        self.started, self.evaluating = time.perf_counter(), 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.evaluating = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            trained = time.perf_counter() - self.started - self.evaluating
            began = time.perf_counter()
            model.eval()
            bleu = self.evaluate()
            model.train()
            self.evaluating += time.perf_counter() - began
            self.curve.append((state.global_step, trained, bleu) if self.timed else (state.global_step, bleu))


def training_arguments(output: Path, steps: int, batch_size: int, lr: float, grouped: bool = False):
    return TrainingArguments(
        output_dir=str(output / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=max(steps // 10, 1),
        lr_scheduler_type="linear",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        label_names=["labels"],
        train_sampling_strategy="group_by_length" if grouped else "random",
    )


def time_curve_arm(args, dtype: str) -> dict:
    """Train the method once with the frozen base in `dtype`; BLEU on the first MRs at the curve steps
    (with the training seconds so far), then on all `--eval-limit` MRs at the final step."""
    kind, lr, _ = next(value for value in METHODS.values() if value[0] == args.time_curve_method)
    groups = group_references(read_examples(args.eval))[: args.eval_limit]
    prompts, references = [g.prompt for g in groups], [g.references for g in groups]
    base, tokenizer = load_base_model("smollm2-135m", dtype=dtype)
    formatter = PromptFormatter(tokenizer)
    train_rows = [formatter.training_features(e, 128) for e in read_examples(args.train)]
    torch.manual_seed(0)
    model, generate = build(kind, base, tokenizer)

    def curve_bleu() -> float:
        texts = decode_all(generate, formatter, prompts[: args.curve_prompts], args.max_new_tokens)
        return score(texts, references[: args.curve_prompts], ("bleu",))["bleu"]

    callback = BleuAtSteps(curve_bleu, set(range(args.curve_every, args.steps + 1, args.curve_every)), timed=True)
    Trainer(
        model=model,
        args=training_arguments(Path(args.output) / dtype, args.steps, args.batch_size, lr, args.group_by_length),
        train_dataset=train_rows,
        callbacks=[callback],
        data_collator=lambda rows: pad_batch(rows, tokenizer.pad_token_id),
    ).train()
    model.eval()
    began = time.perf_counter()
    texts = decode_all(generate, formatter, prompts, args.max_new_tokens)
    scores = score(texts, references, ("bleu", "sacrebleu"))
    return {
        "bleu": scores["bleu"],  # multi-reference sacreBLEU (`score` answers to both names)
        "sacrebleu": scores["sacrebleu"],
        "mrs": len(prompts),
        "curve": [{"step": step, "train_seconds": seconds, "bleu": bleu} for step, seconds, bleu in callback.curve],
        "eval_seconds": time.perf_counter() - began,
        "example": texts[0],
        "cpu": cpu_record(),
    }


def time_to_quality(args, output: Path) -> None:
    """BLEU vs training seconds for one method, float32 base against bfloat16 base.

    The two arms run at the same time, each in its own process pinned to its own core with one
    thread, so whatever else loads the shared machine slows both alike (run one after the other,
    the later arm would get a quieter or a busier machine). With fewer than two cores they run one
    after the other."""
    kind, lr, decoding = next(value for value in METHODS.values() if value[0] == args.time_curve_method)
    dtypes = ("bfloat16", "float32")
    cores = sorted(os.sched_getaffinity(0))
    side_by_side = len(cores) >= 2
    arms = {}
    for index, dtype in enumerate(dtypes):
        command = [sys.executable, __file__, *sys.argv[1:], "--time-curve-arm", dtype]
        if side_by_side:
            command = ["taskset", "-c", str(cores[index]), *command]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
        else:
            env = dict(os.environ)
        arms[dtype] = subprocess.Popen(command, env=env)
        if not side_by_side:
            arms[dtype].wait()
    for dtype, process in arms.items():
        if process.wait() != 0:
            raise SystemExit(f"the {dtype} arm failed (exit {process.returncode}); see its output above")
    results = {dtype: json.loads((output / f"arm-{dtype}.json").read_text()) for dtype in dtypes}
    fp32, bf16 = results["float32"], results["bfloat16"]
    summary = {
        "method": kind,
        "learning_rate": lr,
        "decoding": decoding,
        "args": vars(args),
        "arms": "side by side, one core and one thread each" if side_by_side else "one after the other",
        "cpu": cpu_record(),
        "results": results,
        "bf16_vs_fp32_train_seconds": bf16["curve"][-1]["train_seconds"] / fp32["curve"][-1]["train_seconds"],
        "bf16_minus_fp32_bleu": bf16["bleu"] - fp32["bleu"],
    }
    (output / "time_to_quality.json").write_text(json.dumps(summary, indent=2))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for dtype, row in results.items():
        axes.plot(
            [p["train_seconds"] for p in row["curve"]], [p["bleu"] for p in row["curve"]], marker="o", label=dtype
        )
    axes.set(
        xlabel="training wall-clock seconds (evaluation excluded)",
        ylabel=f"BLEU (first {args.curve_prompts} MRs)",
        title=f"E2E time to quality: {kind}, frozen base in float32 vs bfloat16",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(output / "bleu_vs_seconds.png", dpi=100)
    print("| base | step | training s | BLEU (curve MRs) |\n|---|---|---|---|")
    for dtype, row in results.items():
        for point in row["curve"]:
            print(f"| {dtype} | {point['step']} | {point['train_seconds']:.0f} | {point['bleu']:.2f} |")
    for dtype, row in results.items():
        print(f"{dtype:9} BLEU {row['bleu']:6.2f} (sacreBLEU {row['sacrebleu']:.2f}) on {row['mrs']} MRs")
    print(
        f"bf16/fp32 training time {summary['bf16_vs_fp32_train_seconds']:.2f}x; "
        f"BLEU bf16 - fp32 = {summary['bf16_minus_fp32_bleu']:+.2f}"
    )


def official_cell(official: dict | None, name: str) -> str:
    if official is None:
        return "-"
    value = official[name]
    return "unavailable" if value is None else f"{value:.{2 if name in ('nist', 'cider') else 1}f}"


def report(results: dict, output: Path, curve_prompts: int) -> None:
    """Print the table (markdown) and draw BLEU vs steps from the results gathered so far."""
    print(
        "| method | sacreBLEU | BLEU | NIST | METEOR | ROUGE-L | CIDEr | trainable params "
        "| BLEU at the curve steps (first MRs) | lr | decoding |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {PAPER_ROW[0]} | - | "
        + " | ".join(f"{value:g}" for value in PAPER_ROW[1])
        + " | 0.1 % of 345M | - | - | - |"
    )
    for label, row in results.items():
        curve = " / ".join(f"{bleu:.1f} (step {step})" for step, bleu in row["curve"]) or "-"
        official = row.get("official")  # absent in rows measured before the official metrics existed
        cells = " | ".join(official_cell(official, name) for name in OFFICIAL)
        print(
            f"| {label} | {row['bleu']:.1f} | {cells} | {row['trainable_parameters']:,} | {curve} | "
            f"{row['learning_rate']:g} | {row['decoding']} |"
        )
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, row in results.items():
        if row["curve"]:
            axes.plot(*zip(*row["curve"], strict=True), marker="o", label=label)
    axes.set(xlabel="training step", ylabel=f"BLEU (first {curve_prompts} MRs)", title="E2E: BLEU vs steps")
    if axes.lines:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "bleu_vs_steps.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description="E2E quality of prefixtune vs baselines under one budget")
    parser.add_argument("--train", default="../shared/data/e2e/train.csv")
    parser.add_argument("--eval", default="../shared/data/e2e/validation.csv")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--curve-every", type=int, default=20)
    parser.add_argument("--curve-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--methods", default=",".join(kind for kind, _, _ in METHODS.values()))
    parser.add_argument("--output", default="benchmarks/results/e2e_quality")
    parser.add_argument("--report-only", action="store_true", help="print/plot the results gathered so far")
    parser.add_argument("--time-curve", action="store_true", help="BLEU vs training seconds, float32 vs bfloat16")
    parser.add_argument("--time-curve-method", default="prefixtune-hidden-activations")
    parser.add_argument("--group-by-length", action="store_true", help="length-grouped batches (--time-curve)")
    parser.add_argument("--eval-limit", type=int, default=None, help="--time-curve: score only the first N MRs")
    # one arm of --time-curve, in its own process
    parser.add_argument("--time-curve-arm", choices=("bfloat16", "float32"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_curve_arm:
        arm = time_curve_arm(args, args.time_curve_arm)
        (Path(args.output) / f"arm-{args.time_curve_arm}.json").write_text(json.dumps(arm, indent=2))
        return
    if args.time_curve:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        time_to_quality(args, Path(args.output))
        return
    if args.report_only:
        report(json.loads((Path(args.output) / "results.json").read_text()), Path(args.output), args.curve_prompts)
        return
    wanted = set(args.methods.split(","))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    pristine, tokenizer = load_base_model("smollm2-135m", dtype="float32")
    formatter = PromptFormatter(tokenizer)
    chat = PromptFormatter(tokenizer, "Write one sentence describing this restaurant: {prompt}", chat_template=True)
    train_rows = [formatter.training_features(e, 128) for e in read_examples(args.train)]
    groups = group_references(read_examples(args.eval))
    prompts, references = [g.prompt for g in groups], [g.references for g in groups]
    results = json.loads((output / "results.json").read_text()) if (output / "results.json").exists() else {}

    for label, (kind, lr, decoding) in METHODS.items():
        if kind not in wanted:
            continue
        torch.manual_seed(0)
        base = copy.deepcopy(pristine)
        model, generate = build(kind, base, tokenizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        started = time.perf_counter()
        curve = []
        if kind != "zero-shot":
            subset = prompts[: args.curve_prompts]

            def curve_bleu(generate=generate, subset=subset) -> float:
                texts = decode_all(generate, formatter, subset, args.max_new_tokens)
                return score(texts, references[: args.curve_prompts], ("bleu",))["bleu"]

            callback = BleuAtSteps(curve_bleu, set(range(args.curve_every, args.steps + 1, args.curve_every)))
            Trainer(
                model=model,
                args=training_arguments(output, args.steps, args.batch_size, lr),
                train_dataset=train_rows,
                callbacks=[callback],
                data_collator=lambda rows: pad_batch(rows, tokenizer.pad_token_id),
            ).train()
            curve = callback.curve
        model.eval()
        texts = decode_all(generate, chat if kind == "zero-shot" else formatter, prompts, args.max_new_tokens)
        scores = score(texts, references, ("sacrebleu", "e2e"))
        bleu = scores["sacrebleu"]
        results[label] = {
            "bleu": bleu,  # sacreBLEU, as in the earlier results
            "official": {name: scores[name] for name in OFFICIAL},
            "trainable_parameters": trainable,
            "learning_rate": lr,
            "decoding": decoding,
            "seconds": time.perf_counter() - started,
            "curve": curve,
            "example": texts[0],
            "cpu": cpu_record(),  # rows accumulate over runs: each says where it was measured
        }
        print(f"{label:34} BLEU {bleu:6.2f}  trainable {trainable:>12,}  ({decoding})", flush=True)
        (output / "results.json").write_text(json.dumps(results, indent=2))

    report(results, output, args.curve_prompts)
    meta = {"args": vars(args), "eval_mrs": len(prompts), "train_rows": len(train_rows), "cpu": cpu_record()}
    (output / "meta.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
