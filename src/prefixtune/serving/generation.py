"""One HTTP request's generation, shared by the plain and the streaming answer: its prompts are
checked against the limits, its choices admitted to the engine (one `Request` each; choice i of n
uses seed + i), their events followed (stop strings cut on the decoded text, time to first token),
and on the way out cancelled and counted in the metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import HTTPException

from .context import Served
from .interface import EngineClosed, RequestRejected
from .requests import Channel, Failed, Finished, Token
from .requests import Request as EngineRequest
from .schema import Body, choice_payload, logprobs_payload, usage_payload
from .store import Loaded


@dataclass
class Choice:
    """One choice as it is generated: its engine request, tokens, text and end."""

    index: int
    request: EngineRequest
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"


class Generation:
    """Validates one completions/chat body on construction (400/413 naming the problem), then
    `admit`s its choices; `advance` takes a choice's next token, `cancel` and `count` end it."""

    def __init__(
        self, served: Served, name: str, entry: Loaded, prompts: list[list[int]], body: Body, *, chat: bool
    ) -> None:
        body.refuse_unknown()
        self.served, self.name, self.entry, self.prompts, self.body, self.chat = (
            served,
            name,
            entry,
            prompts,
            body,
            chat,
        )
        self.stops = body.stops()
        self.top = body.top()
        self.max_tokens = body.token_budget()
        for ids in prompts:
            self._check_prompt(ids)
        self.ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.choices: list[Choice] = []

    def _check_prompt(self, ids: list[int]) -> None:
        limits = self.served.limits
        if not ids:
            raise HTTPException(400, "prompt is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise HTTPException(413, f"prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if self.max_tokens > limits.max_tokens:
            raise HTTPException(400, f"max_tokens={self.max_tokens} exceeds the limit {limits.max_tokens}")

    def admit(self) -> None:
        """Submit one engine request per prompt and choice (429 beyond ``max_queue``)."""
        engine, limits, body = self.served.engine, self.served.limits, self.body
        if self.top is not None and not engine.supports_logprobs:
            raise HTTPException(400, f"logprobs: not available on the {engine.name} engine")
        wanted = len(self.prompts) * body.n
        if limits.max_queue is not None and engine.stats().queue_depth + wanted > limits.max_queue:
            self.served.metrics.rejections.inc()
            raise HTTPException(
                429, f"server busy: more than {limits.max_queue} requests waiting", headers={"Retry-After": "1"}
            )
        loop = asyncio.get_running_loop()
        for ids in self.prompts:
            for j in range(body.n):
                request = EngineRequest(
                    ids,
                    self.name,
                    self.max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=None if body.seed is None else body.seed + j,
                    logprobs=self.top,
                    channel=Channel(loop),
                    prefix_inputs=self.entry.inputs,
                )
                try:
                    engine.submit(request)
                except RequestRejected as error:  # e.g. prefix + prompt + output beyond the engine's window
                    self.cancel("error")  # the choices submitted already
                    raise HTTPException(400, str(error)) from error
                except EngineClosed as error:  # closing, or its loop died: /health says 503 too
                    self.cancel("error")
                    raise HTTPException(503, str(error)) from error
                self.choices.append(Choice(len(self.choices), request))

    async def advance(self, choice: Choice) -> bool:
        """Take the choice's next event; False once it has ended (500 if generating it failed)."""
        event = await choice.request.channel.get()
        if isinstance(event, Failed):
            if choice.finish_reason is not None:  # ended here already (cancelled, or cut at a stop string)
                return False
            choice.finish_reason = "error"
            raise HTTPException(500, f"generation failed: {event.error}") from event.error
        if isinstance(event, Finished):
            choice.finish_reason = choice.finish_reason or event.completion.finish_reason
            return False
        if not choice.tokens:
            self.served.metrics.ttft.observe(time.perf_counter() - choice.request.submitted)
        choice.tokens.append(event)
        choice.text = self.served.tokenizer.decode([t.id for t in choice.tokens], skip_special_tokens=True)
        cut = first_stop(choice.text, self.stops)
        if cut is not None:
            choice.text = choice.text[:cut]
            self.served.engine.cancel(choice.request)  # the rest would be thrown away
            choice.finish_reason = "stop"
            return False
        return True

    def cancel(self, reason: str) -> None:
        """Cancel every choice not yet ended (``reason`` labels the cancellation metric)."""
        for choice in self.choices:
            if choice.finish_reason is None:
                self.served.engine.cancel(choice.request)
                choice.finish_reason = "cancelled"
                self.served.metrics.cancellations.labels(reason).inc()

    def count(self, outcome: str) -> None:
        """Record the finished HTTP request in the metrics."""
        metrics = self.served.metrics
        metrics.requests.labels(self.name, outcome).inc()
        for choice in self.choices:
            metrics.output_tokens.inc(len(choice.tokens))
            if len(choice.tokens) > 1:
                metrics.tpot.observe((time.perf_counter() - choice.request.submitted) / len(choice.tokens))

    def timeout_message(self) -> str:
        return f"request timed out after {self.served.limits.request_timeout} s (--request-timeout)"

    def usage(self) -> dict[str, int]:
        return usage_payload(self.prompt_tokens, sum(len(c.tokens) for c in self.choices))

    def logprobs(self, tokens: list[Token]) -> dict | None:
        return logprobs_payload(tokens, self.chat, self.served.tokenizer) if self.top is not None else None

    def response(self) -> dict:
        """The whole (non-streamed) answer."""
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                choice_payload(c.index, c.text, c.finish_reason, self.chat, self.logprobs(c.tokens))
                for c in self.choices
            ],
            "usage": self.usage(),
        }


def first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: all but a tail that could still grow into a stop string, or that is
    a character still incomplete (its UTF-8 bytes split over tokens decode to U+FFFD until the rest comes:
    sent early, the streamed text would differ from the completion's)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return len(text) - hold
