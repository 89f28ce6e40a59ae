"""Context distillation benchmark: distil the committed ferry handbook (invented facts written as
questions and answers, plus voice rules; about 1,270 SmolLM2 tokens) into a P=32 prefix and measure,
side by side in one run, each phase written to the JSON as soon as it is measured:

  1. `distil`: time to distil (self-study samples + training) with `prefixtune.distill`, and the
     distill report (KL / top-1 / ROUGE-L to the teacher on held-out self-study prompts);
  2. `quality`: accuracy on the handbook's evaluation questions (`questions.jsonl`, worded unlike
     the handbook and never shown to self-study: exact answer match, the answer string contained in
     the greedy output) for the teacher (base + handbook before the prompt), the bare model, the
     student and the truncated context (its first P tokens);
  3. `peft_cartridge`: PEFT's `CartridgeConfig` (KV prefix, first token frozen, init from the same
     P tokens' keys/values) trained on the same samples, steps, batch size, learning rate schedule
     and loss: KL, top-1, accuracy;
  4. `step`: step time and peak memory of one training step, ours with gradient checkpointing (PEFT
     refuses it for prompt learning: it raises on `gradient_checkpointing_enable`), each in its own process;
  5. `serving`: the same requests through the server (continuous engine), the full handbook in every
     prompt vs the distilled prefix: throughput, TTFT p50, and the outputs compared;
  6. `goals`: each goal of issue 19, measured value against its target.

    nice -n 5 .venv/bin/python benchmarks/distill_bench.py     # SmolLM2-135M, the recorded run
    .venv/bin/python benchmarks/distill_bench.py --quick       # tiny random Llama: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
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
RESULTS = HERE / "results" / "distill_bench" / "distill_bench.json"
TEMPLATE = "Q: {prompt}\n"  # the handbook's own Q/A layout; ends in a newline as the server's base template
QUICK = {"samples": 8, "steps": 2, "batch_size": 4, "max_answer_tokens": 6, "max_prompt_tokens": 8}
QUICK |= {"question_tokens": 4, "questions": 4, "requests": 4, "measure_steps": 1, "dtype": "float32"}
QUICK |= {"measure_rounds": 1}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, a few samples/steps (smoke run)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=360, help="self-study prompts the teacher writes")
    parser.add_argument("--seed-kinds", default="question", help="self-study prompt kinds (selfstudy.SEEDS)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument(
        "--context-weight", type=float, default=0.0, help="KL weighted toward the tokens the context changes (0-1)"
    )
    parser.add_argument("--prefix-length", type=int, default=32)
    parser.add_argument("--parameterization", default="kv", choices=("kv", "mlp", "hidden"), help="ours (PEFT: KV)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--template", default=TEMPLATE)
    parser.add_argument("--chat-template", action="store_true", help="the handbook as the system message instead")
    parser.add_argument("--max-prompt-tokens", type=int, default=24)
    parser.add_argument("--chunk-tokens", type=int, default=32, help="self-study chunks: about one Q/A pair each")
    parser.add_argument("--max-answer-tokens", type=int, default=24)
    parser.add_argument("--generation-batch-size", type=int, default=16, help="rows per teacher generation batch")
    parser.add_argument("--answer-stop", default="\n\n", help="a teacher answer ends at a blank line (Q/A layout)")
    parser.add_argument(
        "--answer-with-chunk",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the teacher answers each self-study prompt with its chunk quoted again before it (measured: no "
        "accuracy gained, top-1 lower, slower samples)",
    )
    parser.add_argument("--question-tokens", type=int, default=20, help="greedy tokens per evaluation question")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--measure-steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--measure-rounds", type=int, default=3, help="interleaved rounds of step timing")
    parser.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="length-grouped batches for ours and PEFT alike (less padding: faster steps)",
    )
    parser.add_argument("--questions", type=int, default=None, help="only the first N evaluation questions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", default=None, help="folder for the run (default: a temp folder)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--only-step", action="store_true", help="distil (samples cached) and time the steps only")
    parser.add_argument(
        "--only-quality", action="store_true", help="distil and score the questions only (a probe of a setting)"
    )
    parser.add_argument(
        "--kl-seeds",
        help="comma-separated data-order seeds: distil and train PEFT's cartridge once per seed on the same "
        "samples and compare held-out KL over the seeds (the KL goal's noise), nothing else",
    )
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--cache-folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.context_weight and not args.only_quality:  # PEFT's phase would train on another loss
        parser.error("--context-weight: PEFT's cartridge phase trains with the plain KL; use it with --only-quality")
    if args.quick:  # the smoke run's sizes replace the defaults and any flag given for them
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


class Record(dict):
    """The benchmark's JSON: each phase is printed and the whole file rewritten (atomically) as soon
    as it is measured, so a run stopped half-way keeps what it measured."""

    def __init__(self, path: str, header: dict) -> None:
        super().__init__(header | {"complete": False})
        self.path = Path(path)

    def phase(self, name: str, value: dict) -> None:
        from prefixtune.files import atomic_write_text
        from prefixtune.precision import cpu_record

        self[name] = value
        self["cpu"] = cpu_record()
        self["load_average_now"] = os.getloadavg()
        shown = {k: v for k, v in value.items() if k not in ("outputs", "texts", "by_question")}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(shown, default=str)[:1500]}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self, indent=2, default=str))


def quick_model(work: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (the handbook fits its window), saved as a folder."""
    from prefixtune import load_base_model
    from quick_model import tiny_llama_for

    _, tokenizer = load_base_model("smollm2-135m", dtype="float32")
    folder = work / "tiny-model"
    tiny_llama_for(tokenizer, max_positions=2048).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def questions(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def correct(outputs: list[str], rows: list[dict]) -> list[bool]:
    """Exact answer match: the answer string appears in the output (case-insensitive)."""
    return [row["answer"].lower() in out.lower() for out, row in zip(outputs, rows, strict=True)]


def accuracy(outputs: list[str], rows: list[dict]) -> float:
    return sum(correct(outputs, rows)) / len(rows)


def distil(args, work: Path, name: str = "handbook", data_seed: int | None = None) -> tuple[dict, float]:
    from prefixtune import distill

    started = time.perf_counter()
    report = distill(
        context=str(CONTEXT),
        output=str(work / name),
        data_seed=data_seed,
        model=args.model,
        prefix_length=args.prefix_length,
        parameterization=args.parameterization,
        freeze_first=True,  # as PEFT's CartridgeConfig (num_frozen_tokens=1)
        samples=args.samples,
        seed_kinds=args.seed_kinds,
        held_out=0.15,
        max_prompt_tokens=args.max_prompt_tokens,
        chunk_tokens=args.chunk_tokens,
        max_answer_tokens=args.max_answer_tokens,
        answer_stop=args.answer_stop or None,
        answer_with_chunk=args.answer_with_chunk,
        generation_batch_size=args.generation_batch_size,
        context_weight=args.context_weight,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        template=args.template,
        chat_template=args.chat_template,
        dtype=args.dtype,
        device="cpu",
        gradient_checkpointing=True,
        group_by_length=args.group_by_length,
        save_every=max(args.steps, 1),
        cache=str(work / "cache"),
    )
    return report, time.perf_counter() - started


def formatter_of(args, tokenizer):
    from prefixtune.data import PromptFormatter

    return PromptFormatter(tokenizer, args.template, args.chat_template)


def teacher_model(args, work: Path, student: str = "handbook"):
    """The base with the teacher prefix (the handbook, exactly), the student and the truncated context."""
    from prefixtune import PrefixConfig, PrefixModel, load_base_model
    from prefixtune.distillation.context import load_context
    from prefixtune.distillation.prefixes import add_prefix_from_ids, add_teacher

    base, tokenizer = load_base_model(args.model, dtype=args.dtype)
    formatter = formatter_of(args, tokenizer)
    context = load_context(CONTEXT, formatter)
    model = PrefixModel(base, name=None, tokenizer=tokenizer)
    add_teacher(model, context.ids)
    model.load_prefix(work / student, name="student")
    truncated = PrefixConfig(prefix_length=args.prefix_length, init="activations", init_text="-")
    add_prefix_from_ids(model, "truncated", truncated, context.ids)
    return model.eval(), formatter, context


def question_accuracy(model, formatter, args) -> dict:
    from prefixtune.distillation.prefixes import TEACHER
    from prefixtune.evaluation import generate_completions

    rows = questions(args.questions)
    prompts = [row["prompt"] for row in rows]
    result = {}
    for variant, prefix in (("teacher", TEACHER), ("bare", ""), ("student", "student"), ("truncated", "truncated")):
        outputs = generate_completions(model, formatter, prompts, prefix=prefix, max_new_tokens=args.question_tokens)
        result[variant] = {"accuracy": accuracy(outputs, rows), "correct": correct(outputs, rows), "outputs": outputs}
        print(f"[{time.strftime('%H:%M:%S')}]   {variant}: accuracy {result[variant]['accuracy']:.3f}", flush=True)
    return result


def samples_from(report: dict):
    from prefixtune.distillation.selfstudy import load_samples

    samples = load_samples(Path(report["samples"]["cache"]))
    return [s for s in samples if not s.held_out], [s for s in samples if s.held_out]


def normalised(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def question_overlap(samples) -> dict:
    """How many self-study prompts are an evaluation question word for word (they should be none:
    the evaluation questions are never shown to self-study, but the teacher may copy the handbook's)."""
    asked = {normalised(row["prompt"]) for row in questions()}
    same = [s.prompt for s in samples if normalised(s.prompt) in asked]
    return {"self_study_prompts": len(samples), "equal_to_an_evaluation_question": len(same), "which": same}


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


def peft_cartridge(args, context_ids: list[int]):
    """PEFT's CartridgeConfig: P virtual tokens, the first frozen, initialised (PEFT's own
    `initialize_kv_prefix_from_past_key_values`) from the keys/values of the same P context tokens ours starts from."""
    from peft import CartridgeConfig, get_peft_model
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values

    from prefixtune import load_base_model

    base, tokenizer = load_base_model(args.model, dtype=args.dtype)
    config = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_length, num_frozen_tokens=1)
    model = get_peft_model(base, config)
    ids = torch.tensor([context_ids[: args.prefix_length]])
    with model.disable_adapter(), torch.no_grad():
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    initialize_kv_prefix_from_past_key_values(model, past_key_values=cache, num_virtual_tokens=args.prefix_length)
    return model, tokenizer


def peft_with_checkpointing(args, context_ids: list[int], inputs: dict) -> str:
    """What happens to a cartridge model (a fresh one) asked for gradient checkpointing: PEFT
    accepts the call, but checkpointing turns the cache off and the prefix's keys/values with it."""
    model, _ = peft_cartridge(args, context_ids)
    model.gradient_checkpointing_enable()
    model.train()
    try:
        model(**inputs).logits.sum().backward()
    except Exception as error:  # noqa: BLE001 (we record whatever it raises)
        return f"enabled, then the training forward fails: {type(error).__name__}: {str(error)[:200]}"
    return "enabled, and a training step ran"


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


def train_peft(model, formatter, train, args, data_seed: int = 0) -> dict:
    """The same samples, steps, batch size, learning rate schedule, loss and batching policy as the
    distill run (transformers' own `LengthGroupedSampler`, which ours uses through `Trainer`); the
    order of the batches is `data_seed`'s (ours draws its own from the distill run's data seed)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from prefixtune.distillation.trainer import collate, distill_rows

    rows = distill_rows(train, formatter)
    optimizer, scheduler = peft_optimizer(model, args)
    generator = torch.Generator().manual_seed(data_seed)
    order: list[int] = []
    losses, started = [], time.perf_counter()
    model.train()
    lengths = [len(row["input_ids"]) for row in rows]
    for _ in range(args.steps):
        if len(order) < args.batch_size:  # an epoch's order, length-grouped as ours is with --group-by-length
            if args.group_by_length:
                order += list(LengthGroupedSampler(args.batch_size, lengths=lengths, generator=generator))
            else:
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


def peft_phase(args, teacher, formatter, context, train, held) -> dict:
    peft, _ = peft_cartridge(args, context.ids)
    training = train_peft(peft, formatter, train, args)
    result = kl_and_top1(teacher, formatter, held, lambda inputs: peft(**inputs).logits)
    asked = questions(args.questions)
    outputs = peft_greedy(peft, formatter, [row["prompt"] for row in asked], args.question_tokens)
    return result | {
        "accuracy": accuracy(outputs, asked),
        "correct": correct(outputs, asked),
        "training": training,
        "outputs": outputs,
    }


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


VARIANTS = ("ours", "ours-plain", "peft")  # ours with gradient checkpointing (memory), without (step time), PEFT


def measure(args) -> None:
    """Child process: median step time and peak memory above the loaded model of one trainer's step,
    on the same fixed batch (the first training samples). Prints one JSON line."""
    from prefixtune import PrefixConfig, PrefixModel, load_base_model
    from prefixtune.distillation.context import load_context
    from prefixtune.distillation.loss import topk_kl
    from prefixtune.distillation.prefixes import add_prefix_from_ids, freeze_first_position
    from prefixtune.distillation.selfstudy import load_samples
    from prefixtune.distillation.trainer import collate, distill_rows

    torch.manual_seed(0)
    samples = [s for s in load_samples(Path(args.cache_folder)) if not s.held_out][: args.batch_size]
    base, tokenizer = load_base_model(args.model, dtype=args.dtype)
    formatter = formatter_of(args, tokenizer)
    context = load_context(CONTEXT, formatter)
    if args.measure.startswith("ours"):
        model = PrefixModel(base, name=None, tokenizer=tokenizer)
        config = PrefixConfig(prefix_length=args.prefix_length, init="activations", init_text="-")
        add_prefix_from_ids(model, "student", config, context.ids)
        freeze_first_position(model, "student")
        if args.measure == "ours":
            model.gradient_checkpointing_enable()
        forward = lambda batch: model(**batch, prefix="student").logits  # noqa: E731
    else:
        model, _ = peft_cartridge(args, context.ids)
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
    if args.measure == "peft":
        result["gradient_checkpointing"] = peft_with_checkpointing(args, context.ids, inputs)
    print(json.dumps(result | {"batch_tokens": tokens, "batch_shape": list(batch["input_ids"].shape)}))


def measured(args, cache_folder: str, variant: str) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--cache-folder", cache_folder, "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--prefix-length", str(args.prefix_length), "--dtype", args.dtype]
    command += ["--measure-steps", str(args.measure_steps), "--lr", str(args.lr), "--threads", str(args.threads)]
    command += ["--template", args.template] + (["--chat-template"] if args.chat_template else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {variant} step measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_context_prompts(formatter, context, rows: list[dict]) -> tuple[list[str], bool]:
    """Each request's text with the whole handbook in front, as the teacher reads it; the server's
    base template appends a newline, so the text leaves its last one off. And whether the server's
    tokens are then exactly the teacher's."""
    tokenizer = formatter.tokenizer
    wanted = [context.teacher_ids(formatter.prompt_ids(row["prompt"])) for row in rows]
    texts = [tokenizer.decode(ids).removesuffix("\n") for ids in wanted]
    same = all(
        tokenizer(text + "\n", add_special_tokens=False)["input_ids"] == ids
        for text, ids in zip(texts, wanted, strict=True)
    )
    return texts, same


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
    store.mkdir(exist_ok=True)
    shutil.copytree(work / "handbook", store / "handbook")
    asked = questions(args.questions)
    rows = [asked[i % len(asked)] for i in range(args.requests)]
    full, same_ids = full_context_prompts(formatter, context, rows)
    jobs = {
        "full context": [{"model": "base", "prompt": text, "max_tokens": args.question_tokens} for text in full],
        "distilled prefix": [
            {"model": "handbook", "prompt": r["prompt"], "max_tokens": args.question_tokens} for r in rows
        ],
    }
    base, _ = load_base_model(args.model, dtype=args.dtype)
    longest = max(len(formatter.tokenizer(text)["input_ids"]) for text in full) + 8  # the full-context prompts
    limits = Limits(max_prompt_tokens=longest, max_tokens=args.question_tokens, max_queue=None)  # sizes the cache
    app, engine, _ = build_app(
        base, formatter.tokenizer, str(store), limits=limits, max_batch_size=16, engine="continuous"
    )
    results = {}
    try:
        with running(app) as url:
            for label, phase_jobs in jobs.items():
                outputs, seconds = asyncio.run(phase(url, phase_jobs, None, 3600))
                texts = [o["text"] for o in outputs]
                results[label] = summary(outputs, seconds, None) | {"accuracy": accuracy(texts, rows), "texts": texts}
                print(f"[{time.strftime('%H:%M:%S')}]   {label}: {seconds:.1f} s", flush=True)
    finally:
        engine.close()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    a, b = results["full context"]["texts"], results["distilled prefix"]["texts"]
    compared = {
        "identical_outputs": sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)),
        "rougeL_distilled_vs_full": 100
        * statistics.mean(scorer.score(x, y)["rougeL"].fmeasure for x, y in zip(a, b, strict=True)),
        "full_context_prompt_ids_equal_teacher_ids": same_ids,
    }
    return results | {"compared": compared}


