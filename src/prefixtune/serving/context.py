"""What the HTTP routes share: the server's `Limits`, and `Served` (the engine, store, tokenizer,
limits and metrics of one app), which routes get through the `served` dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from .interface import Engine
from .metrics import Metrics
from .store import PrefixStore


@dataclass(kw_only=True)
class Limits:
    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_upload_bytes: int = 64 * 1024 * 1024
    max_queue: int | None = 256  # waiting requests (not yet in the running batch) before 429
    request_timeout: float | None = None  # seconds from admission to the last token


@dataclass(kw_only=True)
class Served:
    """One app's shared objects (``app.state.served``)."""

    engine: Engine
    store: PrefixStore
    tokenizer: Any
    limits: Limits
    metrics: Metrics
    admin_token: str | None
    model_id: str


def served(request: Request) -> Served:
    """FastAPI dependency: the app's `Served`."""
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]  # a route's parameter ``server: ServedDep``
