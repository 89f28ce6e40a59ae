"""`KeyValuePath`: hidden states through one attention layer's own frozen key/value path.

Runtime, not probing: the `hidden` parameterization calls it on every training step (and once per
prefix when serving). It calls the layer's attention module itself, with the very arguments its
decoder layer hands it, recorded from one forward on dummy tokens, so the keys/values are exactly
those the layer makes from such states; the probe (`probing`) only finds the modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from .attention import Capture, UnsupportedModelError, model_kind
from .states import StatePath


class KeyValuePath:
    """Sends hidden states through one layer's own frozen key/value path, as real tokens at
    positions 0..P-1 would go, and keeps the keys/values the layer hands to the attention function.

    It calls the attention module itself, with the very arguments its decoder layer hands it for
    P tokens: those are recorded from one forward of the frozen model on P dummy tokens (per prefix
    length, kept), so each layer gets what the model really gives it: its own layer type's rotary
    embedding or none (Gemma 3, Lara Mini's global layers), position ids, the mask its indexer
    reads (DeepSeek-V3.2 sparse attention), extra arguments (Beam's attention scaling), positional
    arguments (CTRL). Only the layer's input is swapped for the given states (cross-attention: the
    encoder states it reads). ``states`` does the same for the linear-attention layers of hybrid
    models (see `StatePath`)."""

    RECORDED_LENGTHS = 8  # prefix lengths whose layer arguments are kept (training and serving use few)

    def __init__(
        self,
        model: PreTrainedModel,
        attention_modules: list[nn.Module],
        kv_heads: int,
        head_dim: int,
        state_modules: list[nn.Module] | None = None,
    ) -> None:
        self.model = model
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.attention_modules = attention_modules
        self.states = StatePath(state_modules or [])
        self.recorded: dict[tuple, list[tuple[tuple, dict]]] = {}

    def __call__(self, layer: int, hidden: Tensor) -> Tensor:
        """hidden ``[P, d_model]`` -> keys/values ``[2, kv_heads, P, head_dim]`` (see `Geometry`)."""
        module = self.attention_modules[layer]
        hidden = hidden[None].to(next(module.parameters()).dtype)  # [1, P, d_model]
        args, kwargs = self.layer_arguments(hidden.shape[1], hidden.dtype)[layer]
        model_input = attention_input(args, kwargs)
        if model_input.shape[-1] != hidden.shape[-1]:
            raise UnsupportedModelError(
                f"{model_kind(self.model)}: {type(module).__name__} reads {model_input.shape[-1]}-wide inputs, not "
                f"the {hidden.shape[-1]}-wide ones a `hidden` prefix holds here (its attention modules read inputs "
                "of different widths, see Geometry.attention_input_size), so the `hidden` parameterization cannot "
                "follow it; use 'kv'"
            )
        args = tuple(hidden if value is model_input else value for value in args)
        kwargs = {key: hidden if value is model_input else value for key, value in kwargs.items()}
        capture = Capture()
        try:
            module(*args, **kwargs, prefixtune_capture=capture)
        except TypeError as error:
            raise UnsupportedModelError(
                f"{model_kind(self.model)}: {type(module).__name__} cannot be called again with its own arguments and "
                f"other hidden states, so the `hidden` parameterization cannot follow it: {error}"
            ) from error
        return capture.calls[-1].key_values(self.kv_heads, self.head_dim)[0]

    def layer_arguments(self, length: int, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
        """Each attention module's (args, kwargs) in a forward of the frozen model on `length` tokens."""
        key = (length, dtype, self.model.device)
        if key not in self.recorded:
            if len(self.recorded) >= self.RECORDED_LENGTHS:
                self.recorded.clear()
            self.recorded[key] = self._record(length)
        return self.recorded[key]

    def _record(self, length: int) -> list[tuple[tuple, dict]]:
        calls: dict[nn.Module, tuple[tuple, dict]] = {}

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(module, (args, dict(kwargs)))

        hooks = [module.register_forward_pre_hook(keep, with_kwargs=True) for module in self.attention_modules]
        modes = {module: module.training for module in self.model.modules()}  # restored as they were
        self.model.eval()  # as the frozen model computes them (and no checkpointing of a no-grad forward)
        try:
            run_on_dummy_tokens(self.model, length, length)
        finally:
            for module, training in modes.items():
                module.training = training
            for hook in hooks:
                hook.remove()
        missing = [type(module).__name__ for module in self.attention_modules if module not in calls]
        if missing:
            raise UnsupportedModelError(
                f"{model_kind(self.model)}: attention modules {missing} are not called in a forward of {length} "
                "tokens, so the `hidden` parameterization cannot follow their key/value path"
            )
        return [calls[module] for module in self.attention_modules]


def attention_input(args: tuple, kwargs: dict) -> Tensor:
    """What an attention module makes its keys and values from, in its forward arguments: its hidden
    states (the first argument), or in cross-attention the encoder states it is given."""
    source = kwargs.get("key_value_states", kwargs.get("encoder_hidden_states"))
    return source if source is not None else (args[0] if args else kwargs["hidden_states"])


def run_on_dummy_tokens(model: PreTrainedModel, source: int, target: int, **kwargs) -> None:
    """One forward without a cache on zero tokens: `target` of them (encoder-decoders: `source`
    encoder tokens and `target` decoder tokens)."""
    encoder_decoder = model.config.is_encoder_decoder
    inputs = {"input_ids": torch.zeros((1, source if encoder_decoder else target), dtype=torch.long)}
    if encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros((1, target), dtype=torch.long)
    try:
        with torch.no_grad():
            model(**{key: value.to(model.device) for key, value in inputs.items()}, use_cache=False, **kwargs)
    except TypeError as error:
        raise UnsupportedModelError(
            f"{model_kind(model)} does not pass attention arguments through AttentionInterface: {error}"
        ) from error
