"""The teacher and the student as two prefixes on one frozen `PrefixModel`.

* teacher (``TEACHER``): a `kv` prefix of the frozen model's own keys/values on the whole context,
  not trained. It is the base with the context in its prompt, exactly (the exactness `PrefixModel`
  proves), and its keys/values are computed once instead of for every row and step (and, one
  prefix for the whole batch, attended once rather than copied per row: `injection.shared_prefix`).
* student: initialised from token ids (the context's first P tokens for ``activations`` and
  ``vocab``), not from a re-tokenized text, so chat-template special tokens stay what they were.
* ``freeze_first``: the student's first position gets no gradient (an attention sink, as
  Cartridges and PEFT's ``CartridgeConfig`` keep it); AdamW without weight decay then leaves it as
  it was initialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError, PrefixConfig
from ..model import PrefixModel

TEACHER = "distill-teacher"


def add_prefix_from_ids(model: PrefixModel, name: str, config: PrefixConfig, ids: list[int]) -> None:
    """Add `name` initialised (per ``config.init``) from the first ``config.prefix_length`` of `ids`."""
    length = config.prefix_length or len(ids)
    token_ids = torch.tensor(ids[:length], dtype=torch.long)
    text = model.tokenizer.decode(token_ids) if model.tokenizer is not None else None
    start = PrefixConfig(**{**config.to_dict(), "prefix_length": length, "init": "random", "init_text": None})
    prefix = model.add_prefix(name, start)
    if config.init != "random":
        model._init_from_text(prefix, config.init, token_ids)  # noqa: SLF001 (our own class: init from ids, not text)
    recorded = {"init_text": text} if config.init != "random" else {}
    model.prefix_configs[name] = PrefixConfig(**{**start.to_dict(), "init": config.init, **recorded})


def add_teacher(model: PrefixModel, context_ids: list[int]) -> None:
    """The frozen teacher prefix: the whole context's keys/values."""
    config = PrefixConfig(prefix_length=len(context_ids), parameterization="kv", init="activations", init_text="-")
    add_prefix_from_ids(model, TEACHER, config, context_ids)
    model.prefixes[TEACHER].requires_grad_(False)


def freeze_first_position(model: PrefixModel, name: str) -> None:
    """Zero the gradient of the student's first position in every layer (see the module docstring)."""
    config = model.prefix_configs[name]
    prefix = model.prefixes[name]
    if config.parameterization == "mlp":
        raise ConfigError(
            "--freeze-first: the mlp parameterization shares one MLP over all positions, so its first "
            "position cannot be frozen alone; use parameterization kv or hidden"
        )
    parameter = prefix.prefix_key_values if config.parameterization == "kv" else prefix.prefix_hidden
    position_axis = 3 if config.parameterization == "kv" else 1  # [layers, 2, kv, P, hd] / [layers, P, d]

    def zero_first(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad.select(position_axis, 0).zero_()
        return grad

    parameter.register_hook(zero_first)
