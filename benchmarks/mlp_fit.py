"""How well `mlp`'s warm start fits the frozen model's keys/values, by number of fit steps.

`MLPPrefix.init_activations` regresses embedding + MLP onto the keys/values the frozen model computes
on the init text (full-batch Adam, `MLP_FIT_LR`, `MLP_FIT_STEPS` steps). This prints the relative
error ||fit - target|| / ||target|| after several step counts, the default marked, so the default is
a measured choice. Every fit starts from the same seed.

    .venv/bin/python benchmarks/mlp_fit.py            # SmolLM2-135M-Instruct, the README's init text
    .venv/bin/python benchmarks/mlp_fit.py --quick    # tiny random Llama (tests/tiny.py), for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.initialization import init_token_ids, text_activations
from prefixtune.parameterizations import MLP_FIT_LR, MLP_FIT_STEPS, MLPPrefix
from prefixtune.precision import cpu_record

INIT_TEXT = "Describe the restaurant in one sentence."
STEPS = (30, 100, MLP_FIT_STEPS, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2")
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--mlp-hidden-size", type=int, default=512)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    if args.quick:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        base, tokenizer, name = tiny_model("llama"), tiny_tokenizer(), "tiny-llama"
    else:
        (base, tokenizer), name = load_base_model("smollm2-135m", dtype="float32"), "smollm2-135m"
    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    token_ids = init_token_ids(tokenizer, INIT_TEXT, args.prefix_length)
    activations = text_activations(
        base, model.kv_path.attention_modules, token_ids, model.geometry.kv_heads, model.geometry.head_dim
    )
    config = PrefixConfig(
        prefix_length=args.prefix_length,
        parameterization="mlp",
        mlp_hidden_size=args.mlp_hidden_size,
        init="activations",
        init_text=INIT_TEXT,
    )
    rows = []
    for steps in STEPS:
        torch.manual_seed(0)
        prefix = MLPPrefix(config, args.prefix_length, model.geometry)
        prefix.init_activations(activations, steps=steps, lr=MLP_FIT_LR)
        rows.append(prefix.fit_report | {"default": steps == MLP_FIT_STEPS})
    result = {"model": name, "cpu": cpu_record(), "init_text": INIT_TEXT, "prefix_length": args.prefix_length}
    result["fits"] = rows

    print(f"mlp warm start on {name}, P={args.prefix_length}, mlp_hidden_size={args.mlp_hidden_size}, lr={MLP_FIT_LR}")
    print("| fit steps | relative error | mse |\n|---|---|---|")
    for row in rows:
        marker = " (default)" if row["default"] else ""
        print(f"| {row['steps']}{marker} | {row['relative_error']:.4f} | {row['mse']:.3g} |")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
