"""Building a server in one place: the engine, the store wired to it, the app over both.

The engine is built first; the store is given the engine's `Engine.exclusive` at construction
(a ``hidden`` prefix runs the base model while the engine is paused); the app gets the engine and
the store. Nothing is patched in afterwards, and neither the store nor the engine holds the other.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..model import PrefixModel
from .context import Limits
from .continuous import ContinuousEngine, continuous_refusal
from .engine import BatchingEngine
from .interface import Engine
from .server import create_app
from .store import PrefixStore

ENGINES = ("auto", "continuous", "microbatch", "vllm")
MAX_PREFIX_ALLOWANCE = 128  # cache positions planned per row for its prefix (a longer one just waits for room)


def make_engine(
    model: PrefixModel,
    tokenizer: Any,
    *,
    engine: str = "auto",
    max_batch_size: int = 16,
    max_batch_tokens: int = 256,
    max_sequence_tokens: int = 2048,
    vllm: Any = None,
) -> Engine:
    """An engine over `model` (not started). ``mix_prefixes=False`` baselines use `BatchingEngine` directly;
    ``engine="vllm"`` needs `vllm` (`vllm_engine.VLLMSettings`) and vLLM installed (setup.sh --vllm)."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if engine == "vllm":
        from .vllm_engine import VLLMEngine  # imports vLLM only when asked for

        if vllm is None:
            raise ValueError("engine 'vllm' needs its settings: make_engine(..., vllm=VLLMSettings(...))")
        return VLLMEngine(model, tokenizer, vllm)
    if engine == "auto":
        engine = "microbatch" if continuous_refusal(model) else "continuous"
    if engine == "continuous":
        return ContinuousEngine(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_sequence_tokens=max_sequence_tokens,
        )
    return BatchingEngine(model, tokenizer, max_batch_size=max_batch_size)


def build_app(
    base_model: Any,
    tokenizer: Any,
    store_folder: str,
    *,
    admin_token: str | None = None,
    limits: Limits | None = None,
    max_batch_size: int = 16,
    engine: str = "auto",
    model_id: str = "prefixtune",
    prefix_cache_bytes: int | None = None,
    max_batch_tokens: int = 256,
    vllm: Any = None,  # `vllm_engine.VLLMSettings`, for engine="vllm"
    close_at_shutdown: bool = False,
) -> tuple[FastAPI, Engine, PrefixStore]:
    """(FastAPI app, engine, store) over a frozen base model and a prefix folder; the engine is started
    (`close_at_shutdown`: and closed when the server shuts down, as `prefixtune serve` does)."""
    limits = limits or Limits()
    model = PrefixModel(base_model, name=None, tokenizer=tokenizer)
    longest = limits.max_prompt_tokens + limits.max_tokens + MAX_PREFIX_ALLOWANCE  # one row's cache at most
    server_engine = make_engine(
        model,
        tokenizer,
        engine=engine,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_sequence_tokens=longest,
        vllm=vllm,
    )
    store = PrefixStore(model, store_folder, prefix_cache_bytes, exclusive=server_engine.exclusive)
    server_engine.start()
    app = create_app(
        engine=server_engine,
        store=store,
        tokenizer=tokenizer,
        admin_token=admin_token,
        limits=limits,
        model_id=model_id,
        on_shutdown=server_engine.close if close_at_shutdown else None,
    )
    return app, server_engine, store
