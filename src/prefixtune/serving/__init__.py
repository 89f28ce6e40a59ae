"""Serving many prefixes from one frozen base: the prefix store, two engines, the HTTP app.

Engines: ``continuous`` (transformers' continuous batching with a prefix per request; decoder-only
models) and ``microbatch`` (one ``generate()`` per micro-batch; encoder-decoders, and the baseline
the serving benchmark compares against). ``auto`` picks ``continuous`` where it is exact
(`continuous_refusal` says where not) and ``microbatch`` elsewhere; ``/health`` names the engine.
Both implement `interface.Engine`, the only thing the HTTP app uses; `factory.build_app` builds
engine, store and app in one place.
"""

from __future__ import annotations

from ..names import BASE_NAME
from .context import Limits
from .continuous import ContinuousEngine, continuous_refusal
from .engine import BatchingEngine
from .factory import ENGINES, MAX_PREFIX_ALLOWANCE, build_app, make_engine
from .interface import Engine, EngineClosed, EngineStats
from .requests import Completion, Failed, Finished, Request, Token
from .server import create_app
from .store import PrefixStore, StoreError, StoreWriteError, UnknownPrefix, check_name

__all__ = [
    "BASE_NAME",
    "ENGINES",
    "MAX_PREFIX_ALLOWANCE",
    "BatchingEngine",
    "Completion",
    "ContinuousEngine",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "Failed",
    "Finished",
    "Limits",
    "PrefixStore",
    "Request",
    "StoreError",
    "StoreWriteError",
    "Token",
    "UnknownPrefix",
    "build_app",
    "check_name",
    "continuous_refusal",
    "create_app",
    "make_engine",
]
