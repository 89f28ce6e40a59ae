"""S-LoRA-style serving benchmark on loopback: Poisson arrivals, power-law prefix popularity over N
prefixes, prompt lengths and max_tokens drawn per request; the engines named by --engines
(microbatch, continuous, vllm) in the same run (ratios side by side: the machine is shared and noisy).

Phases (each bounded in requests and seconds; greedy, streaming clients):
  1. alone:        --alone requests one at a time on the continuous engine (the TTFT of a request alone)
  2. saturation:   all requests at once, N=1 prefix, old engine, then new engine (throughput ratio)
  3. N prefixes:   all requests at once on the new engine with N = 8, 100 and --many prefixes (vs N=1)
  4. half rate:    Poisson arrivals at half the new engine's saturation rate, N = --many (p99 TTFT)
  5. vllm:         `prefixtune serve --engine vllm` as a subprocess of the vLLM environment's python
                   (--vllm-python): alone, saturation with 1 prefix, with no prefix (the same requests
                   on the bare model: vLLM's own throughput) and with --many prefixes, half rate; each
                   phase starts with vLLM's prefix cache emptied (the phases repeat prompts).
Every phase's outputs are compared per request with the same request on the other engine / alone;
the vllm phases with `PrefixModel.generate` of each request alone (float32, greedy): outputs must be
equal (mismatches are reported, and make the exit status non-zero). The JSON is rewritten after every
phase (``outcome``: ``unfinished`` until the end, ``stopped: ...`` if a phase failed or timed out).

    .venv/bin/python benchmarks/serve_bench.py                 # SmolLM2-135M (a few minutes on 2 cores)
    .venv/bin/python benchmarks/serve_bench.py --quick         # tiny random Llama, smoke run
    .venv/bin/python benchmarks/serve_bench.py --engines microbatch,continuous,vllm   # after setup.sh --vllm
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from load_test import base_model
from prefixtune import PrefixConfig, PrefixModel
from prefixtune.data import PromptFormatter
from prefixtune.files import WEIGHTS_NAME
from prefixtune.precision import cpu_record
from prefixtune.serving import BASE_NAME, Limits, build_app
from prefixtune.serving.background import free_port, running, wait_healthy
from prefixtune.serving.interface import greedy_reference

ENGINES = ("microbatch", "continuous", "vllm")


def write_store(model, tokenizer, folder: Path, count: int, length: int) -> list[str]:
    """`count` random prefixes (the serving cost does not depend on what a prefix learnt)."""
    writer = PrefixModel(model, name=None, tokenizer=tokenizer)
    names = [f"p{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        writer.add_prefix(name, PrefixConfig(prefix_length=length, init_std=0.5))
        writer.save_prefix(folder / name, name)
        writer.delete_prefix(name)
    return names


def workload(tokenizer, count: int, prefixes: int, args, seed: int) -> list[dict]:
    """Requests with Zipf(1) prefix popularity, uniform prompt lengths and max_tokens, Poisson gaps.
    The same `seed` gives the same prompts, lengths and gaps whatever `prefixes` is (its own stream
    draws the prefixes), so N=1 and N=many phases differ only in their prefixes."""
    rng, popularity = random.Random(seed), random.Random(seed + 1)
    weights = [1 / (rank + 1) for rank in range(prefixes)]
    # get_vocab() comes in no fixed order: sorted, then sampled by the seed, the prompts repeat across runs
    words = random.Random(seed).sample(sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2), 5000)
    jobs, at = [], 0.0
    for _ in range(count):
        length = rng.randint(*args.prompt_tokens)
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(length)), add_special_tokens=False)["input_ids"]
        prompt = tokenizer.decode(ids[:length])
        name = f"p{popularity.choices(range(prefixes), weights)[0]:04d}"
        jobs.append({"model": name, "prompt": prompt, "max_tokens": rng.randint(*args.max_tokens), "at": at})
        at += rng.expovariate(1.0)  # unit-rate gaps, scaled by the phase's rate
    return jobs


async def one(http: httpx.AsyncClient, url: str, job: dict, start: float, rate: float | None) -> dict:
    if rate:
        await asyncio.sleep(max(start + job["at"] / rate - time.perf_counter(), 0))
    sent = time.perf_counter()
    body = {k: job[k] for k in ("model", "prompt", "max_tokens")} | {"stream": True}
    body["stream_options"] = {"include_usage": True}  # the server's own token counts, in the last chunk
    first, chunks, text, error, usage = None, 0, "", None, {}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("text"):
                    first = first or time.perf_counter()
                    chunks += 1
                    text += choice["text"]
    except httpx.HTTPError as problem:
        error = repr(problem)
    end = time.perf_counter()
    return {
        "sent": sent,
        "ttft": (first or end) - sent,
        "end": end,
        "chunks": chunks,
        "text": text,
        "error": error,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
    }


async def phase(url: str, jobs: list[dict], rate: float | None, timeout: float) -> tuple[list[dict], float]:
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout) as http:
        calls = [one(http, url, job, start, rate) for job in jobs]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout)
    return results, time.perf_counter() - start


def summary(results: list[dict], seconds: float, reference: list[dict] | None) -> dict:
    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    ttft = [r["ttft"] for r in results]
    tpot = [(r["end"] - r["sent"] - r["ttft"]) / (r["chunks"] - 1) for r in results if r["chunks"] > 1]
    mismatches = (
        0 if reference is None else sum(r["text"] != w["text"] for r, w in zip(results, reference, strict=True))
    )
    return {
        "requests": len(results),
        "seconds": seconds,
        "req_per_s": len(results) / seconds,
        "output_tok_per_s": sum(r["chunks"] for r in results) / seconds,
        # prompt + generated tokens: the work done, whatever length each prefix makes its outputs
        "processed_tok_per_s": sum(r["prompt_tokens"] + r["completion_tokens"] for r in results) / seconds,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50) if tpot else None,
        "tpot_p99": pct(tpot, 99) if tpot else None,
        "errors": sum(r["error"] is not None for r in results),
        "mismatches": mismatches,
    }


class Phases(dict):
    """Phase results, each printed and written to the JSON when it is measured (a long run shows its
    progress, and a run stopped midway leaves what it measured, marked unfinished)."""

    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.began = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def __setitem__(self, label: str, value: dict) -> None:
        super().__setitem__(label, value)
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {json.dumps(value)}", flush=True)
        self.write()

    def write(self, ratios: dict | None = None, outcome: str = "unfinished") -> None:
        """The JSON so far: the phases, and the ratios once the run is done (`outcome`: how it ended)."""
        machine = {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "note": self.args.note,
        }
        ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        result = {"args": vars(self.args), "cpu": cpu_record(), "machine": machine, "began": self.began}
        result |= {"written": ended, "outcome": outcome, "phases": dict(self), "ratios": ratios or {}}
        Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.json).write_text(json.dumps(result, indent=2))


def serve(engine: str, args, store: Path, phases: Phases):
    model, tokenizer = base_model(args.quick)
    limits = Limits(max_prompt_tokens=400, max_tokens=args.max_tokens[1], max_queue=None)
    started = time.perf_counter()  # the base is loaded: this is the store and the engine
    served = build_app(model, tokenizer, str(store), limits=limits, max_batch_size=args.batch, engine=engine)
    phases[f"start-up, {engine} engine, store of {args.many} (s)"] = {"seconds": time.perf_counter() - started}
    return served


@contextmanager
def vllm_server(args, store: Path, model: str, phases: Phases, token: str) -> Iterator[str]:
    """`prefixtune serve --engine vllm` as a subprocess of the vLLM environment's python (vLLM pins
    another transformers than this one), on a free loopback port, admin API behind `token`; yields its URL."""
    port = free_port()
    command = [args.vllm_python, "-m", "prefixtune", "serve", "--engine", "vllm", "--model", model]
    command += ["--admin-token", token]
    command += ["--prefix-store", str(store), "--port", str(port), "--max-batch-size", str(args.batch)]
    command += ["--max-prompt-tokens", "400", "--max-tokens", str(args.max_tokens[1]), "--max-queue", "100000"]
    command += ["--vllm-kv-cache-gb", str(args.vllm_kv_cache_gb), "--dtype", "float32", "--device", "cpu"]
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = os.environ | {"PYTHONPATH": source + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = store.with_name(f"{store.name}-vllm-server.log")  # vLLM's own output, beside the temporary store
    print(f"vLLM server output: {log}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, args.timeout)  # RuntimeError if it exits first or takes longer
        phases[f"start-up, vllm engine (server process), store of {args.many} (s)"] = {
            "seconds": time.perf_counter() - started
        }
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def references(model, tokenizer, store: Path, jobs: list[dict], known: dict) -> list[dict]:
    """Each request generated alone by `PrefixModel.generate` (greedy, float32) from the store's own
    files: what every engine must answer, as results `summary` compares texts with. `known`: texts of
    requests generated before (workloads share prompts; `--references-cache`: earlier runs), by
    `reference_key`; new ones are added to it."""
    wrapper = PrefixModel(model, name=None, tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer)
    texts = []
    for job in jobs:
        name, ids = job["model"], formatter.prompt_ids(job["prompt"])
        key = reference_key(wrapper, store, name, ids, job["max_tokens"])
        if key not in known:
            known[key] = {"text": generate_alone(wrapper, store, name, ids, job["max_tokens"])}
        texts.append(known[key])
    return texts


def reference_key(wrapper: PrefixModel, store: Path, name: str, ids: list[int], max_tokens: int) -> str:
    """What a greedy answer depends on: the base (its fingerprint), the prefix file's bytes, the prompt ids
    and max_tokens."""
    digest = hashlib.sha256(json.dumps([wrapper.fingerprint, ids, max_tokens]).encode())
    if name != BASE_NAME:
        digest.update((store / name / WEIGHTS_NAME).read_bytes())
    return digest.hexdigest()


def generate_alone(wrapper: PrefixModel, store: Path, name: str, ids: list[int], max_tokens: int) -> str:
    if name != BASE_NAME and name not in wrapper.prefixes:
        wrapper.load_prefix(store / name, name=name)
    tokenizer = wrapper.tokenizer
    output = greedy_reference(wrapper, ids, name, max_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tokenizer.decode(output, skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="S-LoRA-style serving benchmark, engines side by side.")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (smoke run)")
    parser.add_argument("--engines", default="microbatch,continuous", help="any of microbatch,continuous,vllm")
    parser.add_argument("--requests", type=int, default=32, help="requests per phase")
    parser.add_argument("--many", type=int, default=1000, help="prefixes in the store and the last N phase")
    parser.add_argument("--alone", type=int, default=8, help="requests sent one at a time (TTFT alone)")
    parser.add_argument(
        "--prefix-counts", type=int, nargs="*", default=[8, 100], help="N of the continuous engine's N-prefix phases"
    )
    parser.add_argument("--prefix-length", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(8, 256))
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(8, 128))
    parser.add_argument("--batch", type=int, default=16, help="rows decoded together (every engine)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per phase, at most")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM environment")
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--note", default="", help="recorded in the JSON, e.g. that the cores were shared")
    parser.add_argument(
        "--references-cache",
        default=None,
        help="JSON file of PrefixModel.generate answers (by base, prefix bytes, prompt, max_tokens): read, "
        "completed and written back, so a rerun does not generate them again",
    )
    parser.add_argument("--json", default="benchmarks/results/serve_bench.json")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")

    model, tokenizer = base_model(args.quick)
    store = Path(tempfile.mkdtemp(prefix="prefixtune-bench-"))
    began = time.perf_counter()
    write_store(model, tokenizer, store, args.many, args.prefix_length)
    store_seconds = time.perf_counter() - began
    one_prefix = workload(tokenizer, args.requests, 1, args, seed=1)
    counts = sorted({n for n in (*args.prefix_counts, args.many) if n <= args.many})
    by_count = {n: workload(tokenizer, args.requests, n, args, seed=1) for n in counts}
    phases = Phases(args)
    old = None
    try:
        if "microbatch" in engines:
            old = microbatch_arm(args, store, one_prefix, phases)
        if "continuous" in engines:
            continuous_arm(args, store, one_prefix, by_count, old, phases)
        if "vllm" in engines:
            vllm_arm(args, store, model, tokenizer, one_prefix, by_count[args.many], phases)
    except BaseException as error:  # the JSON says where the run stopped (a phase timeout, Ctrl-C)
        phases.write(outcome=f"stopped: {error!r}")
        raise
    return report(phases, args, store_seconds)


def microbatch_arm(args, store: Path, one_prefix: list[dict], phases: Phases) -> list[dict]:
    app, engine, _ = serve("microbatch", args, store, phases)
    with running(app) as url:
        old, seconds = asyncio.run(phase(url, one_prefix, None, args.timeout))
    engine.close()
    phases["saturation, 1 prefix, old engine"] = summary(old, seconds, None)
    return old


def continuous_arm(args, store: Path, one_prefix, by_count: dict[int, list[dict]], old, phases: Phases) -> None:
    app, engine, _ = serve("continuous", args, store, phases)
    with running(app) as url:
        alone = [asyncio.run(phase(url, [job], None, args.timeout))[0][0] for job in one_prefix[: args.alone]]
        phases["alone"] = summary(alone, sum(r["end"] - r["sent"] for r in alone), old and old[: args.alone])
        new, seconds = asyncio.run(phase(url, one_prefix, None, args.timeout))
        phases["saturation, 1 prefix, new engine"] = summary(new, seconds, old)
        for count, jobs in by_count.items():
            results, seconds = asyncio.run(phase(url, jobs, None, args.timeout))
            phases[f"saturation, {count} prefixes, new engine"] = summary(results, seconds, None)
        many_new = results  # the last: --many prefixes, the half-rate phase's reference
        rate = phases[f"saturation, {args.many} prefixes, new engine"]["req_per_s"] / 2
        half, seconds = asyncio.run(phase(url, by_count[args.many], rate, args.timeout))
        phases[f"half rate ({rate:.2f} req/s), {args.many} prefixes, new engine"] = summary(half, seconds, many_new)
    engine.close()


def vllm_arm(args, store: Path, model, tokenizer, one_prefix: list[dict], many: list[dict], phases: Phases) -> None:
    """The vLLM engine's phases; every answer is compared with `PrefixModel.generate` alone."""
    plain = [job | {"model": BASE_NAME} for job in one_prefix]  # the same requests without a prefix
    cache = Path(args.references_cache) if args.references_cache else None
    known = json.loads(cache.read_text()) if cache and cache.exists() else {}
    began, cached = time.perf_counter(), len(known)
    workloads = (("one", one_prefix), ("many", many), ("plain", plain))
    expected = {key: references(model, tokenizer, store, jobs, known) for key, jobs in workloads}
    if cache:
        cache.write_text(json.dumps(known))
    phases["references by PrefixModel.generate alone"] = {
        "seconds": time.perf_counter() - began,
        "generated now": len(known) - cached,
        "read from --references-cache (generated by an earlier run of this script)": cached,
    }
    folder = "smollm2-135m"
    if args.quick:  # vLLM loads models from folders
        folder = tempfile.mkdtemp(prefix="prefixtune-bench-model-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    token = secrets.token_hex(8)
    with vllm_server(args, store, str(folder), phases, token) as url:
        # Every phase starts with vLLM's prefix cache empty: the phases send the same prompts, which vLLM
        # would otherwise find cached from the phase before (the in-process engines cache nothing).
        # Within a phase, a prefix's blocks stay cached by its salt: that is what is measured.
        reset_prefix_cache(url, token)
        alone = [asyncio.run(phase(url, [job], None, args.timeout))[0][0] for job in one_prefix[: args.alone]]
        seconds = sum(r["end"] - r["sent"] for r in alone)
        phases["alone, vllm"] = summary(alone, seconds, expected["one"][: args.alone])
        for label, jobs, key in (("1 prefix", one_prefix, "one"), ("no prefix", plain, "plain")):
            reset_prefix_cache(url, token)
            results, seconds = asyncio.run(phase(url, jobs, None, args.timeout))
            phases[f"saturation, {label}, vllm"] = summary(results, seconds, expected[key])
        reset_prefix_cache(url, token)
        results, seconds = asyncio.run(phase(url, many, None, args.timeout))
        phases[f"saturation, {args.many} prefixes, vllm"] = summary(results, seconds, expected["many"])
        rate = phases[f"saturation, {args.many} prefixes, vllm"]["req_per_s"] / 2
        reset_prefix_cache(url, token)
        half, seconds = asyncio.run(phase(url, many, rate, args.timeout))
        phases[f"half rate ({rate:.2f} req/s), {args.many} prefixes, vllm"] = summary(half, seconds, expected["many"])


def reset_prefix_cache(url: str, token: str) -> None:
    """Empty the vLLM server's prefix cache (``POST /admin/prefix-cache/reset``)."""
    answer = httpx.post(f"{url}/admin/prefix-cache/reset", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    answer.raise_for_status()


def ratios_of(phases: dict, args) -> dict[str, float]:
    """The goals' ratios, for the engines that ran (each measured side by side in this run)."""
    ratios: dict[str, float] = {}
    one = phases.get("saturation, 1 prefix, new engine")
    old = phases.get("saturation, 1 prefix, old engine")
    # The old and new engines get the same requests and give the same outputs: any count compares.
    # Different prefixes end their outputs at other lengths, so N prefixes vs 1 compares the work
    # done (prompt + generated tokens per second); output tokens per second are in the table too.
    if one and old:
        ratios["new/old throughput at saturation (goal >= 1.5)"] = one["output_tok_per_s"] / old["output_tok_per_s"]
    if one:
        for label, p in phases.items():
            if label.startswith("saturation, ") and label.endswith("prefixes, new engine"):
                goal = " (goal >= 0.9)" if label == f"saturation, {args.many} prefixes, new engine" else ""
                ratios[f"{label.split(', ')[1]} vs 1, new engine, processed tok/s{goal}"] = (
                    p["processed_tok_per_s"] / one["processed_tok_per_s"]
                )
        half = next(label for label in phases if label.startswith("half rate") and label.endswith("new engine"))
        ratios["half-rate p99 TTFT / TTFT alone (goal <= 3)"] = phases[half]["ttft_p99"] / phases["alone"]["ttft_p50"]
    vllm_one = phases.get("saturation, 1 prefix, vllm")
    if vllm_one:
        many, plain = phases[f"saturation, {args.many} prefixes, vllm"], phases["saturation, no prefix, vllm"]
        if one:
            ratios["vllm/continuous throughput at saturation, 1 prefix, output tok/s"] = (
                vllm_one["output_tok_per_s"] / one["output_tok_per_s"]
            )
        ratios[f"{args.many} prefixes vs 1, vllm, processed tok/s (goal >= 0.95)"] = (
            many["processed_tok_per_s"] / vllm_one["processed_tok_per_s"]
        )
        ratios[f"{args.many} prefixes vs no prefix, vllm, processed tok/s (goal >= 0.95)"] = (
            many["processed_tok_per_s"] / plain["processed_tok_per_s"]
        )
        ratios["1 prefix vs no prefix, vllm, processed tok/s (goal >= 0.95)"] = (
            vllm_one["processed_tok_per_s"] / plain["processed_tok_per_s"]
        )
        half = next(label for label in phases if label.startswith("half rate") and label.endswith("vllm"))
        ratios["half-rate p99 TTFT / TTFT alone, vllm (goal <= 3)"] = (
            phases[half]["ttft_p99"] / phases["alone, vllm"]["ttft_p50"]
        )
    return ratios


def report(phases: Phases, args, store_seconds: float) -> int:
    ratios = ratios_of(phases, args)
    model = "tiny random Llama" if args.quick else "SmolLM2-135M"
    print(
        f"\n{args.requests} requests/phase, prompts {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, "
        f"batch {args.batch}, {model}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; "
        f"store of {args.many} prefixes written in {store_seconds:.1f} s"
    )
    columns = "req/s | out tok/s | processed tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | errors | mismatches"
    print(f"| phase | {columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, p in phases.items():
        if "req_per_s" not in p:
            print(f"| {label} | {p['seconds']:.2f} s | | | | | | | | |")
            continue
        tpot = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
        print(
            f"| {label} | {p['req_per_s']:.2f} | {p['output_tok_per_s']:.1f} | {p['processed_tok_per_s']:.1f} "
            f"| {p['ttft_p50'] * 1000:.0f} ms "
            f"| {p['ttft_p99'] * 1000:.0f} ms | {tpot(p['tpot_p50'])} | {tpot(p['tpot_p99'])} | {p['errors']} "
            f"| {p['mismatches']} |"
        )
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}x")
    failed = any(p.get("errors") or p.get("mismatches") for p in phases.values())
    phases.write(ratios, "errors or mismatches" if failed else "ok")
    print("FAILED: errors or mismatches" if failed else "ok: 0 errors, 0 mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
