"""`prefixtune demo`: train a prefix on a small table-to-text dataset generated here (seeded), and
show what it changed: bare vs prefixed outputs and BLEU before/after, on SmolLM2 on a CPU.

The data imitate E2E's meaning representations (``name[..], food[..], ...``) with one consistent
"house style" of reference sentence, so a few minutes of prefix tuning visibly teach the frozen
model the format. E2E itself is not shipped (see the README for the official data).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

NAMES = [
    "The Golden Fork",
    "Blue Heron",
    "Casa Verde",
    "The Old Mill",
    "Saffron House",
    "Little Lantern",
    "The Copper Kettle",
    "Riverside Grill",
    "Maple Table",
    "The Green Olive",
    "Silver Spoon",
    "Harbour Lights",
    "The Red Door",
    "Juniper",
    "Oak and Ember",
    "The Wandering Goat",
    "Lotus Garden",
    "The Brass Bell",
    "Cedar Street Diner",
    "Moonlight Cafe",
]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Mexican"]
PRICES = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}
AREAS = {"city centre": "in the city centre", "riverside": "by the riverside"}


def _example(rng: random.Random, name: str) -> dict[str, str]:
    eat_type, food = rng.choice(EAT_TYPES), rng.choice(FOODS)
    price, area = rng.choice(list(PRICES)), rng.choice(list(AREAS))
    family = rng.choice(["yes", "no"])
    mr = f"name[{name}], eatType[{eat_type}], food[{food}], priceRange[{price}], area[{area}], familyFriendly[{family}]"
    kids = "Families with children are welcome." if family == "yes" else "It is not suitable for children."
    text = f"{name} is a {PRICES[price]} {food} {eat_type} {AREAS[area]}. {kids}"
    return {"prompt": mr, "completion": text}


def make_dataset(
    folder: str | Path, train_size: int = 240, validation_size: int = 24, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``validation.jsonl``; validation uses restaurant names unseen in training."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held_out = NAMES[-4:]
    splits = {
        "train": [_example(rng, rng.choice(NAMES[:-4])) for _ in range(train_size)],
        "validation": [_example(rng, rng.choice(held_out)) for _ in range(validation_size)],
    }
    paths = []
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


def run_demo(
    output: str | Path = "runs/demo",
    steps: int = 60,
    batch_size: int = 4,
    lr: float = 1e-2,
    model: str = "smollm2-135m",
    show: int = 3,
    dtype: str = "auto",
) -> dict:
    """Generate the data, train, then compare bare vs prefixed on the validation prompts."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .config import PrefixConfig
    from .data import PromptFormatter, group_references, read_examples
    from .evaluation import generate_completions, score
    from .loading import load_base_model
    from .model import PrefixModel
    from .training import TrainOptions, train

    console = Console()
    output = Path(output)
    if (output / "run").exists():  # the demo's own previous run: start it afresh
        console.print(f"removing the previous demo run in {output / 'run'}")
        shutil.rmtree(output / "run")
    train_path, validation_path = make_dataset(output / "data")
    console.print(f"[bold]1/3[/] data: {train_path} and {validation_path} (generated, seeded)")
    console.print(f"[bold]2/3[/] training a {steps}-step prefix on {model} (frozen) ...")
    options = TrainOptions.from_flat(
        data=str(train_path),
        validation=str(validation_path),
        output=str(output / "run"),
        model=model,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=max(steps // 3, 1),
        warmup_steps=max(steps // 10, 1),
        prefix=PrefixConfig(prefix_length=10, init="activations", init_text="Describe the restaurant in one sentence."),
        dtype=dtype,
        group_by_length=True,
    )
    summary = train(options)

    console.print("[bold]3/3[/] bare model vs the same model with the prefix, on unseen restaurants:")
    base, tokenizer = load_base_model(model, dtype=dtype)
    prefixed = PrefixModel.from_pretrained(base, output / "run" / "prefix", tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer)
    groups = group_references(read_examples(validation_path))
    prompts, references = [g.prompt for g in groups], [g.references for g in groups]
    outputs = {}
    for label, prefix in (("bare", ""), ("prefixed", None)):
        outputs[label] = generate_completions(
            prefixed, formatter, prompts, prefix=prefix, max_new_tokens=40, show_progress=True
        )
    metrics = {label: score(texts, references, ("bleu", "rouge")) for label, texts in outputs.items()}

    table = Table("meaning representation", "bare SmolLM2", "with prefix", show_lines=True)
    for i in range(min(show, len(prompts))):
        table.add_row(Text(prompts[i]), Text(outputs["bare"][i]), Text(outputs["prefixed"][i]))  # no markup
    console.print(table)
    scores = Table("", "BLEU", "ROUGE-L", title="validation (unseen names)")
    for label in outputs:
        scores.add_row(label, f"{metrics[label]['bleu']:.1f}", f"{metrics[label]['rougeL']:.1f}")
    console.print(scores)
    console.print(
        f"prefix saved to {output / 'run' / 'prefix'} "
        f"({summary['trainable_parameters']:,} trained parameters); plots in {output / 'run'}"
    )
    result = {
        "metrics": metrics,
        "train": summary,
        "examples": [
            {"prompt": p, "bare": b, "prefixed": x}
            for p, b, x in zip(prompts, outputs["bare"], outputs["prefixed"], strict=True)
        ],
    }
    (output / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result
