"""Context distillation benchmark: distil the committed ferry handbook (invented facts + voice rules,
1,314 SmolLM2 tokens) into a P=32 prefix and measure, side by side in one run:

  1. time to distil (self-study samples + training) with `prefixtune.distill`;
  2. quality on the handbook's questions (exact answer match) for the teacher (base + handbook as
     the system message), the bare model and the student, and KL / top-1 agreement to the teacher on
     held-out self-study prompts (the distill report);
  3. PEFT's `CartridgeConfig` (KV prefix, first token frozen, init from the handbook's KV) trained on
     the same samples, steps, batch size and learning rate with the same loss: KL, top-1, accuracy;
     step time and peak memory, ours with gradient checkpointing (PEFT refuses it for prompt
     learning), each in its own process;
  4. serving the same requests through the server (continuous engine): the full handbook in every
     prompt vs the distilled prefix: throughput, TTFT p50, and the outputs compared.

    nice -n 10 .venv/bin/python benchmarks/distill_bench.py            # SmolLM2-135M, the recorded run
    .venv/bin/python benchmarks/distill_bench.py --samples 16 --steps 4 --requests 8   # a short check
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
CONTEXT = HERE / "distill_context" / "handbook.md"
QUESTIONS = HERE / "distill_context" / "questions.jsonl"
RESULTS = HERE / "results" / "distill_bench.json"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="self-study prompts the teacher writes")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--prefix-length", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--question-tokens", type=int, default=24, help="greedy tokens per handbook question")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--measure-steps", type=int, default=3, help="timed steps per variant for step time/memory")
    parser.add_argument(
        "--questions", type=int, default=None, help="only the first N handbook questions (a short check)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the cores are shared, see BENCHMARKS.md)"
    )
    parser.add_argument("--work", default=None, help="folder for the run (default: a temp folder)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--measure", choices=("ours", "peft"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--cache-folder", help=argparse.SUPPRESS)
    return parser.parse_args()


def questions(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def accuracy(outputs: list[str], rows: list[dict]) -> float:
    """Exact answer match: the answer string appears in the output (case-insensitive)."""
    return sum(row["answer"].lower() in out.lower() for out, row in zip(outputs, rows, strict=True)) / len(rows)


def distil(args, work: Path) -> tuple[dict, float]:
    from prefixtune import distill

    started = time.perf_counter()
    report = distill(
        context=str(CONTEXT),
        output=str(work / "handbook"),
        prefix_length=args.prefix_length,
        freeze_first=True,  # as PEFT's CartridgeConfig (num_frozen_tokens=1)
        samples=args.samples,
        held_out=0.15,
        max_answer_tokens=args.max_answer_tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        chat_template=True,
        dtype=args.dtype,
        device="cpu",
        gradient_checkpointing=True,
        group_by_length=True,
        cache=str(work / "cache"),
    )
    return report, time.perf_counter() - started


def teacher_model(args, work: Path):
    """SmolLM2 with the teacher prefix (the handbook, exactly) and the distilled student."""
    from prefixtune import PrefixModel, load_base_model
    from prefixtune.data import PromptFormatter
    from prefixtune.distillation.context import load_context
    from prefixtune.distillation.prefixes import add_teacher

    base, tokenizer = load_base_model("smollm2-135m", dtype=args.dtype)
    formatter = PromptFormatter(tokenizer, chat_template=True)
    context = load_context(CONTEXT, formatter)
    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    add_teacher(model, context.ids)
    model.load_prefix(work / "handbook", name="student")
    return model.eval(), formatter, context


def question_accuracy(model, formatter, args) -> dict:
    from prefixtune.distillation.prefixes import TEACHER
    from prefixtune.evaluation import generate_completions

    rows = questions(args.questions)
    prompts = [row["prompt"] for row in rows]
    result = {}
    for variant, prefix in (("teacher", TEACHER), ("bare", ""), ("student", "student")):
        outputs = generate_completions(model, formatter, prompts, prefix=prefix, max_new_tokens=args.question_tokens)
        result[variant] = {"accuracy": accuracy(outputs, rows), "outputs": outputs}
    return result


def samples_from(report: dict):
    from prefixtune.distillation.selfstudy import load_samples

    samples = load_samples(Path(report["samples"]["cache"]))
    return [s for s in samples if not s.held_out], [s for s in samples if s.held_out]


@torch.no_grad()
def kl_and_top1(teacher, formatter, samples, logits_of) -> dict:
    """Full-vocabulary KL to the teacher and top-1 agreement on the answers, for any model's logits."""
    from prefixtune.distillation.loss import full_kl
    from prefixtune.distillation.prefixes import TEACHER
    from prefixtune.distillation.trainer import collate, distill_rows

    rows = distill_rows(samples, formatter)
    kl = agree = tokens = 0.0
    for start in range(0, len(rows), 8):
        batch = collate([rows[i] for i in range(start, min(start + 8, len(rows)))], formatter.tokenizer.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        target = teacher(**inputs, prefix=TEACHER).logits
        logits = logits_of(inputs)
        mask = batch["answer_mask"]
        count = mask.sum().item()
        kl += full_kl(logits, target, mask).item() * count
        agree += ((logits.argmax(-1) == target.argmax(-1)) & mask).sum().item()
        tokens += count
    return {"kl": kl / tokens, "top1_agreement": agree / tokens}


def peft_cartridge(args, dtype: str):
    """PEFT's CartridgeConfig on a fresh SmolLM2: P virtual tokens, the first frozen, from the handbook's KV."""
    from peft import CartridgeConfig, get_peft_model, initialize_kv_prefix_from_text

    from prefixtune import load_base_model

    base, tokenizer = load_base_model("smollm2-135m", dtype=dtype)
    config = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_length, num_frozen_tokens=1)
    model = get_peft_model(base, config)
    initialize_kv_prefix_from_text(model, tokenizer, text=CONTEXT.read_text().strip(), use_chat_template=True)
    return model, tokenizer


