"""prefixtune: prefix tuning (Li & Liang, 2021) for frozen Hugging Face transformers."""

from typing import Any

from .config import PrefixConfig
from .files import PrefixFileError
from .injection import UnsupportedModelError
from .loading import load_base_model
from .model import PrefixModel

__all__ = [
    "DistillOptions",
    "PrefixConfig",
    "PrefixFileError",
    "PrefixModel",
    "UnsupportedModelError",
    "distill",
    "load_base_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`distill` and `DistillOptions` load on first use (they import transformers' Trainer)."""
    if name in ("distill", "DistillOptions"):
        from . import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module 'prefixtune' has no attribute {name!r}")
