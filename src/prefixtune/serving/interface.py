"""What the server may call on an engine: the `Engine` protocol and its `EngineStats`.

The HTTP layer (`routes`, `streaming`, `metrics`) uses an engine only through these members, so
a new engine (e.g. one over vLLM's ``AsyncLLM``) implements exactly this and nothing in the
server changes. The events a request streams (`Token`, `Finished`, `Failed`) and the `Request`
methods that send them (`emit`, `finish`, `fail`) live in `requests`.

Guarantees every engine gives:

* Every submitted request ends exactly once, by `Request.finish` or `Request.fail`, so its channel
  gets its tokens and then one `Finished` or `Failed`, and its future resolves the same way.
  No request is left hanging: not after an error in the engine (the request fails with it),
  not after `cancel`, not after `close`.
* A request runs with the prefix snapshot it carries (`Request.prefix_inputs`, taken at
  admission); None runs the bare base model. Later store changes never reach it.
* Emitted tokens never include the end-of-sequence token; ``finish_reason`` is ``"stop"`` (end of
  sequence), ``"length"`` (``max_tokens`` reached) or ``"cancelled"``.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Self, runtime_checkable

from .requests import Completion, Request


class RequestRejected(ValueError):
    """`Engine.submit` refuses this request as given, e.g. it does not fit the engine's window (the
    server answers 400 with the message; nothing was admitted)."""


class EngineClosed(RuntimeError):
    """The engine was closed before the request ended (the request fails with this)."""


@dataclass(frozen=True)
class EngineStats:
    """One engine's counters at one moment: the same fields for every engine (counts since start)."""

    engine: str  # the engine's name, as `Engine.name`
    healthy: bool  # it is running and accepts requests
    queue_depth: int  # submitted requests not yet given a row
    running_rows: int  # requests being generated now
    requests: int  # requests submitted
    batches: int  # forward batches run (one micro-batch, or one continuous step)
    batch_rows: int  # rows over all those batches (batch_rows / batches: mean rows per batch)
    generated_tokens: int  # tokens delivered in finished completions
    computed_tokens: int  # tokens sampled, including for rows cancelled meanwhile
    errors: int  # requests that ended with `Request.fail`
    cancelled: int  # requests ended by `Engine.cancel` without an error

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    """A serving engine over one frozen base model (see the module doc for what it guarantees)."""

    name: str  # shown by /health and in errors, e.g. "continuous"
    supports_logprobs: bool  # False: the server refuses ``logprobs`` with a 400 naming the engine

    def start(self) -> Self:
        """Start serving (threads, loops); returns the engine. `submit` before `start` is an error."""
        ...

    def close(self) -> None:
        """Stop serving and release the model; every request not yet ended fails with
        `EngineClosed`. Idempotent."""
        ...

    def submit(self, request: Request) -> Future[Completion]:
        """Admit `request` and return its future (``request.future``) at once; generation happens
        on the engine's own thread(s), its progress reaches ``request.channel``. Raises
        `RequestRejected` (before admitting anything) for a request it cannot take as given."""
        ...

    def cancel(self, request: Request, error: Exception | None = None) -> None:
        """End `request` now: finished as ``"cancelled"`` with the tokens emitted so far, or failed
        with `error` if given; no token reaches its channel afterwards, and the engine stops
        computing it as soon as it can. A request already ended (or unknown) is left alone.
        Safe from any thread."""
        ...

    def stats(self) -> EngineStats:
        """The engine's counters now (cheap: called on every admission and metrics scrape)."""
        ...

    def reset_prefix_cache(self) -> bool | None:
        """Empty the blocks of computed prompts and prefixes the engine keeps across requests (answers
        stay the same; later requests compute them again): True when emptied, False when it cannot now
        (requests running), None when the engine keeps none (the admin endpoint says so with a 400)."""
        ...

    def exclusive(self) -> AbstractContextManager[Any]:
        """A context in which the caller may run the base model with prefixtune's own attention
        (e.g. the store computing a ``hidden`` prefix): the engine runs nothing on the model
        meanwhile, and keeps its admitted requests. Callers do not nest it (no engine promises that)."""
        ...


# ---------------------------------------------------------------------- for implementations
COUNTS = ("requests", "batches", "batch_rows", "generated_tokens", "computed_tokens", "errors", "cancelled")


def new_counts() -> dict[str, int]:
    """An engine's running counts (the counting fields of `EngineStats`), all zero."""
    return dict.fromkeys(COUNTS, 0)


def end_request(request: Request, outcome: str | Exception, counts: dict[str, int]) -> None:
    """End `request` once: finished with the reason `outcome` (a str) or failed with it (an
    exception), and count how; nothing happens if it had already ended. Every engine ends its
    requests here, so ending and counting mean the same everywhere."""
    if isinstance(outcome, Exception):
        if request.fail(outcome):
            counts["errors"] += 1
        return
    completion = request.finish(outcome)
    if completion is not None:
        counts["generated_tokens"] += len(completion.token_ids)
        counts["cancelled"] += outcome == "cancelled"


def greedy_reference(
    model: Any, prompt_ids: list[int], prefix: str | None, max_tokens: int, eos_token_id: int, pad_token_id: int
) -> list[int]:
    """The token ids greedy `PrefixModel.generate` gives `prompt_ids` alone under `prefix` (None or
    ``base``: no prefix), cut before end of sequence: what every engine must answer for that request
    at temperature 0 (the tests and `benchmarks/serve_bench.py` compare served answers with it)."""
    import torch

    from ..names import BASE_NAME

    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            prefix=["" if prefix in (None, BASE_NAME) else prefix],
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )[0, len(prompt_ids) :].tolist()  # [new tokens]
    return output[: output.index(eos_token_id)] if eos_token_id in output else output
