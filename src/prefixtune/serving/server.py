"""The HTTP app: OpenAI-compatible completions over one frozen base and many prefixes.

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
* An unexpected exception is logged with its traceback, the request id and the prefix (logger
  ``prefixtune.serving.server``); the client gets a short 500 naming the request id.

`create_app` assembles the modules: `schema` (bodies, payloads), `generation` (one request's
choices), `routes` and `streaming` (the answers), `admin` (uploads, deletes), and the error
handlers here. It talks to the engine only through `interface.Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import admin, routes
from .context import Limits, Served
from .interface import Engine
from .metrics import Metrics
from .schema import error_payload
from .store import PrefixStore

logger = logging.getLogger(__name__)


def create_app(
    *,
    engine: Engine,
    store: PrefixStore,
    tokenizer: Any,
    admin_token: str | None = None,
    limits: Limits | None = None,
    model_id: str = "prefixtune",
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app over a started `engine` and the `store` wired to it (see `factory.build_app`); `on_shutdown`
    runs when the server shuts down (uvicorn runs it on SIGTERM/Ctrl-C before it re-raises the signal)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(on_shutdown)  # closing an engine may wait for its threads: not on the event loop

    app = FastAPI(
        title="prefixtune",
        description="One frozen base model, many prefixes.",
        lifespan=lifespan if on_shutdown else None,
    )
    app.state.served = Served(
        engine=engine,
        store=store,
        tokenizer=tokenizer,
        limits=limits or Limits(),
        metrics=Metrics(engine, store),
        admin_token=admin_token,
        model_id=model_id,
    )
    app.state.metrics = app.state.served.metrics
    app.include_router(routes.router)
    app.include_router(admin.router)
    app.include_router(admin.cache_router)
    app.add_exception_handler(StarletteHTTPException, openai_error)  # also routing's 404/405
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
    return app


async def openai_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """OpenAI's error shape, so its client raises the matching error with our message."""
    body = error_payload(error.detail, error.status_code)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (written without echoing the input: NaN is not JSON)."""
    problems = [f"{'.'.join(str(part) for part in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
    return JSONResponse(error_payload("; ".join(problems), 422), status_code=422)


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    """Log the traceback with the request id and prefix; answer a short 500 naming the request id."""
    request_id = getattr(request.state, "request_id", None) or request.headers.get("x-request-id")
    request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
    prefix = getattr(request.state, "prefix", None)
    logger.error(
        "unexpected error in %s %s (request id %s, prefix %r)",
        request.method,
        request.url.path,
        request_id,
        prefix,
        exc_info=error,
    )
    message = f"internal error ({type(error).__name__}); request id {request_id}"
    return JSONResponse(error_payload(message, 500), status_code=500)
