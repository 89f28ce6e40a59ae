"""`PrefixConfig`: what one prefix is (length, parameterization, initialization)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PARAMETERIZATIONS = ("kv", "mlp", "hidden")
PLACES = ("encoder", "decoder", "cross")  # encoder self-, decoder self-, decoder cross-attention
INITS = ("random", "vocab", "activations")


@dataclass
class PrefixConfig:
    """One prefix.

    prefix_length: number of virtual positions P. ``None`` with a text init (``vocab`` or
        ``activations``) means "as many positions as ``init_text`` has tokens".
    parameterization: ``kv`` (per-layer keys/values), ``mlp`` (the paper's reparameterization:
        shared embedding -> MLP -> all layers' K/V) or ``hidden`` (per-layer hidden-space prefix
        sent through each layer's frozen key/value projections).
    init: ``random`` (normal with ``init_std``), ``vocab`` (word embeddings of ``init_text``) or
        ``activations`` (the frozen model's own activations on ``init_text``).
    dropout: dropout on the prefix keys/values while training.
    encoder / decoder / cross: which attention gets the prefix in encoder-decoder models (BART, T5):
        the encoder's self-attention, the decoder's self-attention, the decoder's cross-attention.
    """

    prefix_length: int | None = 10
    parameterization: str = "kv"
    mlp_hidden_size: int = 512
    init: str = "random"
    init_text: str | None = None
    init_std: float = 0.02
    dropout: float = 0.0
    encoder: bool = True
    decoder: bool = True
    cross: bool = True

    @property
    def places(self) -> tuple[str, ...]:
        """Where the prefix goes: encoder self-attention, decoder self-attention, decoder
        cross-attention (decoder-only models have only the decoder's)."""
        return tuple(p for p in PLACES if getattr(self, p))

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"PrefixConfig.parameterization: expected one of {PARAMETERIZATIONS}, got {self.parameterization!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"PrefixConfig.init: expected one of {INITS}, got {self.init!r}")
        if self.init != "random" and not self.init_text:
            raise ValueError(f"PrefixConfig.init={self.init!r} needs a non-empty init_text")
        if self.prefix_length is None and self.init == "random":
            raise ValueError("PrefixConfig.prefix_length=None needs a text init ('vocab' or 'activations')")
        if self.prefix_length is not None and (
            isinstance(self.prefix_length, bool) or not isinstance(self.prefix_length, int) or self.prefix_length < 1
        ):
            raise ValueError(f"PrefixConfig.prefix_length: expected a positive int or None, got {self.prefix_length!r}")
        if not isinstance(self.mlp_hidden_size, int) or self.mlp_hidden_size < 1:
            raise ValueError(f"PrefixConfig.mlp_hidden_size: expected a positive int, got {self.mlp_hidden_size!r}")
        if not self.init_std > 0:
            raise ValueError(f"PrefixConfig.init_std: expected > 0, got {self.init_std!r}")
        for place in PLACES:
            if not isinstance(getattr(self, place), bool):
                raise ValueError(f"PrefixConfig.{place}: expected true or false, got {getattr(self, place)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PrefixConfig.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PrefixConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object for the prefix config, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown prefix config field(s) {unknown}; expected only {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error
