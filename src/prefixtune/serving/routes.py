"""The OpenAI-compatible routes (completions, chat, models), health, metrics and the playground.

A plain (non-streamed) answer waits for all its choices, for ``request_timeout`` (then 504) or for
the client to go away (then its choices are cancelled, 499); a streamed one is `streaming.stream`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..names import BASE_NAME
from .context import Served, ServedDep
from .generation import Generation
from .schema import Body, ChatBody, CompletionBody
from .store import Loaded, StoreError, UnknownPrefix
from .streaming import stream

PLAYGROUND = Path(__file__).with_name("playground.html")
DISCONNECT_POLL_SECONDS = 0.02

router = APIRouter()


async def prefix_entry(server: Served, name: str) -> Loaded:
    """The prefix to serve (loaded off the event loop): 404 if unknown, 400 if it cannot be served."""
    try:
        return await asyncio.to_thread(server.store.get, name)
    except UnknownPrefix as error:
        raise HTTPException(404, str(error.args[0])) from error
    except StoreError as error:
        raise HTTPException(400, str(error)) from error


async def _disconnected(http_request: Request) -> None:
    while not await http_request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def _all_choices(generation: Generation) -> None:
    async def one(choice) -> None:
        while await generation.advance(choice):
            pass

    await asyncio.gather(*(one(choice) for choice in generation.choices))


async def complete(http_request: Request, generation: Generation) -> dict | Response:
    """Wait for the whole answer (see the module doc)."""
    work = asyncio.ensure_future(_all_choices(generation))
    watcher = asyncio.ensure_future(_disconnected(http_request))
    timeout = generation.served.limits.request_timeout
    try:
        done, _ = await asyncio.wait({work, watcher}, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        watcher.cancel()
    if work not in done:
        work.cancel()
        timed_out = watcher not in done
        generation.cancel("timeout" if timed_out else "disconnect")
        generation.count("timeout" if timed_out else "cancelled")
        if timed_out:
            raise HTTPException(504, generation.timeout_message())
        return Response(status_code=499)
    try:
        work.result()
    except HTTPException:
        generation.cancel("error")
        generation.count("error")
        raise
    generation.count("ok")
    return generation.response()


async def answer(
    http_request: Request, server: Served, entry: Loaded, prompts: list[list[int]], body: Body, chat: bool
) -> dict | Response:
    generation = Generation(server, body.model, entry, prompts, body, chat=chat)
    http_request.state.request_id = generation.ident  # named in the log if anything unexpected fails
    generation.admit()
    if body.stream:
        return StreamingResponse(stream(generation), media_type="text/event-stream")
    return await complete(http_request, generation)


@router.post("/v1/completions")
async def completions(body: CompletionBody, http_request: Request, server: ServedDep):
    http_request.state.prefix = body.model
    entry = await prefix_entry(server, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise HTTPException(400, "prompt: give a string or a non-empty list of strings")
    ids = [entry.formatter.prompt_ids(p) for p in prompts]
    return await answer(http_request, server, entry, ids, body, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, http_request: Request, server: ServedDep):
    http_request.state.prefix = body.model
    entry = await prefix_entry(server, body.model)
    ids = entry.formatter.messages_ids([m.model_dump() for m in body.messages])
    return await answer(http_request, server, entry, [ids], body, chat=True)


@router.get("/v1/models")
async def models(server: ServedDep):
    names = [BASE_NAME, *server.store.names()]
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": server.model_id} for n in names]}


@router.get("/health")
async def health(server: ServedDep):
    healthy = server.engine.stats().healthy
    body = {"status": "ok" if healthy else "engine stopped", "engine": server.engine.name, **server.store.describe()}
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics")
async def prometheus(server: ServedDep):
    return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")


@router.get("/", response_class=HTMLResponse)
async def playground():
    return PLAYGROUND.read_text()