def peft_step(model, optimizer, scheduler, batch) -> float:
    from prefixtune.distillation.loss import topk_kl

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = topk_kl(logits, batch["topk_indices"], batch["topk_logprobs"], batch["answer_mask"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def peft_optimizer(model, args):
    from transformers import get_linear_schedule_with_warmup

    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    return optimizer, get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)


def train_peft(model, formatter, train, args) -> dict:
    """The same samples, steps, batch size, learning rate schedule and loss as the distill run."""
    from prefixtune.distillation.trainer import collate, distill_rows

    rows = distill_rows(train, formatter)
    optimizer, scheduler = peft_optimizer(model, args)
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    losses, started = [], time.perf_counter()
    model.train()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        picked, order = order[: args.batch_size], order[args.batch_size :]
        losses.append(
            peft_step(model, optimizer, scheduler, collate([rows[i] for i in picked], formatter.tokenizer.pad_token_id))
        )
    model.eval()
    return {"seconds": time.perf_counter() - started, "first_loss": losses[0], "last_loss": losses[-1]}


@torch.no_grad()
def peft_greedy(model, formatter, prompts: list[str], tokens: int) -> list[str]:
    """Greedy answers by a full forward per token, one prompt at a time (no cache, no padding: PEFT's
    prefix is surely in place)."""
    tokenizer, outputs = formatter.tokenizer, []
    for prompt in prompts:
        ids = torch.tensor([formatter.prompt_ids(prompt)])
        start = ids.shape[1]
        for _ in range(tokens):
            next_id = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], 1)
            if next_id.item() == tokenizer.eos_token_id:
                break
        outputs.append(tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip())
    return outputs


class RssSampler:
    """Samples this process's resident memory every 2 ms on a thread; `stop` gives the peak in MB
    above the memory resident when it started (the loaded model). ru_maxrss cannot: loading peaks higher."""

    def __init__(self) -> None:
        import threading

        self.start, self.peak, self.running = self.rss(), 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return (max(self.peak, self.rss()) - self.start) / 2**20


