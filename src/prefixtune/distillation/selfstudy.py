"""Training data without labels ("self-study", as Cartridges calls it): prompts about the context and
the teacher's answers to them, with the teacher's top-k log-probabilities on every answer token.

Without a prompts file the teacher writes the prompts itself: for each chunk of the context, one of
the `SEEDS` (the one place they are listed) asks it, with the whole context in front as always, for
a question, a summary request, a rewrite request or a continuation request about that chunk
(`StudySettings.kinds` picks which; `seed_plan` asks every chunk each of them in turn); the first
line it writes (sampled) is the prompt. With a prompts file it only answers those. With
`answer_with_chunk` the teacher answers a written prompt with its chunk quoted again just before it
(`REMINDER`; the whole context stays in front), as Cartridges' teacher answers with the chunk in
view: a small model finds a fact beside the question far more often than 1,000 tokens back. The
student still reads the bare prompt, so it learns the answer without the quote. Answers are
greedy and end at EOS or at `answer_stop` (`StopText`: under a plain template the model goes on
with the next question after its answer). Everything runs batched on the frozen teacher prefix
(left-padded rows of mixed lengths) and is cached on disk under a hash of the model fingerprint,
the context and these settings, so a rerun or a resumed run reads it instead of generating again.
A share of the prompts is held out for the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data import DataError, PromptFormatter, jsonl_records, pad_batch
from ..model import PrefixModel
from .context import Context
from .loss import answer_positions, teacher_topk
from .prefixes import TEACHER

# kind: (instruction about a chunk, the words the teacher's prompt starts with). A small model asked
# for "a question" often writes anything but one; starting its reply with the lead words keeps it on task.
SEEDS: dict[str, tuple[str, str]] = {
    "question": (
        "Here is a part of the document above:\n\n{chunk}\n\n"
        "Write one question a reader could ask about a fact in this part. Write only the question.",
        "Question:",
    ),
    "summarise": (
        "Here is a part of the document above:\n\n{chunk}\n\n"
        "Write a short request asking for a summary of one topic of this part. Write only the request.",
        "Please summarise",
    ),
    "rewrite": (
        "Here is a part of the document above:\n\n{chunk}\n\n"
        "Write a request asking to rewrite one fact from this part as an announcement. Write only the request.",
        "Please write an announcement",
    ),
    "continue": (
        "Here is a part of the document above:\n\n{chunk}\n\n"
        "Write a request asking to explain one rule of this part to a new colleague. Write only the request.",
        "Please explain",
    ),
}
REMINDER = "Here is a part of the document above:\n\n{chunk}\n\n{prompt}"  # --answer-with-chunk's teacher prompt
CACHE_VERSION = 1


@dataclass(frozen=True)
class StudySettings:
    """What the samples depend on besides the model and the context (all part of the cache key)."""

    samples: int = 256
    prompts_file: str | None = None
    held_out: float = 0.1
    top_k: int = 20
    max_prompt_tokens: int = 48
    max_answer_tokens: int = 96
    answer_stop: str | None = None  # an answer ends at this text too (a blank line under a plain template)
    chunk_tokens: int = 192
    answer_with_chunk: bool = False  # the teacher answers with the prompt's chunk quoted before it
    kinds: tuple[str, ...] = tuple(SEEDS)  # the kinds of prompt written, in turn (none with a prompts file)
    batch_size: int = 16
    seed: int = 0


@dataclass
class Sample:
    prompt: str
    answer_ids: list[int]  # [A] the teacher's greedy answer, ending with EOS when it stopped
    kind: str  # a `SEEDS` key, or "given" for a prompts file
    held_out: bool = False
    topk_indices: torch.Tensor | None = None  # [A, k] the teacher's top-k tokens at each answer position
    topk_logprobs: torch.Tensor | None = None  # [A, k] their log-probabilities
    chunk: str | None = None  # with answer_with_chunk: the chunk the teacher saw quoted before the prompt

    def teacher_prompt(self) -> str:
        """The prompt as the teacher answered it (the student always reads `prompt`)."""
        return REMINDER.format(chunk=self.chunk, prompt=self.prompt) if self.chunk else self.prompt


def read_prompts(path: str | Path) -> list[str]:
    """Prompts, one per line (``.txt``) or JSONL objects with a ``prompt`` field; a bad line is refused
    as ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file")
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for where, record in jsonl_records(path):
            value = record.get("prompt")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {value!r}")
            prompts.append(value.strip())
    else:
        prompts = []
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 text ({error})") from error
            if line:
                prompts.append(line)
    if not prompts:
        raise DataError(f"{path}: no prompts (empty file?)")
    return prompts


