"""What both engines take and give back: a request, its token events and its completion.

A request's tokens reach the HTTP handler through a `Channel` (thread-safe ``put`` from the
engine thread, ``await get()`` on the event loop), so a thousand open streams cost no threads.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..names import BASE_NAME


@dataclass
class Token:
    """One generated token, with its log-probability and the top alternatives when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # [(token id, logprob)], best first


class Channel:
    """Engine thread -> event loop: ``put(Token)`` from any thread, ``None`` ends the stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Token | None] = asyncio.Queue()

    def put(self, item: Token | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> Token | None:
        return await self.queue.get()


@dataclass(eq=False)  # identity: requests are compared as objects, never by field
class Request:
    prompt_ids: list[int]
    prefix: str = BASE_NAME
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    channel: Channel | Any | None = None  # receives each Token, then None
    prefix_inputs: Any = None  # the prefix snapshot taken at admission (`PrefixArguments.row`)
    future: Future = field(default_factory=Future)  # -> Completion
    submitted: float = field(default_factory=time.perf_counter)

    def mode(self) -> tuple:
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence), "length" or "cancelled"
    tokens: list[Token] = field(default_factory=list)
