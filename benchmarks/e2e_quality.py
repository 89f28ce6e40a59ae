"""E2E NLG quality under one training budget: prefixtune against every usual baseline.

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
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prefixtune import PrefixConfig, PrefixModel, load_base_model  # noqa: E402
from prefixtune.data import PromptFormatter, group_references, pad_batch, read_examples  # noqa: E402
from prefixtune.e2e_metrics import NAMES as OFFICIAL  # noqa: E402
from prefixtune.evaluation import score  # noqa: E402

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


@torch.no_grad()
def greedy_through_forward(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
    """Greedy decoding by full forward passes (no cache), so PEFT's prefix is applied at every step."""
    ids, mask = input_ids, attention_mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_token = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        finished |= next_token == eos_token_id
        ids = torch.cat([ids, next_token[:, None]], 1)
        mask = torch.cat([mask, (~finished | (next_token == eos_token_id)).long()[:, None]], 1)
        if finished.all():
            break
    return ids


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
    def __init__(self, evaluate, steps: set[int]) -> None:
        self.evaluate, self.steps, self.curve = evaluate, steps, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            model.eval()
            self.curve.append((state.global_step, self.evaluate()))
            model.train()


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
    args = parser.parse_args()
    if args.report_only:
        report(json.loads((Path(args.output) / "results.json").read_text()), Path(args.output), args.curve_prompts)
        return
    wanted = set(args.methods.split(","))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    pristine, tokenizer = load_base_model("smollm2-135m")
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
            training = TrainingArguments(
                output_dir=str(output / "trainer"),
                max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=lr,
                warmup_steps=max(args.steps // 10, 1),
                lr_scheduler_type="linear",
                logging_steps=10,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=0,
                data_seed=0,
                remove_unused_columns=False,
                label_names=["labels"],
            )
            Trainer(
                model=model,
                args=training,
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
        }
        print(f"{label:34} BLEU {bleu:6.2f}  trainable {trainable:>12,}  ({decoding})", flush=True)
        (output / "results.json").write_text(json.dumps(results, indent=2))

    report(results, output, args.curve_prompts)
    meta = {"args": vars(args), "eval_mrs": len(prompts), "train_rows": len(train_rows)}
    (output / "meta.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