def chunks(context: Context, tokenizer: Any, chunk_tokens: int) -> list[str]:
    """The context's text cut into pieces of about `chunk_tokens` tokens."""
    ids = tokenizer(context.text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode(ids[start : start + chunk_tokens]) for start in range(0, len(ids), chunk_tokens)]
    return [piece.strip() for piece in pieces if piece.strip()]


def cache_key(model: PrefixModel, dtype: str, context: Context, formatter: PromptFormatter, settings: StudySettings):
    prompts_sha = (
        hashlib.sha256(Path(settings.prompts_file).read_bytes()).hexdigest() if settings.prompts_file else None
    )
    what = {
        "version": CACHE_VERSION,
        "fingerprint": model.fingerprint,
        "dtype": dtype,
        "context_sha256": context.sha256,
        "context_ids": hashlib.sha256(json.dumps(context.ids).encode()).hexdigest(),
        "prompt_format": formatter.saved,
        "settings": asdict(settings) | {"prompts_file": prompts_sha},
        "seeds": None if settings.prompts_file else SEEDS,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _generate(
    model: PrefixModel,
    formatter: PromptFormatter,
    inputs: list[list[int]],
    max_new_tokens: int,
    sample: bool,
    batch_size: int,
    stop: str | None = None,
) -> list[list[int]]:
    """The teacher's continuation ids of each input (the ids after the context), batched by length
    (left-padded), in input order; each ends at EOS or at the token that completes `stop`."""
    tokenizer = formatter.tokenizer
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    outputs: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([{"input_ids": inputs[i]} for i in rows], tokenizer.pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        options = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if sample else {"do_sample": False}
        width = batch["input_ids"].shape[1]
        options |= {"stopping_criteria": StoppingCriteriaList([StopText(tokenizer, stop, width)])} if stop else {}
        tokens = model.generate(
            **batch,
            prefix=TEACHER,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **options,
        )[:, width:]
        for i, row in zip(rows, tokens.tolist(), strict=True):
            outputs[i] = until_stop(row, tokenizer, stop)
    return [outputs[i] for i in range(len(inputs))]


class StopText(StoppingCriteria):
    """Ends a row once its text after position `start` contains `stop` (transformers' own
    ``stop_strings`` needs a tokenizer whose vocabulary it can map to text, which not all allow)."""

    def __init__(self, tokenizer: Any, stop: str, start: int) -> None:
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :])
        return torch.tensor([self.stop in text for text in texts], device=input_ids.device)


