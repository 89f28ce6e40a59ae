"""The HTTP server: OpenAI-compatible completions over one frozen base and many prefixes.

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: the ``model`` field names the prefix
  (``base`` is the bare model); ``stream: true`` answers with server-sent events.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics``.
* ``PUT /admin/prefixes/{name}`` (multipart ``weights`` + ``config``) and
  ``DELETE /admin/prefixes/{name}``: need ``Authorization: Bearer <token>`` set at start-up.
* ``GET /``: the playground, comparing prefixes side by side.

Every limit (prompt tokens, ``max_tokens``, upload size) answers 4xx with a message naming it; a
failing request never takes the server down.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .engine import BatchingEngine
from .engine import Request as EngineRequest
from .store import BASE_NAME, PrefixStore, StoreError, UnknownPrefix

PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class Limits:
    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_upload_bytes: int = 64 * 1024 * 1024


class CompletionBody(BaseModel):
    model: str = BASE_NAME
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(BaseModel):
    model: str = BASE_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


def create_app(
    engine: BatchingEngine,
    store: PrefixStore,
    admin_token: str | None,
    limits: Limits | None = None,
    model_id: str = "prefixtune",
) -> FastAPI:
    limits = limits or Limits()
    tokenizer = engine.tokenizer
    app = FastAPI(title="prefixtune", description="One frozen base model, many prefixes.")
    started = time.time()

    def prompt_ids(name: str, text: str) -> list[int]:
        template = store.prompt_formats.get(name, {}).get("template", "{prompt}")
        ids = tokenizer(template.replace("{prompt}", text), add_special_tokens=engine.encoder_decoder)["input_ids"]
        return ids

    def check_request(name: str, ids: list[int], max_tokens: int) -> None:
        try:
            store.check(name)
        except UnknownPrefix as error:
            raise HTTPException(404, str(error.args[0])) from error
        if not ids:
            raise HTTPException(400, "prompt is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise HTTPException(413, f"prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if max_tokens > limits.max_tokens:
            raise HTTPException(400, f"max_tokens={max_tokens} exceeds the limit {limits.max_tokens}")

    async def run(name: str, ids: list[int], body, chat: bool):
        check_request(name, ids, body.max_tokens)
        stream = queue.Queue() if body.stream else None
        request = EngineRequest(ids, name, body.max_tokens, body.temperature, body.top_p, body.seed, stream)
        engine.submit(request)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        if stream is not None:
            return StreamingResponse(_events(ident, name, stream, request, chat), media_type="text/event-stream")
        try:
            completion = await asyncio.wrap_future(request.future)
        except Exception as error:  # noqa: BLE001 - reported to the client, the server keeps going
            raise HTTPException(500, f"generation failed: {error}") from error
        text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(completion.token_ids),
            "total_tokens": len(ids) + len(completion.token_ids),
        }
        choice: dict[str, Any] = {"index": 0, "finish_reason": completion.finish_reason}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
            "usage": usage,
        }

    async def _events(ident: str, name: str, stream: queue.Queue, request: EngineRequest, chat: bool):
        tokens: list[int] = []
        sent = ""
        loop = asyncio.get_running_loop()
        while True:
            token = await loop.run_in_executor(None, stream.get)
            if token is None:
                break
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            delta, sent = text[len(sent) :], text
            if delta:
                yield _sse(_chunk(ident, name, delta, None, chat))
        try:
            completion = await asyncio.wrap_future(request.future)
            yield _sse(_chunk(ident, name, "", completion.finish_reason, chat))
        except Exception as error:  # noqa: BLE001
            yield _sse({"error": {"message": f"generation failed: {error}"}})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await run(body.model, prompt_ids(body.model, body.prompt), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        messages = [message.model_dump() for message in body.messages]
        if getattr(tokenizer, "chat_template", None):
            ids = list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
        else:
            ids = prompt_ids(body.model, "\n".join(m["content"] for m in messages))
        return await run(body.model, ids, body, chat=True)

    @app.get("/v1/models")
    async def models():
        names = [BASE_NAME, *store.names()]
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": model_id} for name in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "prefixes": len(store.names()), "load_errors": store.load_errors}

    @app.get("/metrics")
    async def metrics():
        stats = dict(engine.stats)
        stats["mean_batch_rows"] = stats["rows"] / stats["batches"] if stats["batches"] else 0.0
        stats["uptime_seconds"] = time.time() - started
        stats["prefixes"] = len(store.names())
        return stats

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
            await asyncio.get_running_loop().run_in_executor(None, store.upload, name, weights_bytes, config_bytes)
        except StoreError as error:
            raise HTTPException(400, str(error)) from error
        return {"uploaded": name, "prefixes": store.names()}

    @app.delete("/admin/prefixes/{name}")
    async def delete_prefix(name: str, authorization: str | None = Header(None)):
        authorize(authorization)
        try:
            store.delete(name)
        except StoreError as error:
            raise HTTPException(400, str(error)) from error
        except UnknownPrefix as error:
            raise HTTPException(404, str(error.args[0])) from error
        return {"deleted": name, "prefixes": store.names()}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return PLAYGROUND.read_text()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return JSONResponse({"error": {"message": f"internal error: {error}"}}, status_code=500)

    return app


def _chunk(ident: str, name: str, delta: str, finish: str | None, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    choice |= {"delta": {"content": delta}} if chat else {"text": delta}
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
