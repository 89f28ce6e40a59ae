"""prefixtune: prefix tuning (Li & Liang, 2021) for frozen Hugging Face transformers."""

from .config import PrefixConfig
from .files import PrefixFileError
from .injection import UnsupportedModelError
from .loading import load_base_model
from .model import PrefixModel

__all__ = ["PrefixConfig", "PrefixFileError", "PrefixModel", "UnsupportedModelError", "load_base_model"]
__version__ = "0.1.0"
