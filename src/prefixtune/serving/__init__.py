"""Serving many prefixes from one frozen base: the prefix store, the batching engine, the HTTP app."""

from __future__ import annotations

from typing import Any

from ..model import PrefixModel
from .engine import BatchingEngine, Completion, Request
from .server import Limits, create_app
from .store import BASE_NAME, PrefixStore, StoreError, UnknownPrefix, check_name

__all__ = [
    "BASE_NAME",
    "BatchingEngine",
    "Completion",
    "Limits",
    "PrefixStore",
    "Request",
    "StoreError",
    "UnknownPrefix",
    "build_app",
    "check_name",
    "create_app",
]


def build_app(
    base_model: Any,
    tokenizer: Any,
    store_folder: str,
    admin_token: str | None = None,
    limits: Limits | None = None,
    max_batch_size: int = 16,
    mix_prefixes: bool = True,
    model_id: str = "prefixtune",
):
    """(FastAPI app, engine, store) over a frozen base model and a prefix folder; the engine is started."""
    model = PrefixModel(base_model, name=None, tokenizer=tokenizer)
    store = PrefixStore(model, store_folder)
    engine = BatchingEngine(model, tokenizer, store.lock, max_batch_size, mix_prefixes).start()
    return create_app(engine, store, admin_token, limits, model_id), engine, store
