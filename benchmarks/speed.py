"""Speed and memory of prefixtune, side by side in one run (ratios, not absolute times).

1. Train step (forward + backward, B=8, T=64, P=10) for kv / mlp / hidden, against the floor (the
   frozen base's forward + backward to its input activations, nothing trained) and against PEFT
   0.21's prefix tuning. Goals: <= 1.05x the floor, <= 1.0x PEFT.
2. Peak memory of one train step at T=512, gradient checkpointing off and on (each in a fresh
   process: ru_maxrss growth during the step); PEFT's prefix tuning with checkpointing is tried too.
3. Greedy generation tokens/s with a prefix against the bare model (goal >= 0.95x), and proof in the
   same run that the prefix changed the output.
4. 8 requests with 8 different prefixes: one mixed batch against one prefix at a time (goal >= 3x),
   checking the outputs are identical.
5. Prefix file size per parameterization, before and after `compile_prefix`.
6. Precision: the train step in float32, under bfloat16 autocast (float32 weights) and with bfloat16
   base weights, for prefixtune kv and PEFT prefix tuning in the same rounds (goal: bf16 <= 0.55x
   fp32); greedy generation tokens/s with a bfloat16 base against float32; and the padding
   fraction of one epoch of E2E training batches (B=8) with random and length-grouped batches.
7. Hybrids with state prefixes: the train step (B=8, T=64, P=10) of a Mamba-2 hybrid (Bamba layout)
   and a short-convolution hybrid (LFM2 layout), random weights at SmolLM2-135M's width, `kv` and
   `hidden` prefixes (keys/values for the attention layers, initial states for the others) against
   the floor (frozen forward + backward to the input embeddings), in CPU seconds on one thread.
   Goal: <= 1.10x the floor.
8. One long prefix (1,280 slots, a distillation teacher's context) shared by 16 rows: greedy
   generation and a no-grad forward through the shared-prefix path against the concatenating path
   (rows of an equal but separate prefix) and the bare model; outputs must be identical and the
   shared path faster (`--only shared-prefix`).

Timings interleave the variants round by round and report medians, so machine noise hits all alike.

    .venv/bin/python benchmarks/speed.py            # SmolLM2-135M (the numbers in BENCHMARKS.md)
    .venv/bin/python benchmarks/speed.py --quick    # tiny random Llama: checks it runs and outputs agree
    .venv/bin/python benchmarks/speed.py --only precision   # just section 6
    .venv/bin/python benchmarks/speed.py --only packing     # --packing against padded batches (E2E rows)
    .venv/bin/python benchmarks/speed.py --only hybrid      # just section 7
    .venv/bin/python benchmarks/speed.py --only shared-prefix  # section 8
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.data import PromptFormatter, padding_fractions, read_examples
from prefixtune.files import WEIGHTS_NAME
from prefixtune.precision import cpu_record

PARAMETERIZATIONS = ("kv", "mlp", "hidden")


def floor_step(base, ids: torch.Tensor) -> None:
    """The frozen model's forward + backward to its input embeddings: what any prefix step costs at least."""
    embeddings = base.get_input_embeddings()(ids).detach().requires_grad_()
    base(inputs_embeds=embeddings, labels=ids).loss.backward()


