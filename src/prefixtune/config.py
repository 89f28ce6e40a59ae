"""`PrefixConfig`: what one prefix is (length, parameterization, initialization)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

PARAMETERIZATIONS = ("kv", "mlp", "hidden")
PLACES = ("encoder", "decoder", "cross")  # encoder self-, decoder self-, decoder cross-attention
INITS = ("random", "vocab", "activations")


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong kind (the message names the field)."""


def option(default: Any, help: str, *flags: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is also a command-line option (PEFT's ``field(metadata={"help": ...})``).

    The CLI builds its options from these (`prefixtune.cli.options_command`): the name is the field's
    (``--prefix-length``), the default and help are these; `flags` overrides the option's spelling
    (e.g. ``"--encoder/--no-encoder"``), `choices` restricts the value. ``default=...``: required."""
    metadata = {"help": help, "flags": flags, "choices": choices}
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


def flat_fields(cls: type) -> dict[str, Any]:
    """Every field of `cls`, the fields of nested dataclass groups unnested (name -> `Field`): the
    names the CLI flags and YAML keys use."""
    hints = get_type_hints(cls)
    found: dict[str, Any] = {}
    for item in fields(cls):
        found |= flat_fields(hints[item.name]) if is_dataclass(hints[item.name]) else {item.name: item}
    return found


def from_flat(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """`cls` from flat field names (groups unnested, as `flat_fields` lists them); a group may also be
    given whole, by its own name, as an instance or a mapping. Missing fields take their defaults."""
    unknown = sorted(set(values) - set(flat_fields(cls)) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}; expected some of {sorted(flat_fields(cls))}")
    hints, kwargs = get_type_hints(cls), {}
    for item in fields(cls):
        if item.name in values:
            kwargs[item.name] = values[item.name]
        elif is_dataclass(hints[item.name]):
            group = {key: value for key, value in values.items() if key in flat_fields(hints[item.name])}
            kwargs[item.name] = from_flat(hints[item.name], group, f"{source}.{item.name}")
        elif item.default is MISSING and item.default_factory is MISSING:
            raise ConfigError(f"{source}: missing the required option {item.name!r}")
    return cls(**kwargs)


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

    prefix_length: int | None = option(10, "Prefix positions P (YAML null: as many as init_text has tokens).")
    parameterization: str = option("kv", "How the prefix is parameterized.", choices=PARAMETERIZATIONS)
    mlp_hidden_size: int = option(512, "Hidden size of the mlp parameterization.")
    init: str = option("random", "How the prefix starts.", choices=INITS)
    init_text: str | None = option(None, "Text for the vocab/activations init.")
    init_std: float = option(0.02, "Standard deviation of the random init.")
    dropout: float = option(0.0, "Dropout on prefix keys/values while training.")
    encoder: bool = option(True, "Seq2seq: prefix the encoder's self-attention.", "--encoder/--no-encoder")
    decoder: bool = option(True, "Prefix the decoder's self-attention.", "--decoder/--no-decoder")
    cross: bool = option(True, "Seq2seq: prefix the decoder's cross-attention.", "--cross/--no-cross")

    @property
    def places(self) -> tuple[str, ...]:
        """Where the prefix goes: encoder self-attention, decoder self-attention, decoder
        cross-attention (decoder-only models have only the decoder's)."""
        return tuple(p for p in PLACES if getattr(self, p))

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ConfigError(
                f"PrefixConfig.parameterization: expected one of {PARAMETERIZATIONS}, got {self.parameterization!r}"
            )
        if self.init not in INITS:
            raise ConfigError(f"PrefixConfig.init: expected one of {INITS}, got {self.init!r}")
        if self.init != "random" and not self.init_text:
            raise ConfigError(f"PrefixConfig.init={self.init!r} needs a non-empty init_text")
        if self.prefix_length is None and self.init == "random":
            raise ConfigError("PrefixConfig.prefix_length=None needs a text init ('vocab' or 'activations')")
        if self.prefix_length is not None and (
            isinstance(self.prefix_length, bool) or not isinstance(self.prefix_length, int) or self.prefix_length < 1
        ):
            raise ConfigError(
                f"PrefixConfig.prefix_length: expected a positive int or None, got {self.prefix_length!r}"
            )
        if not isinstance(self.mlp_hidden_size, int) or self.mlp_hidden_size < 1:
            raise ConfigError(f"PrefixConfig.mlp_hidden_size: expected a positive int, got {self.mlp_hidden_size!r}")
        if not self.init_std > 0:
            raise ConfigError(f"PrefixConfig.init_std: expected > 0, got {self.init_std!r}")
        for place in PLACES:
            if not isinstance(getattr(self, place), bool):
                raise ConfigError(f"PrefixConfig.{place}: expected true or false, got {getattr(self, place)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"PrefixConfig.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PrefixConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object for the prefix config, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown prefix config field(s) {unknown}; expected only {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: {error}") from error