def until_stop(ids: list[int], tokenizer: Any, stop: str | None) -> list[int]:
    """`ids` up to and with the first EOS, or the first token whose text completes `stop`."""
    eos = tokenizer.eos_token_id
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids
    if stop and stop in tokenizer.decode(ids):
        return next(ids[:n] for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
    return ids


def write_prompts(model: PrefixModel, formatter: PromptFormatter, context: Context, settings: StudySettings):
    """(kind, chunk, prompt) the teacher writes about the context's chunks, deduplicated by prompt."""
    pieces = chunks(context, formatter.tokenizer, settings.chunk_tokens)
    kinds = list(settings.kinds)
    wanted: list[tuple[str, str, str]] = []
    for attempt in range(3):  # sampled prompts can come out empty or repeated: ask again, at most twice
        count = math.ceil((settings.samples - len(wanted)) * 1.25)
        plan = seed_plan(count, kinds, pieces, attempt)
        inputs = [seed_ids(formatter, kind, piece) for kind, piece in plan]
        written = _generate(model, formatter, inputs, settings.max_prompt_tokens, True, settings.batch_size)
        seen = {prompt for _, _, prompt in wanted}
        for (kind, piece), ids in zip(plan, written, strict=True):
            prompt = _prompt_text(SEEDS[kind][1], formatter.tokenizer.decode(ids, skip_special_tokens=True))
            if prompt and prompt not in seen and len(wanted) < settings.samples:
                wanted.append((kind, piece, prompt))
                seen.add(prompt)
        if len(wanted) >= settings.samples:
            break
    return wanted


def seed_plan(count: int, kinds: list[str], pieces: list[str], shift: int = 0) -> list[tuple[str, str]]:
    """`count` (kind, chunk) pairs: round after round over every chunk, each chunk's kind moving on by
    one each round (and by `shift`), so every chunk is asked every kind in turn whatever the counts."""
    n = len(pieces)
    return [(kinds[(i // n + i % n + shift) % len(kinds)], pieces[i % n]) for i in range(count)]


def seed_ids(formatter: PromptFormatter, kind: str, chunk: str) -> list[int]:
    """The seed instruction about `chunk` as the teacher reads it after the context, with the start
    of its reply (the lead words) already in place."""
    instruction, lead = SEEDS[kind]
    return (
        formatter.prompt_ids(instruction.format(chunk=chunk))
        + formatter.tokenizer(lead, add_special_tokens=False)["input_ids"]
    )


def _prompt_text(lead: str, written: str) -> str:
    """The prompt: the lead words (without a "Question:" label) and the first line written after them;
    empty when the teacher wrote nothing."""
    line = next((line.strip() for line in written.strip().splitlines() if line.strip()), "")
    if not line:
        return ""
    lead = "" if lead.endswith(":") else lead
    return " ".join(part for part in (lead, line.strip('"').strip()) if part)


@torch.no_grad()
def attach_topk(model: PrefixModel, formatter: PromptFormatter, samples: list[Sample], k: int, batch_size: int):
    """Fill each sample's teacher top-k at its answer positions (one teacher forward per batch)."""
    tokenizer = formatter.tokenizer
    for start in range(0, len(samples), batch_size):
        rows = samples[start : start + batch_size]
        batch = pad_batch(
            [{"input_ids": formatter.prompt_ids(s.teacher_prompt()) + s.answer_ids} for s in rows],
            tokenizer.pad_token_id,
        )
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(**batch, prefix=TEACHER).logits  # [B, W, V]
        width = logits.shape[1]
        for row, sample in enumerate(rows):
            answer = len(sample.answer_ids)
            indices, logprobs = teacher_topk(logits[row, answer_positions(width, answer)], k)  # [A, k] each
            sample.topk_indices, sample.topk_logprobs = indices.to(torch.int32).cpu(), logprobs.cpu()


def hold_out(samples: list[Sample], share: float, seed: int) -> None:
    """Mark a seeded random `share` of the samples (at least one of two or more) as held out."""
    count = min(len(samples) - 1, max(1 if len(samples) > 1 else 0, round(share * len(samples))))
    for index in random.Random(seed).sample(range(len(samples)), count):
        samples[index].held_out = True


def build_samples(
    model: PrefixModel, formatter: PromptFormatter, context: Context, settings: StudySettings
) -> list[Sample]:
    """Prompts (the file's, or the teacher's own), the teacher's answers and top-k; nothing cached."""
    torch.manual_seed(settings.seed)
    if settings.prompts_file:
        written = [("given", None, prompt) for prompt in read_prompts(settings.prompts_file)]
    else:
        written = write_prompts(model, formatter, context, settings)
    if not written:
        raise DataError(f"{context.source}: the teacher wrote no usable prompt about the context")
    samples = [
        Sample(prompt, [], kind, chunk=chunk if settings.answer_with_chunk else None) for kind, chunk, prompt in written
    ]
    inputs = [formatter.prompt_ids(sample.teacher_prompt()) for sample in samples]
    answers = _generate(
        model, formatter, inputs, settings.max_answer_tokens, False, settings.batch_size, settings.answer_stop
    )
    for sample, ids in zip(samples, answers, strict=True):
        sample.answer_ids = ids or [formatter.tokenizer.eos_token_id]
    if settings.top_k:
        attach_topk(model, formatter, samples, settings.top_k, settings.batch_size)
    hold_out(samples, settings.held_out, settings.seed)
    return samples


SAMPLES_FILE, TOPK_FILE = "samples.jsonl", "topk.safetensors"


def save_samples(folder: Path, samples: list[Sample]) -> None:
    """Write the samples into `folder` atomically (a temp folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        lines = [
            json.dumps(
                {"prompt": s.prompt, "answer_ids": s.answer_ids, "kind": s.kind, "held_out": s.held_out}
                | ({"chunk": s.chunk} if s.chunk else {})
            )
            for s in samples
        ]
        (temp / SAMPLES_FILE).write_text("\n".join(lines) + "\n")
        if samples[0].topk_indices is not None:
            tensors = {
                "indices": torch.cat([s.topk_indices for s in samples]),
                "logprobs": torch.cat([s.topk_logprobs for s in samples]),
            }
            save_file(tensors, str(temp / TOPK_FILE))
        temp.rename(folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def load_samples(folder: Path) -> list[Sample]:
    samples = [Sample(**record) for _, record in jsonl_records(folder / SAMPLES_FILE)]
    if (folder / TOPK_FILE).is_file():
        tensors = load_file(str(folder / TOPK_FILE))
        lengths = [len(s.answer_ids) for s in samples]
        for sample, indices, logprobs in zip(
            samples, tensors["indices"].split(lengths), tensors["logprobs"].split(lengths), strict=True
        ):
            sample.topk_indices, sample.topk_logprobs = indices, logprobs
    return samples


def cached_samples(
    model: PrefixModel, formatter: PromptFormatter, context: Context, settings: StudySettings, folder: Path
) -> tuple[list[Sample], bool]:
    """The samples from `folder` when it holds them, else built and saved there; (samples, from_cache)."""
    if (folder / SAMPLES_FILE).is_file():
        return load_samples(folder), True
    samples = build_samples(model, formatter, context, settings)
    save_samples(folder, samples)
    return samples, False
