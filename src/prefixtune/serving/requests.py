"""What every engine takes and gives back: a request, the events it streams, its completion.

An engine reports a request's progress only through the request's own methods: `Request.emit`
for each generated token, then exactly one of `Request.finish` (a `Completion`) or `Request.fail`
(an exception). Those methods put the typed events `Token`, then `Finished` or `Failed`, on the
request's channel and resolve its future, once, in that order, whichever thread calls them, so
no engine writes that bookkeeping itself.

A request's events reach the HTTP handler through a `Channel` (thread-safe ``put`` from the
engine thread, ``await get()`` on the event loop), so a thousand open streams cost no threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

from ..names import BASE_NAME


@dataclass
class Token:
    """One generated token, with its log-probability and the top alternatives when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # [(token id, logprob)], best first


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence), "length" or "cancelled"
    tokens: list[Token] = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    """The request's last event when it ended normally (or was cancelled): its completion."""

    completion: Completion


@dataclass(frozen=True)
class Failed:
    """The request's last event when generating it failed: the engine's exception."""

    error: Exception


Event = Token | Finished | Failed  # what a channel carries: Tokens, then one Finished or Failed


class EventSink(Protocol):
    """Where a request's events go (a `Channel`, or any object with a thread-safe ``put``)."""

    def put(self, event: Event) -> None: ...


class Channel:
    """Engine thread -> event loop: ``put(event)`` from any thread, ``await get()`` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> Event:
        return await self.queue.get()


@dataclass(eq=False)  # identity: requests are compared as objects, never by field
class Request:
    """One sequence to generate. Only the first three fields may be passed by position."""

    prompt_ids: list[int]
    prefix: str = BASE_NAME
    max_tokens: int = 32
    _: KW_ONLY
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    channel: EventSink | None = None  # receives each Token, then one Finished or Failed
    prefix_inputs: Any = None  # the prefix snapshot taken at admission (`PrefixModel.prefix_snapshot`)
    future: Future[Completion] = field(default_factory=Future)  # resolved with the same end as the channel
    submitted: float = field(default_factory=time.perf_counter)
    engine_id: str | None = None  # the engine's own id for it, set by the engine that admitted it
    tokens: list[Token] = field(default_factory=list, init=False)  # emitted so far
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def mode(self) -> tuple:
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)

    @property
    def ended(self) -> bool:
        return self.future.done()

    def emit(self, token: Token) -> bool:
        """Deliver one generated token (not the end-of-sequence token); False, and nothing sent,
        once the request has ended (e.g. cancelled meanwhile)."""
        with self._lock:
            if self.future.done():
                return False
            self.tokens.append(token)
            if self.channel is not None:
                self.channel.put(token)
            return True

    def finish(self, finish_reason: str) -> Completion | None:
        """End the request with the tokens emitted so far; None if it had already ended."""
        with self._lock:
            if self.future.done():
                return None
            completion = Completion([t.id for t in self.tokens], finish_reason, list(self.tokens))
            if self.channel is not None:
                self.channel.put(Finished(completion))
            self.future.set_result(completion)
            return completion

    def fail(self, error: Exception) -> bool:
        """End the request with `error`; False if it had already ended."""
        with self._lock:
            if self.future.done():
                return False
            if self.channel is not None:
                self.channel.put(Failed(error))
            self.future.set_exception(error)
            return True
