"""The HTTP server: OpenAI-compatible completions over one frozen base and many prefixes.

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: the ``model`` field names the prefix
  (``base`` is the bare model). Implemented: ``prompt`` (a string or a list of strings), ``messages``,
  ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``seed``
  (choice i of n uses seed + i), ``stop`` (strings, matched on the decoded text, not returned),
  ``logprobs`` (completions: an int k; chat: a bool with ``top_logprobs`` k), ``stream`` with
  ``stream_options.include_usage`` (a last chunk with no choices and the usage). Any other
  parameter answers 400 naming it; non-finite numbers answer 422. Responses carry ``usage`` and
  each choice's ``finish_reason`` (``stop`` or ``length``).
* Prompts are formatted by the prefix's own saved `PromptFormatter`, as in train/eval/generate.
* A client that disconnects has its requests cancelled (the engine drops them at its next step);
  ``request_timeout`` cancels and answers 504; beyond ``max_queue`` waiting requests the server
  answers 429 with ``Retry-After``.
* ``GET /v1/models``, ``GET /health`` (names the engine), ``GET /metrics`` (Prometheus).
* ``PUT /admin/prefixes/{name}`` (multipart ``weights`` + ``config``) and
  ``DELETE /admin/prefixes/{name}``: need ``Authorization: Bearer <token>`` set at start-up.
* ``GET /``: the playground, comparing prefixes side by side.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..names import BASE_NAME
from .metrics import Metrics
from .requests import Channel, Token
from .requests import Request as EngineRequest
from .store import PrefixStore, StoreError, UnknownPrefix

PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class Limits:
    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_upload_bytes: int = 64 * 1024 * 1024
    max_queue: int | None = 256  # waiting requests (not yet in the running batch) before 429
    request_timeout: float | None = None  # seconds from admission to the last token


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are refused by name (400), as top-level ones
    include_usage: bool = False  # a last chunk with no choices carries the request's usage


class _Body(BaseModel):
    """Fields shared by both endpoints; unknown fields are kept so they can be refused by name."""

    model_config = ConfigDict(extra="allow")
    model: str = BASE_NAME
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise HTTPException(400, "stop: up to 4 non-empty strings")
        return stops


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    def top(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise HTTPException(400, "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass
class Choice:
    """One choice as it is generated: its engine request, tokens, text and end."""

    index: int
    request: EngineRequest
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None


def create_app(
    engine, store: PrefixStore, admin_token: str | None, limits: Limits | None = None, model_id="prefixtune"
):
    limits = limits or Limits()
    tokenizer = engine.tokenizer
    metrics = Metrics(engine, store)
    app = FastAPI(title="prefixtune", description="One frozen base model, many prefixes.")
    app.state.metrics = metrics

    def refuse_unknown(body: _Body) -> None:
        extra = sorted(key for key, value in (body.model_extra or {}).items() if value is not None)
        if body.stream_options is not None:
            extra += [f"stream_options.{key}" for key in sorted(body.stream_options.model_extra or {})]
        if extra:
            raise HTTPException(400, f"unsupported parameter(s) {extra}: prefixtune does not implement them")

    async def prefix_entry(name: str):
        try:
            return await asyncio.to_thread(store.get, name)
        except UnknownPrefix as error:
            raise HTTPException(404, str(error.args[0])) from error
        except StoreError as error:
            raise HTTPException(400, str(error)) from error

    def check_prompt(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise HTTPException(400, "prompt is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise HTTPException(413, f"prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if max_tokens > limits.max_tokens:
            raise HTTPException(400, f"max_tokens={max_tokens} exceeds the limit {limits.max_tokens}")

    def admit(name: str, entry, prompts: list[list[int]], body: _Body, max_tokens: int) -> list[Choice]:
        top = body.top()
        if top is not None and not engine.supports_logprobs:
            raise HTTPException(400, f"logprobs: not available on the {engine.name} engine")
        wanted = len(prompts) * body.n
        if limits.max_queue is not None and engine.queue_depth() + wanted > limits.max_queue:
            metrics.rejections.inc()
            raise HTTPException(
                429, f"server busy: more than {limits.max_queue} requests waiting", headers={"Retry-After": "1"}
            )
        channel_loop = asyncio.get_running_loop()
        choices = []
        for ids in prompts:
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                request = EngineRequest(
                    ids,
                    name,
                    max_tokens,
                    body.temperature,
                    body.top_p,
                    seed,
                    top,
                    Channel(channel_loop),
                    entry.inputs,
                )
                engine.submit(request)
                choices.append(Choice(len(choices), request))
        return choices

    def cancel(choices: list[Choice], reason: str) -> None:
        for choice in choices:
            if choice.finish_reason is None:
                engine.cancel(choice.request)
                choice.finish_reason = "cancelled"
                metrics.cancellations.labels(reason).inc()

    async def advance(choice: Choice, stops: list[str]) -> bool:
        """Take the choice's next token; False once it has ended."""
        token = await choice.request.channel.get()
        if token is None:
            if choice.finish_reason is None:
                try:
                    completion = await asyncio.wrap_future(choice.request.future)
                except Exception as error:  # noqa: BLE001 - this request failed, the others go on
                    choice.finish_reason = "error"
                    raise HTTPException(500, f"generation failed: {error}") from error
                choice.finish_reason = completion.finish_reason
            return False
        if not choice.tokens:
            metrics.ttft.observe(time.perf_counter() - choice.request.submitted)
        choice.tokens.append(token)
        choice.text = tokenizer.decode([t.id for t in choice.tokens], skip_special_tokens=True)
        cut = _first_stop(choice.text, stops)
        if cut is not None:
            choice.text = choice.text[:cut]
            engine.cancel(choice.request)  # the rest would be thrown away
            choice.finish_reason = "stop"
            return False
        return True

    def finished(name: str, choices: list[Choice], outcome: str) -> None:
        metrics.requests.labels(name, outcome).inc()
        for choice in choices:
            metrics.output_tokens.inc(len(choice.tokens))
            if len(choice.tokens) > 1:
                elapsed = time.perf_counter() - choice.request.submitted
                metrics.tpot.observe(elapsed / len(choice.tokens))

    async def watch(http_request: Request) -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(0.02)

    async def generate(http_request: Request, name: str, entry, prompts: list[list[int]], body: _Body, chat: bool):
        refuse_unknown(body)
        stops = body.stops()
        if body.stream_options is not None and not body.stream:
            raise HTTPException(400, "stream_options needs stream: true")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or (64 if chat else 16)
        for ids in prompts:
            check_prompt(ids, max_tokens)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        choices = admit(name, entry, prompts, body, max_tokens)
        usage_prompt = sum(len(ids) for ids in prompts)
        if body.stream:
            usage = usage_prompt if body.stream_options and body.stream_options.include_usage else None
            events = _events(ident, name, choices, stops, chat, body.top() is not None, usage)
            return StreamingResponse(events, media_type="text/event-stream")

        async def run_all() -> None:
            async def one(choice: Choice) -> None:
                while await advance(choice, stops):
                    pass

            await asyncio.gather(*(one(choice) for choice in choices))

        work = asyncio.ensure_future(run_all())
        watcher = asyncio.ensure_future(watch(http_request))
        try:
            done, _ = await asyncio.wait({work, watcher}, timeout=limits.request_timeout, return_when="FIRST_COMPLETED")
        finally:
            watcher.cancel()
        if work not in done:
            work.cancel()
            timed_out = watcher not in done
            cancel(choices, "timeout" if timed_out else "disconnect")
            finished(name, choices, "timeout" if timed_out else "cancelled")
            if timed_out:
                raise HTTPException(504, f"request timed out after {limits.request_timeout} s (--request-timeout)")
            return Response(status_code=499)
        try:
            work.result()
        except HTTPException:
            cancel(choices, "error")
            finished(name, choices, "error")
            raise
        finished(name, choices, "ok")
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [_choice(c, chat, body.top() is not None, tokenizer) for c in choices],
            "usage": _usage(usage_prompt, choices),
        }

    async def _events(
        ident: str,
        name: str,
        choices: list[Choice],
        stops: list[str],
        chat: bool,
        logprobs: bool,
        usage_prompt: int | None,  # None: no usage chunk (stream_options.include_usage not asked)
    ):
        merged: asyncio.Queue[tuple[Choice, list[Token], bool]] = asyncio.Queue()
        deadline = None if limits.request_timeout is None else time.monotonic() + limits.request_timeout

        async def pump(choice: Choice) -> None:
            try:
                while True:
                    more = await advance(choice, stops)
                    safe = len(choice.text) if not more else _safe_length(choice.text, stops)
                    new_tokens = choice.tokens[len(choice.tokens) - 1 :] if more else []
                    await merged.put((choice, new_tokens, not more, safe))
                    if not more:
                        return
            except HTTPException as error:
                await merged.put((choice, [], True, -1, error.detail))

        def chunk(index: int, delta, finish: str | None = None, extra: dict | None = None) -> str:
            payload = _chunk(ident, name, index, delta, finish, chat, extra)
            if usage_prompt is not None:  # as OpenAI: every chunk before the last says "usage": null
                payload["usage"] = None
            return _sse(payload)

        pumps = [asyncio.ensure_future(pump(choice)) for choice in choices]
        outcome = "ok"
        try:
            if chat:
                for choice in choices:
                    yield chunk(choice.index, {"role": "assistant", "content": ""})
            open_choices = len(choices)
            while open_choices:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    choice, new_tokens, ended, safe, *error = await asyncio.wait_for(merged.get(), timeout)
                except TimeoutError:
                    outcome = "timeout"
                    cancel(choices, "timeout")
                    message = f"request timed out after {limits.request_timeout} s (--request-timeout)"
                    yield _sse({"error": {"message": message, "code": 504}})
                    break
                if error:
                    outcome = "error"
                    yield _sse({"error": {"message": error[0], "code": 500}})
                    open_choices -= 1
                    continue
                delta = choice.text[choice.sent : safe] if safe > choice.sent else ""
                choice.sent = max(choice.sent, safe)
                extra = _logprobs(new_tokens, chat, tokenizer) if logprobs and new_tokens else None
                if delta or extra:
                    content = {"content": delta} if chat else delta
                    yield chunk(choice.index, content, None, extra)
                if ended:
                    open_choices -= 1
                    finish = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
                    yield chunk(choice.index, {} if chat else "", finish)
            if usage_prompt is not None and outcome == "ok":
                usage = {"choices": [], "usage": _usage(usage_prompt, choices)}
                yield _sse(_chunk(ident, name, 0, None, None, chat) | usage)
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            for task in pumps:
                task.cancel()
            cancel(choices, "disconnect" if outcome == "cancelled" else outcome)
            finished(name, choices, outcome)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http_request: Request):
        entry = await prefix_entry(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise HTTPException(400, "prompt: give a string or a non-empty list of strings")
        ids = [entry.formatter.prompt_ids(p) for p in prompts]
        return await generate(http_request, body.model, entry, ids, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http_request: Request):
        entry = await prefix_entry(body.model)
        ids = entry.formatter.messages_ids([m.model_dump() for m in body.messages])
        return await generate(http_request, body.model, entry, [ids], body, chat=True)

    @app.get("/v1/models")
    async def models():
        names = [BASE_NAME, *store.names()]
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": model_id} for name in names]}

    @app.get("/health")
    async def health():
        status = "ok" if engine.healthy else "engine stopped"
        body = {"status": status, "engine": engine.name, **store.describe()}
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    def authorize(authorization: str | None) -> None:
        if admin_token is None:
            raise HTTPException(403, "admin endpoints are disabled: start the server with an admin token")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), admin_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def read_limited(upload: UploadFile, what: str) -> bytes:
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"{what} is larger than the upload limit of {limits.max_upload_bytes} bytes")
        return data

    @app.put("/admin/prefixes/{name}")
    async def upload_prefix(
        name: str,
        weights: UploadFile = File(...),
        config: UploadFile = File(...),
        authorization: str | None = Header(None),
    ):
        authorize(authorization)
        weights_bytes = await read_limited(weights, "weights")
        config_bytes = await read_limited(config, "config")
        try:
            await asyncio.to_thread(store.upload, name, weights_bytes, config_bytes)
        except StoreError as error:
            raise HTTPException(400, str(error)) from error
        return {"uploaded": name, "prefixes": store.names()}

    @app.delete("/admin/prefixes/{name}")
    async def delete_prefix(name: str, authorization: str | None = Header(None)):
        authorize(authorization)
        try:
            await asyncio.to_thread(store.delete, name)
        except StoreError as error:
            raise HTTPException(400, str(error)) from error
        except UnknownPrefix as error:
            raise HTTPException(404, str(error.args[0])) from error
        return {"deleted": name, "prefixes": store.names()}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return PLAYGROUND.read_text()

    @app.exception_handler(StarletteHTTPException)  # also routing's 404/405
    async def openai_error(request: Request, error: StarletteHTTPException):
        """OpenAI's error shape, so its client raises the matching error with our message."""
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        body = {"error": {"message": error.detail, "type": kind, "code": error.status_code}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        """422 naming each bad field (written without echoing the input: NaN is not JSON)."""
        problems = [f"{'.'.join(str(part) for part in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        body = {"error": {"message": "; ".join(problems), "type": "invalid_request_error", "code": 422}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return JSONResponse({"error": {"message": f"internal error: {error}"}}, status_code=500)

    return app


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: all but a tail that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return len(text) - hold


def _logprobs(tokens: list[Token], chat: bool, tokenizer) -> dict[str, Any]:
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    if chat:
        return {
            "content": [
                {
                    "token": text(t.id),
                    "logprob": t.logprob,
                    "bytes": list(text(t.id).encode()),
                    "top_logprobs": [
                        {"token": text(i), "logprob": lp, "bytes": list(text(i).encode())} for i, lp in t.top or []
                    ],
                }
                for t in tokens
            ]
        }
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(text(t.id))
    return {
        "tokens": [text(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text(i): lp for i, lp in t.top} if t.top else None for t in tokens],
        "text_offset": offsets,
    }


def _choice(choice: Choice, chat: bool, logprobs: bool, tokenizer) -> dict[str, Any]:
    result: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason}
    if chat:
        result["message"] = {"role": "assistant", "content": choice.text}
    else:
        result["text"] = choice.text
    result["logprobs"] = _logprobs(choice.tokens, chat, tokenizer) if logprobs else None
    return result


def _chunk(
    ident: str, name: str, index: int, delta, finish: str | None, chat: bool, logprobs: dict | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    choice |= {"delta": delta} if chat else {"text": delta}
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
    }


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
