"""Train a prefix with TRL's `SFTTrainer` instead of `prefixtune train` (TRL 1.14; see README "Data formats").

The model TRL trains is a `PrefixModel`: only the prefix is trainable, the base stays frozen. The rows
are given as TRL's prompt/completion format with prefixtune's prompt template applied (``{prompt}\\n``),
so the prefix saved at the end is the one `prefixtune train` would have trained on the same data and
seed, and `prefixtune eval` / `generate` / `serve` load it as any other.

    .venv/bin/python examples/trl_sft.py --data /work/shared/data/e2e/train.csv --steps 50 --output runs/trl
    .venv/bin/prefixtune eval --prefix runs/trl/prefix --data /work/shared/data/e2e/validation.csv --limit 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
from trl import SFTConfig, SFTTrainer

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.data import PromptFormatter, read_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Any --data of prefixtune train (prompt/completion rows).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", default="runs/trl")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.model)
    model = PrefixModel(base, PrefixConfig(prefix_length=args.prefix_length), tokenizer=tokenizer)
    examples = read_examples(args.data)
    formatter = PromptFormatter(tokenizer)  # prefixtune's default prompt format, saved with the prefix
    rows = [{"prompt": formatter.template.replace("{prompt}", e.prompt), "completion": e.completion} for e in examples]
    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(args.steps // 10, 1),
        lr_scheduler_type="linear",
        logging_steps=5,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,  # TRL turns bf16 autocast and gradient checkpointing on by default; prefixtune's defaults
        gradient_checkpointing=False,
        loss_type="nll",
        save_strategy="no",  # Trainer would checkpoint the whole frozen base; the prefix is saved below
        report_to="none",
    )
    dataset = datasets.Dataset.from_list(rows)
    SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()
    folder = model.save_prefix(Path(args.output) / "prefix", "default", {"prompt_format": formatter.saved})
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
