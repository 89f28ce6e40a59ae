"""Prefix tuning an encoder-decoder for summarization, on data made here (small, seeded), scored
with ROUGE-1/2/L (rouge-score).

No pretrained BART can be downloaded here, so by default the example first makes its own small
base: a BART-shaped model trained (all weights, with transformers' Trainer) only to *denoise*
articles (BART's own pretraining objective: restore masked words). That base copies; it has never
seen a summary. Then the base is frozen and prefixtune trains encoder, decoder and cross-attention
prefixes to summarize. Pass ``--model`` with a real seq2seq checkpoint folder to skip the first part.

    .venv/bin/python examples/summarization.py [--output runs/summarization] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.data import PromptFormatter, group_references, pad_batch, read_examples
from prefixtune.evaluation import generate_completions, score
from prefixtune.training import TrainOptions, train

CITIES = ["Oakridge", "Riverton", "Maple Falls", "Westbury", "Harbor City", "Elmstead", "Northgate", "Lakeview"]
THINGS = ["library", "bridge", "park", "school", "stadium", "hospital", "market", "museum"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["March", "June", "September", "December"]
GROUPS = ["residents", "teachers", "shop owners", "parents", "students"]
FEELINGS = ["happy", "worried", "excited", "unsure"]


def make_article(rng: random.Random) -> dict[str, str]:
    city, thing, cost = rng.choice(CITIES), rng.choice(THINGS), rng.randint(2, 90)
    sentences = [
        f"On {rng.choice(DAYS)} the {city} council approved a new {thing} .",
        f"The {thing} will cost {cost} million and open in {rng.choice(MONTHS)} .",
        f"Local {rng.choice(GROUPS)} said they were {rng.choice(FEELINGS)} about the plan .",
    ]
    return {"prompt": " ".join(sentences), "completion": f"{city} approves {thing} costing {cost} million ."}


def make_data(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, size in (("train", 400), ("validation", 40)):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(make_article(rng)) + "\n" for _ in range(size)))
        paths.append(path)
    return paths[0], paths[1]


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    words = sorted({word for text in texts for word in text.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<mask>": 3} | {word: i + 4 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", mask_token="<mask>"
    )


def pretrain_denoiser(train_path: Path, folder: Path, steps: int, seed: int) -> Path:
    """A small BART trained only to restore masked words of articles (no summaries)."""
    if (folder / "config.json").is_file():
        return folder
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    texts = [row["prompt"] for row in rows] + [row["completion"] for row in rows]
    tokenizer = word_tokenizer(texts)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config)
    rng = random.Random(seed)

    def denoising_example(index: int) -> dict[str, list[int]]:
        ids = tokenizer(rows[index % len(rows)]["prompt"])["input_ids"] + [2]
        noisy = [3 if rng.random() < 0.15 else token for token in ids]
        return {"input_ids": noisy, "labels": ids}

    args = TrainingArguments(
        output_dir=str(folder / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=20,
        logging_steps=50,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        remove_unused_columns=False,
    )
    dataset = [denoising_example(i) for i in range(steps * 16)]
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=lambda batch: pad_batch(batch, 0, side="right")
    ).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/summarization")
    parser.add_argument("--model", help="seq2seq checkpoint folder (default: pretrain a small denoiser here)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    output = Path(args.output)
    train_path, validation_path = make_data(output / "data", args.seed)
    model_path = args.model or str(pretrain_denoiser(train_path, output / "denoiser", args.pretrain_steps, args.seed))

    summary = train(
        TrainOptions.from_flat(
            data=str(train_path),
            validation=str(validation_path),
            output=str(output / "prefix-run"),
            model=model_path,
            steps=args.steps,
            batch_size=16,
            lr=1e-2,
            prefix=PrefixConfig(prefix_length=8),
            warmup_steps=20,
            eval_every=max(args.steps // 3, 1),
            seed=args.seed,
            resume=True,
            template="{prompt}",
        )
    )

    base, tokenizer = load_base_model(model_path)
    model = PrefixModel.from_pretrained(base, output / "prefix-run" / "prefix", tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer, "{prompt}", encoder_decoder=True)
    groups = group_references(read_examples(validation_path))
    prompts, references = [g.prompt for g in groups], [g.references for g in groups]
    results = {}
    for label, prefix in (("frozen base (denoiser)", ""), ("base + prefix", None)):
        outputs = generate_completions(model, formatter, prompts, prefix=prefix, num_beams=2, max_new_tokens=24)
        rouge = score(outputs, references, ("rouge",))
        results[label] = {"rouge": rouge, "example": outputs[0], "outputs": outputs, "references": references}

    print(f"\n{'':24} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}")
    for label, result in results.items():
        rouge = result["rouge"]
        print(f"{label:24} {rouge['rouge1']:8.1f} {rouge['rouge2']:8.1f} {rouge['rougeL']:8.1f}")
    print(f"\narticle:   {prompts[0]}\nreference: {references[0][0]}")
    for label, result in results.items():
        print(f"{label}: {result['example']}")
    report = {"results": results, "trainable_parameters": summary["trainable_parameters"], "model": model_path}
    (output / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
