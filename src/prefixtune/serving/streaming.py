"""Streamed answers (server-sent events): each choice's events become chunks, as OpenAI streams.

One pump task per choice follows it (`Generation.advance`) and puts a typed message on one queue:
`Delta` (a token arrived; text up to ``safe`` can be sent, the rest could still grow into a stop
string), `Ended` or `Errored`. The response reads that queue until every choice has ended or
``request_timeout`` has passed (then a last error event, code 504, and ``[DONE]``: a stream never
hangs). A client that goes away cancels every choice still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import HTTPException

from .generation import Choice, Generation, safe_length
from .requests import Token
from .schema import chunk_payload, error_payload, sse


@dataclass(frozen=True)
class Delta:
    """A choice's new token; its text up to `safe` characters may be sent."""

    choice: Choice
    tokens: list[Token]
    safe: int


@dataclass(frozen=True)
class Ended:
    """A choice ended (its ``finish_reason`` is set); all its text may be sent."""

    choice: Choice


@dataclass(frozen=True)
class Errored:
    """Generating a choice failed; `message` goes to the client as an error event."""

    choice: Choice
    message: str


Message = Delta | Ended | Errored


async def _pump(generation: Generation, choice: Choice, queue: asyncio.Queue[Message]) -> None:
    try:
        while await generation.advance(choice):
            await queue.put(Delta(choice, choice.tokens[-1:], safe_length(choice.text, generation.stops)))
        await queue.put(Ended(choice))
    except HTTPException as error:
        await queue.put(Errored(choice, error.detail))


class _Chunks:
    """Turns messages into the stream's SSE lines."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.usage = generation.body.include_usage()

    def chunk(self, index: int, delta, finish: str | None = None, logprobs: dict | None = None) -> str:
        g = self.generation
        payload = chunk_payload(g.ident, g.name, index, delta, finish, g.chat, logprobs)
        if self.usage:  # as OpenAI: every chunk before the last says "usage": null
            payload["usage"] = None
        return sse(payload)

    def text(self, choice: Choice, safe: int, tokens: list[Token]) -> list[str]:
        delta = choice.text[choice.sent : safe] if safe > choice.sent else ""
        choice.sent = max(choice.sent, safe)
        logprobs = self.generation.logprobs(tokens) if tokens else None
        if not (delta or logprobs):
            return []
        return [self.chunk(choice.index, {"content": delta} if self.generation.chat else delta, None, logprobs)]

    def message(self, message: Message) -> list[str]:
        if isinstance(message, Errored):
            return [sse(error_payload(message.message, 500))]
        if isinstance(message, Delta):
            return self.text(message.choice, message.safe, message.tokens)
        choice = message.choice
        finish = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
        return [
            *self.text(choice, len(choice.text), []),
            self.chunk(choice.index, {} if self.generation.chat else "", finish),
        ]

    def last(self) -> list[str]:
        """The usage chunk (when asked for) and ``[DONE]``."""
        g = self.generation
        lines = []
        if self.usage:
            lines.append(
                sse(chunk_payload(g.ident, g.name, 0, None, None, g.chat) | {"choices": [], "usage": g.usage()})
            )
        return [*lines, sse("[DONE]")]


async def stream(generation: Generation) -> AsyncIterator[str]:
    """The SSE lines of an admitted generation (see the module doc)."""
    limits = generation.served.limits
    deadline = None if limits.request_timeout is None else time.monotonic() + limits.request_timeout
    queue: asyncio.Queue[Message] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(generation, choice, queue)) for choice in generation.choices]
    chunks = _Chunks(generation)
    outcome = "ok"
    try:
        if generation.chat:
            for choice in generation.choices:
                yield chunks.chunk(choice.index, {"role": "assistant", "content": ""})
        open_choices = len(generation.choices)
        while open_choices:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                message = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                outcome = "timeout"
                generation.cancel("timeout")
                yield sse(error_payload(generation.timeout_message(), 504))
                break
            if not isinstance(message, Delta):  # Ended or Errored: that choice is done
                open_choices -= 1
                outcome = "error" if isinstance(message, Errored) else outcome
            for line in chunks.message(message):
                yield line
        for line in chunks.last() if outcome == "ok" else [sse("[DONE]")]:
            yield line
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "cancelled"
        raise
    finally:
        for task in pumps:
            task.cancel()
        generation.cancel("disconnect" if outcome == "cancelled" else outcome)
        generation.count(outcome)