def step_rounds(args, cache_folder: str) -> dict:
    """Each variant's step time and peak memory: the median over `--measure-rounds` rounds, each round
    one child process per variant in turn, so a slow spell of the shared machine hits every variant."""
    rounds = [{v: measured(args, cache_folder, v) for v in VARIANTS} for _ in range(args.measure_rounds)]
    step = {}
    for variant in VARIANTS:
        runs = [one[variant] for one in rounds]
        step[variant] = runs[0] | {
            key: statistics.median(run[key] for run in runs) for key in ("step_seconds", "peak_mb_above_model")
        }
        step[variant]["rounds"] = [{key: run[key] for key in ("step_seconds", "peak_mb_above_model")} for run in runs]
    return step


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def goals(result: dict) -> dict:
    """Each goal of issue 19 as (measured value, "<=", ">=" or "<", target)."""
    quality, peft, serve, step = result["quality"], result["peft_cartridge"], result["serving"], result["step"]
    held = result["distil"]["held_out"]
    gain = quality["teacher"]["accuracy"] - quality["bare"]["accuracy"]
    full, distilled = serve["full context"], serve["distilled prefix"]
    measured = {
        "accuracy gain recovered (student - bare) / (teacher - bare)": (
            ratio(quality["student"]["accuracy"] - quality["bare"]["accuracy"], gain) if gain > 0 else None,
            ">=",
            0.8,
        ),
        "held-out top-1 agreement with the teacher": (held["student"]["top1_agreement"], ">=", 0.8),
        "compression ratio (context tokens / P)": (result["distil"]["compression_ratio"], ">=", 30),
        "held-out KL ours / PEFT cartridge": (ratio(peft["ours"]["kl"], peft["kl"]), "<=", 1.0),
        "question accuracy ours - PEFT cartridge": (quality["student"]["accuracy"] - peft["accuracy"], ">=", 0.0),
        "step time ours / PEFT (both without checkpointing)": (
            ratio(step["ours-plain"]["step_seconds"], step["peft"]["step_seconds"]),
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
        "time to distil, minutes (samples + training)": (result["distil"]["seconds"]["distil_total"] / 60, "<=", 20.0),
    }
    checks = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}
    return {
        key: {"value": value, "goal": f"{op} {target}", "met": value is not None and checks[op](value, target)}
        for key, (value, op, target) in measured.items()
    }


