"""Serving many prefixes from one frozen base: the prefix store, two engines, the HTTP app.

Engines: ``continuous`` (transformers' continuous batching with a prefix per request; decoder-only
models) and ``microbatch`` (one ``generate()`` per micro-batch; encoder-decoders, and the baseline
the serving benchmark compares against). ``auto`` picks ``continuous`` where it is exact
(`continuous_refusal` says where not) and ``microbatch`` elsewhere; ``/health`` names the engine.
"""

from __future__ import annotations

from typing import Any

from ..model import PrefixModel
from ..names import BASE_NAME
from .continuous import ContinuousEngine, continuous_refusal
from .engine import BatchingEngine
from .requests import Completion, Request, Token
from .server import Limits, create_app
from .store import PrefixStore, StoreError, UnknownPrefix, check_name

ENGINES = ("auto", "continuous", "microbatch", "vllm")
MAX_PREFIX_ALLOWANCE = 128  # cache positions planned per row for its prefix (a longer one just waits for room)

__all__ = [
    "BASE_NAME",
    "ENGINES",
    "BatchingEngine",
    "Completion",
    "ContinuousEngine",
    "Limits",
    "PrefixStore",
    "Request",
    "StoreError",
    "Token",
    "UnknownPrefix",
    "build_app",
    "check_name",
    "create_app",
    "make_engine",
]


def make_engine(
    model: PrefixModel,
    tokenizer: Any,
    store: PrefixStore | None,
    engine: str = "auto",
    max_batch_size: int = 16,
    max_batch_tokens: int = 256,
    max_sequence_tokens: int = 2048,
    vllm=None,  # `vllm_engine.VLLMSettings` for engine="vllm"
):
    """An engine over `model` (not started). ``mix_prefixes=False`` baselines use `BatchingEngine` directly."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if engine == "vllm":
        from .vllm_engine import VLLMEngine  # vLLM only in its own environment (setup.sh --vllm)

        if vllm is None:
            raise ValueError("engine 'vllm' needs its settings (vllm_engine.VLLMSettings)")
        return VLLMEngine(model, tokenizer, vllm)
    if engine == "auto":
        engine = "microbatch" if continuous_refusal(model) else "continuous"
    if engine == "continuous":
        return ContinuousEngine(model, tokenizer, max_batch_size, max_batch_tokens, max_sequence_tokens)
    return BatchingEngine(model, tokenizer, store, max_batch_size)


def build_app(
    base_model: Any,
    tokenizer: Any,
    store_folder: str,
    admin_token: str | None = None,
    limits: Limits | None = None,
    max_batch_size: int = 16,
    engine: str = "auto",
    model_id: str = "prefixtune",
    prefix_cache_bytes: int | None = None,
    max_batch_tokens: int = 256,
    vllm=None,  # `vllm_engine.VLLMSettings`: required for engine="vllm"
):
    """(FastAPI app, engine, store) over a frozen base model and a prefix folder; the engine is started."""
    limits = limits or Limits()
    model = PrefixModel(base_model, name=None, tokenizer=tokenizer)
    store = PrefixStore(model, store_folder, prefix_cache_bytes)
    longest = limits.max_prompt_tokens + limits.max_tokens + MAX_PREFIX_ALLOWANCE  # one row's cache at most
    server_engine = make_engine(
        model, tokenizer, store, engine, max_batch_size, max_batch_tokens, longest, vllm
    ).start()
    store.exclusive = server_engine.exclusive
    return create_app(server_engine, store, admin_token, limits, model_id), server_engine, store
