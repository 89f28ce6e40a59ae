"""Load test of `prefixtune serve` on loopback: N requests at C concurrent over several prefixes.

Three phases against one in-process server (127.0.0.1, a free port), each bounded in count and time:
  1. every request alone (concurrency 1): the reference outputs;
  2. concurrent, prefixes mixed in each micro-batch (the default engine);
  3. concurrent, one prefix per micro-batch (the baseline a server without per-row prefixes has).
Phases 2 and 3 must have 0 errors and 0 mismatches against phase 1 (greedy decoding); the script
exits non-zero otherwise. Throughputs are measured side by side in this one run.

    .venv/bin/python benchmarks/load_test.py                # SmolLM2-135M, 200 requests, 16 concurrent
    .venv/bin/python benchmarks/load_test.py --quick        # tiny random Llama, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx
import torch

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.precision import cpu_record
from prefixtune.serving import build_app
from prefixtune.serving.background import running
from quick_model import tiny_llama_for

STYLES = {  # activations-initialised prefixes: real, visibly different behaviours
    "french": "Always answer in French.",
    "pirate": "You are a pirate. Talk like a pirate in every answer, matey!",
    "formal": "Write in a very formal, polite register.",
    "terse": "One word.",
}
PROMPTS = [
    "The best way to learn to cook is",
    "My favourite city is",
    "Tell me about the ocean.",
    "The weather today",
    "A good restaurant should",
    "Write a sentence about cats.",
    "The history of bread",
    "Music makes people",
    "Travelling by train is",
    "In the morning I",
]


def base_model(quick: bool):
    model, tokenizer = load_base_model("smollm2-135m", dtype="float32")
    if quick:  # same tokenizer, tiny random Llama
        model = tiny_llama_for(tokenizer, max_positions=512)
    return model, tokenizer


def write_store(model, tokenizer, folder: Path, count: int) -> list[str]:
    names = list(STYLES)[:count]
    for name in names:
        config = PrefixConfig(prefix_length=None, init="activations", init_text=STYLES[name])
        wrapper = PrefixModel(model, config, name=name, tokenizer=tokenizer)
        wrapper.save_prefix(folder / name)
    return names


async def run_phase(url: str, jobs: list[dict], concurrency: int, timeout: float) -> tuple[list, float, int]:
    limit = asyncio.Semaphore(concurrency)
    results: list[str | None] = [None] * len(jobs)
    errors = 0

    async def one(client: httpx.AsyncClient, index: int, body: dict) -> None:
        nonlocal errors
        async with limit:
            try:
                response = await client.post(f"{url}/v1/completions", json=body)
                response.raise_for_status()
                results[index] = response.json()["choices"][0]["text"]
            except (httpx.HTTPError, KeyError):
                errors += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, i, body) for i, body in enumerate(jobs))), timeout)
    return results, time.perf_counter() - started, errors


def main() -> int:
    parser = argparse.ArgumentParser(description="Loopback load test of the prefix server.")
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke run)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefixes", type=int, default=4, choices=range(1, len(STYLES) + 1))
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase, at most")
    parser.add_argument("--json", default="benchmarks/results/load_test.json")
    args = parser.parse_args()

    model, tokenizer = base_model(args.quick)
    store = Path(tempfile.mkdtemp(prefix="prefixtune-store-"))
    names = write_store(model, tokenizer, store, args.prefixes)
    app, engine, _ = build_app(model, tokenizer, str(store), max_batch_size=args.concurrency, engine="microbatch")
    with running(app) as url:
        phases = run_phases(url, engine, names, args)
    engine.close()
    return report(phases, names, args)


def run_phases(url: str, engine, names: list[str], args) -> dict:
    jobs = [
        {"model": names[i % len(names)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens - (i % 4)}
        for i in range(args.requests)
    ]

    phases = {}
    reference, seconds, errors = asyncio.run(run_phase(url, jobs, 1, args.timeout))
    phases["alone (concurrency 1)"] = {"seconds": seconds, "errors": errors, "mismatches": 0}
    for label, mix in (("mixed prefixes per batch", True), ("one prefix per batch", False)):
        engine.mix_prefixes = mix
        before = engine.stats()
        outputs, seconds, errors = asyncio.run(run_phase(url, jobs, args.concurrency, args.timeout))
        mismatches = sum(1 for got, want in zip(outputs, reference, strict=True) if got is not None and got != want)
        batches = engine.stats().batches - before.batches
        phases[label] = {
            "seconds": seconds,
            "errors": errors,
            "mismatches": mismatches,
            "mean_batch_rows": (engine.stats().batch_rows - before.batch_rows) / max(batches, 1),
        }
    return phases


def report(phases: dict, names: list[str], args) -> int:
    for phase in phases.values():
        phase["requests_per_second"] = args.requests / phase["seconds"]
    base_rps = phases["one prefix per batch"]["requests_per_second"]
    print(
        f"\n{args.requests} requests, {args.concurrency} concurrent, {len(names)} prefixes "
        f"({'tiny random Llama' if args.quick else 'SmolLM2-135M'}), greedy, {platform.processor() or 'cpu'}"
    )
    print(f"{'phase':28} {'req/s':>8} {'vs one-prefix':>14} {'errors':>7} {'mismatches':>11} {'rows/batch':>11}")
    for label, phase in phases.items():
        rows = phase.get("mean_batch_rows", 1.0)
        print(
            f"{label:28} {phase['requests_per_second']:8.2f} {phase['requests_per_second'] / base_rps:13.2f}x "
            f"{phase['errors']:7d} {phase['mismatches']:11d} {rows:11.1f}"
        )
    summary = {"args": vars(args), "prefixes": names, "torch_threads": torch.get_num_threads(), "cpu": cpu_record()}
    summary["phases"] = phases
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    failed = any(phase["errors"] or phase["mismatches"] for phase in phases.values())
    print("FAILED: errors or mismatches" if failed else "ok: 0 errors, 0 mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