def header(args) -> dict:
    return {
        "command": " ".join(["python", *sys.argv]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "platform": platform.platform(),
        "model": "tiny random Llama (--quick)" if args.quick else args.model,
        "note": "2-core machine shared with other engineers' tests and benchmarks during the run (see the "
        "load averages): read ratios measured side by side, not absolute seconds",
        "load_average_before": os.getloadavg(),
        "settings": vars(args),
    }


def distil_phase(args, work: Path, record: Record) -> dict:
    report, distil_seconds = distil(args, work)
    report["seconds"]["distil_total"] = distil_seconds
    record.phase(
        "distil",
        {k: report[k] for k in ("context_tokens", "prefix_length", "compression_ratio")}
        | {
            "samples": report["samples"] | {"cache": None},
            "held_out": report["held_out"],
            "train_loss": report["train_loss"],
            "seconds": report["seconds"],
        },
    )
    return report


def quality_phase(args, work: Path, record: Record, report: dict):
    model, formatter, context = teacher_model(args, work)
    train, held = samples_from(report)
    quality = question_accuracy(model, formatter, args)
    record.phase("quality", quality | {"overlap": question_overlap(train + held)})
    return model, formatter, context, train, held


def run_phases(args, work: Path, record: Record) -> None:
    report = distil_phase(args, work, record)
    model, formatter, context, train, held = quality_phase(args, work, record, report)
    record.phase("serving", serving(args, work, formatter, context))
    ours = kl_and_top1(model, formatter, held, lambda inputs: model(**inputs, prefix="student").logits)
    record.phase("peft_cartridge", peft_phase(args, model, formatter, context, train, held) | {"ours": ours})
    record.phase("step", step_rounds(args, report["samples"]["cache"]))


def step_only(args, work: Path, record: Record) -> int:
    """``--only-step``: the samples (from the cache where they exist) and the step phase, its ratios printed."""
    report, _ = distil(args, work)
    step = step_rounds(args, report["samples"]["cache"])
    record.phase("step", step)
    peft = step["peft"]
    for label, variant, key in (
        ("step time ours / PEFT (both without checkpointing)", "ours-plain", "step_seconds"),
        ("step time ours with checkpointing / PEFT without", "ours", "step_seconds"),
        ("peak step memory ours (checkpointing) / PEFT", "ours", "peak_mb_above_model"),
    ):
        print(f"{label:52s} {ratio(step[variant][key], peft[key]):.3f}")
    print(f"wrote {args.output}")
    return 0


def kl_seeds(args, work: Path, record: Record) -> int:
    """``--kl-seeds``: ours and PEFT's cartridge on the same cached samples, once per data-order seed,
    and their held-out KL to the teacher: mean, std and the paired difference's standard error over
    the seeds (one seed's ratio, the full run's goal, is within this noise or it is not)."""
    rows = []
    for seed in [int(seed) for seed in args.kl_seeds.split(",")]:
        rows.append(kl_of_seed(args, work, seed))
        record.phase("kl_seeds", kl_over_seeds(rows))
    record["complete"] = True
    record.phase("kl_seeds", kl_over_seeds(rows))
    print(f"wrote {args.output}")
    return 0


def kl_of_seed(args, work: Path, seed: int) -> dict:
    """Ours distilled and PEFT's cartridge trained with batches in `seed`'s order; their held-out KL."""
    name = f"handbook-seed{seed}"
    report, _ = distil(args, work, name=name, data_seed=seed)
    model, formatter, context = teacher_model(args, work, student=name)
    train, held = samples_from(report)
    ours = kl_and_top1(model, formatter, held, lambda inputs: model(**inputs, prefix="student").logits)
    peft, _ = peft_cartridge(args, context.ids)
    train_peft(peft, formatter, train, args, data_seed=seed)
    theirs = kl_and_top1(model, formatter, held, lambda inputs: peft(**inputs).logits)
    return {"seed": seed, "ours": ours, "peft": theirs}


def kl_over_seeds(rows: list[dict]) -> dict:
    """Per method the KLs' mean and std over seeds; the paired difference ours - PEFT with its SE."""
    ours, peft = [row["ours"]["kl"] for row in rows], [row["peft"]["kl"] for row in rows]
    differences = [a - b for a, b in zip(ours, peft, strict=True)]
    spread = statistics.stdev if len(rows) > 1 else lambda values: None
    return {
        "seeds": rows,
        "ours_mean": statistics.mean(ours),
        "ours_std": spread(ours),
        "peft_mean": statistics.mean(peft),
        "peft_std": spread(peft),
        "difference_mean": statistics.mean(differences),
        "difference_se": None if len(rows) < 2 else statistics.stdev(differences) / len(rows) ** 0.5,
        "ratio_of_means": ratio(statistics.mean(ours), statistics.mean(peft)),
    }


def quality_only(args, work: Path, record: Record) -> int:
    """``--only-quality``: the distil and quality phases, the share of the teacher's gain recovered
    printed (to compare settings; the goals need the full run)."""
    quality_phase(args, work, record, distil_phase(args, work, record))
    accuracy = {variant: record["quality"][variant]["accuracy"] for variant in ("teacher", "bare", "student")}
    gain = accuracy["teacher"] - accuracy["bare"]
    record["gain_recovered"] = ratio(accuracy["student"] - accuracy["bare"], gain) if gain > 0 else None
    record["complete"] = True
    record.phase("accuracy", accuracy | {"gain_recovered": record["gain_recovered"]})
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model = quick_model(work)
    record = Record(args.output, header(args))
    started = time.perf_counter()
    if args.only_step:
        return step_only(args, work, record)
    if args.only_quality:
        return quality_only(args, work, record)
    if args.kl_seeds:
        return kl_seeds(args, work, record)
    run_phases(args, work, record)
    record["seconds_benchmark"] = time.perf_counter() - started
    record["complete"] = True
    record.phase("goals", goals(record))
    for key, goal in record["goals"].items():
        shown = "n/a" if goal["value"] is None else f"{goal['value']:.3f}"
        print(f"{key:62s} {shown:>9s}  goal {goal['goal']:8s} {'met' if goal['met'] else 'NOT met'}")
    print(f"wrote {args.output}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