def prefix_step(model: PrefixModel, ids: torch.Tensor, name: str) -> None:
    """One training step's forward + backward with prefix `name`."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, prefix=name).loss.backward()


def base_model(quick: bool, dtype: torch.dtype = torch.float32):
    if quick:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return load_base_model("smollm2-135m", dtype=dtype)[0]


def batch(vocab: int, size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (size, length), generator=generator)


def interleaved(steps: dict, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per variant; each round runs every variant once, in turn."""
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = clock()
            step()
            times[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def train_steps(quick: bool, rounds: int) -> dict:
    from peft import PrefixTuningConfig, get_peft_model

    ids = batch(1000 if quick else 49152, 8, 64)
    base = base_model(quick).train()
    base.requires_grad_(False)
    model = PrefixModel(base, name=None).train()
    for name in PARAMETERIZATIONS:
        model.add_prefix(name, PrefixConfig(prefix_length=10, parameterization=name))
    peft_model = get_peft_model(
        base_model(quick).train(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    )

    floor = functools.partial(floor_step, base, ids)

    def ours(name: str):
        return functools.partial(prefix_step, model, ids, name)

    def peft() -> None:
        peft_model.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()

    steps = {
        "floor (frozen fwd+bwd to inputs)": floor,
        **{f"prefixtune {n}": ours(n) for n in PARAMETERIZATIONS},
        "PEFT prefix tuning": peft,
    }
    seconds = interleaved(steps, rounds)
    floor_time, peft_time = seconds["floor (frozen fwd+bwd to inputs)"], seconds["PEFT prefix tuning"]
    return {
        name: {"seconds": value, "vs_floor": value / floor_time, "vs_peft": value / peft_time}
        for name, value in seconds.items()
    }


# Section 7's hybrids: SmolLM2-135M's width (576, 9 query / 3 key-value heads, MLP 1536, its vocabulary),
# 6 layers of which 2 attention; --quick: width 64. Bamba: Mamba-2 mixers of 18 heads x 64, state 64.
HYBRID_WIDTH = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
HYBRID_LAYOUTS = {
    "bamba": {"attn_layer_indices": [2, 5], "mamba_n_heads": 18, "mamba_d_head": 64, "mamba_d_state": 64}
    | {"mamba_chunk_size": 64, "mamba_n_groups": 1},
    "lfm2": {"layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]}
    | {"block_auto_adjust_ff_dim": False},
}


HYBRID_GOAL = 1.10  # a state-prefixed train step against its floor


def hybrid_base(model_type: str, quick: bool):
    width = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    sizes = width if quick else HYBRID_WIDTH
    layout = HYBRID_LAYOUTS[model_type] | (
        {"mamba_n_heads": 4, "mamba_d_head": 32} if quick and model_type == "bamba" else {}
    )
    config = AutoConfig.for_model(
        model_type, vocab_size=1000 if quick else 49152, num_hidden_layers=6, **sizes, **layout
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def hybrid_train_steps(quick: bool, rounds: int) -> dict:
    """Section 7: per hybrid, median seconds and ratio to the floor of `kv` and `hidden` train steps."""
    ids = batch(1000 if quick else 49152, 8, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # timed in CPU seconds of one thread: steadier than wall time on shared cores
    try:
        return {model_type: hybrid_train_step(model_type, quick, ids, rounds) for model_type in HYBRID_LAYOUTS}
    finally:
        torch.set_num_threads(threads)


def hybrid_train_step(model_type: str, quick: bool, ids: torch.Tensor, rounds: int) -> dict:
    base = hybrid_base(model_type, quick).train()
    base.requires_grad_(False)
    model = PrefixModel(base, name=None).train()
    for name in ("kv", "hidden"):
        model.add_prefix(name, PrefixConfig(prefix_length=10, parameterization=name))

    floor = functools.partial(floor_step, base, ids)

    def ours(name: str):
        return functools.partial(prefix_step, model, ids, name)

    steps = {"floor": floor, "kv": ours("kv"), "hidden": ours("hidden")}
    seconds = interleaved(steps, rounds, clock=time.process_time)
    geometry = model.geometry
    return {
        "layers": f"{geometry.num_layers} attention, {geometry.state_layers} state "
        f"(conv {list(geometry.conv_state_shape)}, recurrent {list(geometry.recurrent_state_shape)})",
        **{name: {"seconds": value, "vs_floor": value / seconds["floor"]} for name, value in seconds.items()},
    }


def print_hybrid(report: dict) -> None:
    print(f"\n{'hybrid train step (B=8, T=64, P=10)':36} {'CPU s':>9} {'vs floor':>9}  goal <= {HYBRID_GOAL:.2f}x")
    for model_type, rows in report.items():
        print(f"{model_type} ({rows['layers']})")
        for name in ("floor", "kv", "hidden"):
            met = "met" if rows[name]["vs_floor"] <= HYBRID_GOAL else "MISSED"
            print(f"  {name:34} {rows[name]['seconds']:9.3f} {rows[name]['vs_floor']:8.2f}x  {met}")


def machine() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()} ({capability}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def memory_child(quick: bool, variant: str, length: int) -> None:
    """Runs in a fresh process: one train step, prints the RSS growth it caused (MiB)."""
    ids = batch(1000 if quick else 49152, 8, length)
    base = base_model(quick)
    if variant.startswith("peft"):
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    else:
        model = PrefixModel(base, PrefixConfig(prefix_length=10))
    model.train()
    if variant.endswith("+gc"):
        model.gradient_checkpointing_enable()
    with torch.no_grad():
        model(input_ids=ids[:1, :8])  # touch the code paths once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as error:  # noqa: BLE001 - reported, e.g. PEFT refusing checkpointing
        print(json.dumps({"error": f"{type(error).__name__}: {str(error)[:160]}"}))
        return
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (after - before) / 1024}))


def memory(quick: bool, length: int) -> dict:
    results = {}
    for variant in ("prefixtune kv", "prefixtune kv+gc", "peft", "peft+gc"):
        command = [sys.executable, __file__, "--memory-child", variant, "--length", str(length)]
        command += ["--quick"] if quick else []
        output = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
        results[variant] = json.loads(lines[-1]) if lines else {"error": output.stderr[-300:]}
    return results


def generation(quick: bool, rounds: int) -> dict:
    base = base_model(quick)
    model = PrefixModel(base, PrefixConfig(prefix_length=10, init_std=1.0 if quick else 0.5))
    prompts = batch(1000 if quick else 49152, 8, 16, seed=1)
    options = {"max_new_tokens": 32, "do_sample": False, "min_new_tokens": 32, "pad_token_id": 0}
    outputs = {}

    def bare() -> None:  # the base model itself (its attention delegates straight to sdpa without a prefix)
        outputs["bare"] = model.base_model.generate(input_ids=prompts, **options)

    def prefixed() -> None:
        outputs["prefixed"] = model.generate(input_ids=prompts, **options)

    seconds = interleaved({"bare": bare, "prefixed": prefixed}, rounds)
    tokens = 8 * 32
    changed = sum(a != b for a, b in zip(outputs["bare"].tolist(), outputs["prefixed"].tolist(), strict=True))
    return {
        "bare_tokens_per_second": tokens / seconds["bare"],
        "prefixed_tokens_per_second": tokens / seconds["prefixed"],
        "ratio": seconds["bare"] / seconds["prefixed"],
        "rows_changed_by_prefix": changed,
    }


def mixed_batch(quick: bool, rounds: int) -> dict:
    base = base_model(quick)
    model = PrefixModel(base, name=None)
    names = [f"task{i}" for i in range(8)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model.add_prefix(name, PrefixConfig(prefix_length=4 + i, init_std=1.0 if quick else 0.5))
    prompt = batch(1000 if quick else 49152, 8, 16, seed=2)
    options = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    results = {}

    def one_batch() -> None:
        results["mixed"] = model.generate(input_ids=prompt, prefix=names, **options)

    def one_at_a_time() -> None:
        rows = [model.generate(input_ids=prompt[i : i + 1], prefix=[name], **options) for i, name in enumerate(names)]
        results["sequential"] = torch.cat(rows)

    seconds = interleaved({"one mixed batch": one_batch, "one prefix at a time": one_at_a_time}, rounds)
    return {
        "seconds": seconds,
        "speedup": seconds["one prefix at a time"] / seconds["one mixed batch"],
        "outputs_identical": results["mixed"].tolist() == results["sequential"].tolist(),
    }


def shared_prefix(quick: bool, rounds: int, length: int) -> dict:
    """One long prefix for every row (a distillation teacher's context: the model's own keys/values
    of `length` random tokens): greedy generation and a
    no-grad forward through the shared-prefix path against the concatenating path, which rows of an
    equal but separate prefix ("twin", stacked per row) take, and against the bare model."""
    from prefixtune.distillation.prefixes import add_prefix_from_ids

    vocab = 1000 if quick else 49152
    if quick:  # no tokenizer to record the init text with: a random prefix
        model = PrefixModel(base_model(quick), PrefixConfig(prefix_length=length, init_std=1.0), name="long")
    else:
        base, tokenizer = load_base_model("smollm2-135m", dtype=torch.float32)
        model = PrefixModel(base, name=None, tokenizer=tokenizer)
        config = PrefixConfig(prefix_length=length, init="activations", init_text="-")
        add_prefix_from_ids(model, "long", config, batch(vocab, 1, length, seed=5)[0].tolist())  # its own K/V
    model.add_prefix("twin", PrefixConfig(prefix_length=length)).load_state_dict(model.prefixes["long"].state_dict())
    rows = 16
    prompts = batch(vocab, rows, 16, seed=3)
    separate = ["long" if i % 2 else "twin" for i in range(rows)]  # equal weights, separate row objects
    options = {"max_new_tokens": 24, "do_sample": False, "min_new_tokens": 24, "pad_token_id": 0}
    outputs: dict[str, torch.Tensor] = {}

    def generate(name: str, prefix) -> None:
        if prefix is None:
            outputs[name] = model.base_model.generate(input_ids=prompts, **options)
        else:
            outputs[name] = model.generate(input_ids=prompts, prefix=prefix, **options)

    steps = {
        name: functools.partial(generate, name, prefix)
        for name, prefix in (("bare", None), ("shared", "long"), ("concatenated", separate))
    }
    seconds = interleaved(steps, rounds)
    forward_ids = batch(vocab, rows, 64, seed=4)

    @torch.no_grad()
    def forward(name: str, prefix) -> None:
        outputs[f"forward {name}"] = model(input_ids=forward_ids, prefix=prefix).logits

    forwards = interleaved(
        {
            name: functools.partial(forward, name, prefix)
            for name, prefix in (("shared", "long"), ("concatenated", separate))
        },
        rounds,
    )
    difference = (outputs["forward shared"] - outputs["forward concatenated"]).abs().max().item()
    return {
        "prefix_length": length,
        "rows": rows,
        "generation_seconds": seconds,
        "generation_speedup_vs_concatenated": seconds["concatenated"] / seconds["shared"],
        "generation_vs_bare": seconds["shared"] / seconds["bare"],
        "outputs_identical": outputs["shared"].tolist() == outputs["concatenated"].tolist(),
        "forward_seconds": forwards,
        "forward_speedup_vs_concatenated": forwards["concatenated"] / forwards["shared"],
        "forward_max_logit_difference": difference,
    }


def print_shared_prefix(row: dict) -> None:
    print(f"\none prefix of {row['prefix_length']} slots for {row['rows']} rows: shared path vs concatenated per row")
    g, f = row["generation_seconds"], row["forward_seconds"]
    print(f"{'':34} {'median s':>9}")
    for name, value in g.items():
        print(f"{'generate 24 tokens, ' + name:34} {value:9.3f}")
    print(f"{'forward 64 tokens, shared':34} {f['shared']:9.3f}")
    print(f"{'forward 64 tokens, concatenated':34} {f['concatenated']:9.3f}")
    print(
        f"shared vs concatenated: generate {row['generation_speedup_vs_concatenated']:.2f}x faster, forward "
        f"{row['forward_speedup_vs_concatenated']:.2f}x; shared vs bare {row['generation_vs_bare']:.2f}x the time; "
        f"outputs identical: {row['outputs_identical']}, "
        f"largest logit difference {row['forward_max_logit_difference']:.1e}"
    )


def file_sizes(quick: bool) -> dict:
    base = base_model(quick)
    model = PrefixModel(base, name=None)
    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        ids = batch(1000 if quick else 49152, 1, 8)
        for name in PARAMETERIZATIONS:
            model.add_prefix(name, PrefixConfig(prefix_length=10, parameterization=name))
            raw = model.save_prefix(Path(folder) / f"{name}-raw", name) / WEIGHTS_NAME
            with torch.no_grad():
                before = model(input_ids=ids, prefix=name).logits
                model.compile_prefix(name)
                after = model(input_ids=ids, prefix=name).logits
            compiled = model.save_prefix(Path(folder) / f"{name}-compiled", name) / WEIGHTS_NAME
            sizes[name] = {
                "bytes": raw.stat().st_size,
                "compiled_bytes": compiled.stat().st_size,
                "compile_max_logit_change": (before - after).abs().max().item(),
            }
    return sizes


def precision_steps(quick: bool, rounds: int) -> dict:
    """One train step (B=8, T=64, P=10) per precision, prefixtune kv and PEFT prefix, interleaved."""
    from peft import PrefixTuningConfig, get_peft_model

    ids = batch(1000 if quick else 49152, 8, 64)
    steps, errors = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ours = PrefixModel(base_model(quick, dtype).train(), PrefixConfig(prefix_length=10)).train()
        peft = get_peft_model(
            base_model(quick, dtype).train(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
        )
        autocasts = (False, True) if dtype == torch.float32 else (False,)
        for autocast in autocasts:
            label = "bf16 autocast" if autocast else "fp32" if dtype == torch.float32 else "bf16 weights"
            for method, model in (("prefixtune kv", ours), ("PEFT prefix", peft)):

                def step(model=model, autocast=autocast) -> None:
                    model.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        model(input_ids=ids, labels=ids).loss.backward()

                try:
                    step()
                    steps[f"{method}, {label}"] = step
                except Exception as error:  # noqa: BLE001 - reported (e.g. a dtype PEFT does not handle)
                    errors[f"{method}, {label}"] = f"{type(error).__name__}: {str(error)[:160]}"
    seconds = interleaved(steps, rounds)
    results = {}
    for name, value in seconds.items():
        fp32 = seconds.get(f"{name.split(',')[0]}, fp32")
        results[name] = {"seconds": value, "vs_fp32": value / fp32 if fp32 else None}
    return results | {name: {"error": error} for name, error in errors.items()}


def precision_generation(quick: bool, rounds: int) -> dict:
    """Greedy generation with a prefix: bfloat16 base against float32 (same prefix file)."""
    prompts = batch(1000 if quick else 49152, 8, 16, seed=1)
    options = {"max_new_tokens": 32, "do_sample": False, "min_new_tokens": 32, "pad_token_id": 0}
    models, outputs = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        PrefixModel(base_model(quick), PrefixConfig(prefix_length=10, init_std=1.0 if quick else 0.5)).save_prefix(
            folder
        )
        for name, dtype in (("fp32", torch.float32), ("bf16 weights", torch.bfloat16)):
            models[name] = PrefixModel.from_pretrained(base_model(quick, dtype), folder)

    def generate(name: str):
        def run() -> None:
            outputs[name] = models[name].generate(input_ids=prompts, **options)

        return run

    seconds = interleaved({name: generate(name) for name in models}, rounds)
    same = sum(a == b for a, b in zip(outputs["fp32"].tolist(), outputs["bf16 weights"].tolist(), strict=True))
    return {
        "fp32_tokens_per_second": 8 * 32 / seconds["fp32"],
        "bf16_tokens_per_second": 8 * 32 / seconds["bf16 weights"],
        "bf16_speedup": seconds["fp32"] / seconds["bf16 weights"],
        "rows_identical_to_fp32": same,
    }


def padding(quick: bool, data: str) -> dict:
    """Padding share of one epoch of training batches (B=8), random vs length-grouped (`--group-by-length`)."""
    if quick or not Path(data).is_file():
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(8, 64, (512,), generator=generator).tolist()
        source = "512 random lengths 8..63"
    else:
        tokenizer = load_base_model("smollm2-135m")[1]
        formatter = PromptFormatter(tokenizer)
        lengths = [len(formatter.training_features(e, 256)["input_ids"]) for e in read_examples(data)]
        source = f"{data} ({len(lengths)} rows, SmolLM2 tokens)"
    return {"source": source, "batch_size": 8, **padding_fractions(lengths, 8, seed=0)}


def packing_steps(quick: bool, rounds: int, data: str, batches: int = 8) -> dict:
    """Train step tokens/s on real training batches (B=8, random rows of `data`, kv prefix P=10):
    padded (left-padded to the longest row) against `--packing` (one packed row, no padding), the
    same rows in both, alternating batch by batch; the batch losses must agree."""
    from prefixtune.data import Example
    from prefixtune.packing import PackedCollator
    from prefixtune.training import _collate

    if quick or not Path(data).is_file():
        torch.manual_seed(0)
        base, vocab = base_model(True).train(), 1000
        lengths = torch.randint(8, 64, (8 * batches,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = [{"input_ids": batch(vocab, 1, n, seed=n)[0].tolist()} for n in lengths]
        rows = [row | {"labels": [-100] * 4 + row["input_ids"][4:]} for row in rows]  # a 4-token "prompt"
        source, pad_id = f"{8 * batches} random rows of 8..63 tokens", 0
    else:
        base, tokenizer = load_base_model("smollm2-135m")
        formatter, examples = PromptFormatter(tokenizer), read_examples(data)
        chosen = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[: 8 * batches].tolist()
        rows = [formatter.training_features(Example(**vars(examples[i])), 256) for i in chosen]
        source, pad_id = f"{8 * batches} random rows of {data} (SmolLM2 tokens)", tokenizer.pad_token_id
    base.train().requires_grad_(False)
    model = PrefixModel(base, PrefixConfig(prefix_length=10)).train()
    groups = [rows[i : i + 8] for i in range(0, len(rows), 8)]
    padded = [_collate(group, pad_id, "left") for group in groups]
    packed = [PackedCollator()(group) for group in groups]
    losses: dict[str, list[float]] = {"padded": [], "packed": []}

    def step(name: str, inputs: dict) -> None:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        losses[name].append(loss.item())

    step("padded", padded[0]), step("packed", packed[0])  # warm-up
    times = {"padded": 0.0, "packed": 0.0}
    for _ in range(rounds):
        for index in range(len(groups)):
            for name, inputs in (("padded", padded[index]), ("packed", packed[index])):
                started = time.perf_counter()
                step(name, inputs)
                times[name] += time.perf_counter() - started
    real_tokens = rounds * sum(len(row["input_ids"]) for row in rows)
    slots = rounds * sum(int(b["input_ids"].numel()) for b in padded)
    difference = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"], strict=True))
    return {
        "source": source,
        "batch_size": 8,
        "batches": len(groups),
        "rounds": rounds,
        "padding_fraction_padded": 1 - real_tokens / slots,
        "padded_tokens_per_second": real_tokens / times["padded"],
        "packed_tokens_per_second": real_tokens / times["packed"],
        "speedup": times["padded"] / times["packed"],
        "max_batch_loss_difference": difference,
    }


def packing_only(args: argparse.Namespace, rounds: int) -> int:
    """``--only packing``: the packing section alone, written to ``speed-packing.json``."""
    report = {
        "model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct (fp32)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "note": "2 CPU cores shared with other jobs while this ran (nice -n 10); the ratio is side by side",
        "packing": packing_steps(args.quick, rounds, args.data),
    }
    print_packing(report)
    path = Path(args.json or f"benchmarks/results/speed-packing{'-quick' if args.quick else ''}.json")
    path.write_text(json.dumps(report, indent=2))
    ok = report["packing"]["max_batch_loss_difference"] < 1e-3
    print("packed and padded losses agree" if ok else "FAILED: packed and padded losses differ")
    return 0 if ok else 1


def print_packing(report: dict) -> None:
    row = report["packing"]
    print(f"\n--packing, train step on {row['source']}, B=8 (padding {row['padding_fraction_padded']:.1%} when padded)")
    print(f"{'':10} {'real tokens/s':>14}")
    print(f"{'padded':10} {row['padded_tokens_per_second']:14.1f}")
    print(f"{'packed':10} {row['packed_tokens_per_second']:14.1f}   {row['speedup']:.2f}x")
    print(f"largest batch-loss difference packed vs padded: {row['max_batch_loss_difference']:.2e}")


def print_precision(report: dict) -> None:
    print(f"\n{'train step by precision (B=8, T=64, P=10)':44} {'median s':>9} {'vs fp32':>8}")
    for name, row in report["precision"]["train_step"].items():
        if "error" in row:
            print(f"{name:44} {row['error']}")
        else:
            print(f"{name:44} {row['seconds']:9.3f} {row['vs_fp32']:7.2f}x")
    g = report["precision"]["generation"]
    print(
        f"generation with a prefix: fp32 {g['fp32_tokens_per_second']:.1f} tok/s, bf16 weights "
        f"{g['bf16_tokens_per_second']:.1f} tok/s ({g['bf16_speedup']:.2f}x); rows identical to fp32: "
        f"{g['rows_identical_to_fp32']}/8"
    )
    pad = report["precision"]["padding"]
    print(f"padding of B=8 batches over {pad['source']}: random {pad['random']:.1%}, grouped {pad['grouped']:.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description="prefixtune speed and memory benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny random model: runs fast, checks agreement")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--memory-length", type=int, default=512)
    parser.add_argument("--prefix-length", type=int, default=1280, help="--only shared-prefix: its prefix slots")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--only", choices=["precision", "packing", "hybrid", "shared-prefix"], help="run only this section"
    )
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. that the cores were shared)")
    parser.add_argument("--data", default="../shared/data/e2e/train.csv", help="training data for the padding figures")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.quick, args.memory_child, args.length)
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    torch.manual_seed(0)
    if args.only == "packing":
        return packing_only(args, rounds)
    if args.only == "shared-prefix":
        report = {"machine": machine(), "cpu": cpu_record(), "rounds": rounds, "note": args.note}
        report["shared_prefix"] = shared_prefix(args.quick, rounds, 256 if args.quick else args.prefix_length)
        print_shared_prefix(report["shared_prefix"])
        path = Path(args.json or f"benchmarks/results/speed-shared-prefix{'-quick' if args.quick else ''}.json")
        path.write_text(json.dumps(report, indent=2))
        row = report["shared_prefix"]
        ok = row["outputs_identical"] and (args.quick or row["generation_speedup_vs_concatenated"] > 1.0)
        print("shared path faster, outputs identical" if ok else "FAILED: the shared path is slower or differs")
        return 0 if ok else 1
    if args.only == "hybrid":
        report = {
            "machine": machine(),
            "cpu": cpu_record(),
            "timing": "CPU seconds (time.process_time) on 1 torch thread, variants interleaved, median of rounds",
            "rounds": rounds,
            "note": args.note,
            "hybrid_train_step": hybrid_train_steps(args.quick, rounds),
        }
        print(f"\nrandom-weight hybrids{' (--quick)' if args.quick else ''} on {report['machine']}")
        print_hybrid(report["hybrid_train_step"])
        path = Path(args.json or f"benchmarks/results/speed-hybrid{'-quick' if args.quick else ''}.json")
        path.write_text(json.dumps(report, indent=2))
        return 0
    precision = {
        "train_step": precision_steps(args.quick, rounds),
        "generation": precision_generation(args.quick, rounds),
        "padding": padding(args.quick, args.data),
    }
    if args.only == "precision":
        report = {
            "model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct",
            "cpu": cpu_record(),
            "precision": precision,
        }
        print_precision(report)
        path = Path(args.json or f"benchmarks/results/speed-precision{'-quick' if args.quick else ''}.json")
        path.write_text(json.dumps(report, indent=2))
        return 0
    report = {
        "model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct (fp32)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "cpu": cpu_record(),
        "train_step": train_steps(args.quick, rounds),
        "memory": memory(args.quick, 64 if args.quick else args.memory_length),
        "generation": generation(args.quick, rounds),
        "mixed_batch": mixed_batch(args.quick, rounds),
        "file_sizes": file_sizes(args.quick),
        "precision": precision,
    }

    print(f"\n{report['model']} on {report['machine']}\n")
    print(f"{'train step (B=8, T=64, P=10)':36} {'median s':>9} {'vs floor':>9} {'vs PEFT':>8}")
    for name, row in report["train_step"].items():
        print(f"{name:36} {row['seconds']:9.3f} {row['vs_floor']:8.2f}x {row['vs_peft']:7.2f}x")
    print(f"\n{'peak memory growth of one step':36} {'MiB':>9}")
    for name, row in report["memory"].items():
        print(f"{name:36} {row['peak_growth_mib']:9.0f}" if "peak_growth_mib" in row else f"{name:36} {row['error']}")
    g = report["generation"]
    print(
        f"\ngeneration: bare {g['bare_tokens_per_second']:.1f} tok/s, prefixed {g['prefixed_tokens_per_second']:.1f} "
        f"tok/s, ratio {g['ratio']:.2f}x; rows changed by the prefix: {g['rows_changed_by_prefix']}/8"
    )
    m = report["mixed_batch"]
    print(
        f"8 prefixes: one mixed batch {m['speedup']:.2f}x faster than one at a time; "
        f"identical outputs: {m['outputs_identical']}"
    )
    print(f"\n{'prefix file (P=10)':20} {'bytes':>10} {'compiled':>10} {'max logit change':>17}")
    for name, row in report["file_sizes"].items():
        print(f"{name:20} {row['bytes']:10,} {row['compiled_bytes']:10,} {row['compile_max_logit_change']:17.2e}")

    print_precision(report)

    path = Path(args.json or f"benchmarks/results/speed{'-quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    agree = (
        m["outputs_identical"]
        and g["rows_changed_by_prefix"] > 0
        and all(row["compile_max_logit_change"] < 1e-4 for row in report["file_sizes"].values())
    )
    print("outputs agree" if agree else "FAILED: outputs disagree")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