def measure(args) -> None:
    """Child process: median step time and peak memory above the loaded model of one trainer's step,
    on the same fixed batch (the first training samples). Prints one JSON line."""
    from prefixtune import PrefixConfig, PrefixModel, load_base_model
    from prefixtune.data import PromptFormatter
    from prefixtune.distillation.context import load_context
    from prefixtune.distillation.loss import topk_kl
    from prefixtune.distillation.prefixes import add_prefix_from_ids, freeze_first_position
    from prefixtune.distillation.selfstudy import load_samples
    from prefixtune.distillation.trainer import collate, distill_rows

    torch.manual_seed(0)
    samples = [s for s in load_samples(Path(args.cache_folder)) if not s.held_out][: args.batch_size]
    if args.measure == "ours":
        base, tokenizer = load_base_model("smollm2-135m", dtype=args.dtype)
        formatter = PromptFormatter(tokenizer, chat_template=True)
        model = PrefixModel(base, name=None, tokenizer=tokenizer)
        config = PrefixConfig(prefix_length=args.prefix_length, init="activations", init_text="-")
        add_prefix_from_ids(model, "student", config, load_context(CONTEXT, formatter).ids)
        freeze_first_position(model, "student")
        model.gradient_checkpointing_enable()
        forward = lambda batch: model(**batch, prefix="student").logits  # noqa: E731
    else:
        model, tokenizer = peft_cartridge(args, args.dtype)
        formatter = PromptFormatter(tokenizer, chat_template=True)
        forward = lambda batch: model(**batch).logits  # noqa: E731
    model.train()
    batch = collate(distill_rows(samples, formatter), formatter.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    sampler = RssSampler()  # the peak of the steps themselves, above what is resident before them
    seconds = []
    for _ in range(args.measure_steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        loss = topk_kl(forward(inputs), batch["topk_indices"], batch["topk_logprobs"], batch["answer_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
    tokens = int(batch["attention_mask"].sum())
    result = {"step_seconds": statistics.median(seconds[1:]), "peak_mb_above_model": sampler.stop()}
    print(json.dumps(result | {"batch_tokens": tokens, "batch_shape": list(batch["input_ids"].shape)}))


def measured(args, cache_folder: str, variant: str) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--cache-folder", cache_folder]
    command += ["--batch-size", str(args.batch_size), "--prefix-length", str(args.prefix_length), "--dtype", args.dtype]
    command += ["--measure-steps", str(args.measure_steps), "--lr", str(args.lr), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def serving(args, work: Path, formatter, context) -> dict:
    """The same requests through the server: the whole handbook in every prompt (to the bare model,
    as the teacher reads it) vs the distilled prefix; both on the continuous engine, streamed."""
    import asyncio

    from rouge_score import rouge_scorer

    from prefixtune import load_base_model
    from prefixtune.serving import Limits, build_app
    from prefixtune.serving.background import running
    from serve_bench import phase, summary

    store = work / "store"
    store.mkdir()
    shutil.copytree(work / "handbook", store / "handbook")
    asked = questions(args.questions)
    rows = [asked[i % len(asked)] for i in range(args.requests)]
    tokenizer = formatter.tokenizer
    full = []
    for row in rows:
        ids = context.teacher_ids(formatter.prompt_ids(row["prompt"]))
        full.append(tokenizer.decode(ids).removesuffix("\n"))  # the server's base template adds the "\n" back
    same_ids = all(
        tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        == context.teacher_ids(formatter.prompt_ids(r["prompt"]))
        for text, r in zip(full, rows, strict=True)
    )
    jobs = {
        "full context": [{"model": "base", "prompt": text, "max_tokens": args.question_tokens} for text in full],
        "distilled prefix": [
            {"model": "handbook", "prompt": r["prompt"], "max_tokens": args.question_tokens} for r in rows
        ],
    }
    base, _ = load_base_model("smollm2-135m", dtype=args.dtype)
    limits = Limits(max_prompt_tokens=4096, max_tokens=args.question_tokens, max_queue=None)
    app, engine, _ = build_app(base, tokenizer, str(store), limits=limits, max_batch_size=16, engine="continuous")
    results = {}
    try:
        with running(app) as url:
            for label, phase_jobs in jobs.items():
                outputs, seconds = asyncio.run(phase(url, phase_jobs, None, 3600))
                results[label] = summary(outputs, seconds, None) | {
                    "accuracy": accuracy([o["text"] for o in outputs], rows),
                    "texts": [o["text"] for o in outputs],
                }
    finally:
        engine.stop()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    a, b = results["full context"]["texts"], results["distilled prefix"]["texts"]
    compared = {
        "identical_outputs": sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)),
        "rougeL_distilled_vs_full": 100
        * statistics.mean(scorer.score(x, y)["rougeL"].fmeasure for x, y in zip(a, b, strict=True)),
        "full_context_prompt_ids_equal_teacher_ids": same_ids,
    }
    return results | {"compared": compared}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def goals(result: dict) -> dict:
    """Each goal of issue 19 as (measured value, "<=", ">=" or "<", target)."""
    quality, peft, serve, step = result["questions"], result["peft_cartridge"], result["serving"], result["step"]
    gain = quality["teacher"]["accuracy"] - quality["bare"]["accuracy"]
    full, distilled = serve["full context"], serve["distilled prefix"]
    measured = {
        "accuracy gain recovered (student - bare) / (teacher - bare)": (
            ratio(quality["student"]["accuracy"] - quality["bare"]["accuracy"], gain) if gain > 0 else None,
            ">=",
            0.8,
        ),
        "held-out top-1 agreement with the teacher": (result["held_out"]["student"]["top1_agreement"], ">=", 0.8),
        "compression ratio (context tokens / P)": (result["compression_ratio"], ">=", 30),
        "held-out KL ours / PEFT cartridge": (ratio(result["ours_vs_peft"]["ours"]["kl"], peft["kl"]), "<=", 1.0),
        "question accuracy ours - PEFT cartridge": (quality["student"]["accuracy"] - peft["accuracy"], ">=", 0.0),
        "step time ours (checkpointing) / PEFT": (
            ratio(step["ours"]["step_seconds"], step["peft"]["step_seconds"]),
            "<=",
            1.0,
        ),
        "peak step memory ours (checkpointing) / PEFT": (
            ratio(step["ours"]["peak_mb_above_model"], step["peft"]["peak_mb_above_model"]),
            "<",
            1.0,
        ),
        "serving throughput, prefix / full context": (ratio(distilled["req_per_s"], full["req_per_s"]), ">=", 5.0),
        "serving TTFT p50, full context / prefix": (ratio(full["ttft_p50"], distilled["ttft_p50"]), ">=", 5.0),
        "time to distil, minutes (samples + training)": (result["seconds"]["distil_total"] / 60, "<=", 20.0),
    }
    checks = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}
    return {
        key: {"value": value, "goal": f"{op} {target}", "met": value is not None and checks[op](value, target)}
        for key, (value, op, target) in measured.items()
    }


def main() -> int:
    args = arguments()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args)
        return 0
    import os

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-bench-"))
    load_before, started = os.getloadavg(), time.perf_counter()
    report, distil_seconds = distil(args, work)
    print(f"[{time.strftime('%H:%M:%S')}] distilled: {json.dumps(report['held_out'])}", flush=True)
    model, formatter, context = teacher_model(args, work)
    quality = question_accuracy(model, formatter, args)
    print(f"[{time.strftime('%H:%M:%S')}] questions: {[(k, v['accuracy']) for k, v in quality.items()]}", flush=True)
    train, held = samples_from(report)
    ours = kl_and_top1(model, formatter, held, lambda inputs: model(**inputs, prefix="student").logits)
    peft, _ = peft_cartridge(args, args.dtype)
    peft_training = train_peft(peft, formatter, train, args)
    peft_result = kl_and_top1(model, formatter, held, lambda inputs: peft(**inputs).logits)
    asked = questions(args.questions)
    peft_outputs = peft_greedy(peft, formatter, [row["prompt"] for row in asked], args.question_tokens)
    peft_result |= {"accuracy": accuracy(peft_outputs, asked), "training": peft_training, "outputs": peft_outputs}
    print(
        f"[{time.strftime('%H:%M:%S')}] peft: {json.dumps({k: v for k, v in peft_result.items() if k != 'outputs'})}",
        flush=True,
    )
    peft = None  # its memory back before the measured processes start
    cache_folder = report["samples"]["cache"]
    step = {variant: measured(args, cache_folder, variant) for variant in ("ours", "peft")}
    print(f"[{time.strftime('%H:%M:%S')}] step: {json.dumps(step)}", flush=True)
    serve = serving(args, work, formatter, context)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "note": "2-core machine shared with other engineers' tests and benchmarks during the run (see load averages); "
        "read ratios, not absolute seconds",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": vars(args),
        "context_tokens": report["context_tokens"],
        "prefix_length": report["prefix_length"],
        "compression_ratio": report["compression_ratio"],
        "samples": report["samples"] | {"cache": None},
        "held_out": report["held_out"],
        "questions": quality,
        "ours_vs_peft": {"ours": ours, "peft": {k: peft_result[k] for k in ("kl", "top1_agreement")}},
        "peft_cartridge": peft_result,
        "step": step,
        "serving": serve,
        "seconds": report["seconds"] | {"distil_total": distil_seconds, "benchmark": time.perf_counter() - started},
    }
    result["goals"] = goals(result)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    for key, goal in result["goals"].items():
        shown = "n/a" if goal["value"] is None else f"{goal['value']:.3f}"
        print(f"{key:62s} {shown:>9s}  goal {goal['goal']:8s} {'met' if goal['met'] else 'NOT met'}")
    print(f"wrote {args.output}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
