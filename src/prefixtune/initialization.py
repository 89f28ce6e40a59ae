"""Text-based initialization: the init text's tokens, their word embeddings, and the frozen
model's own activations on them (the paper's warm start)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from .injection import Capture, attention_input, refuse_pooled_keys
from .injection.states import state_shapes


@dataclass
class TextActivations:
    """What the frozen model computes on the init text, ``P`` tokens long.

    key_values: each layer's real keys/values ``[layers, 2, kv_heads, P, head_dim]`` (zero-padded
        where key and value head sizes differ, or past a layer's own heads and sizes, see `Geometry`).
    attention_inputs: each layer's input to attention (already normalised) ``[layers, P, d_model]``.

    Hybrid models (see `injection.states`), per linear-attention layer, else None:
    conv_states: the conv state the model's cache holds after the text ``[state_layers, conv_dim, K-1]``.
    recurrent_states: its recurrent state ``[state_layers, v_heads, k_head_dim, v_head_dim]``.
    state_inputs: the layer's input ``[state_layers, P, d_model]``.
    """

    key_values: Tensor
    attention_inputs: Tensor
    conv_states: Tensor | None = None
    recurrent_states: Tensor | None = None
    state_inputs: Tensor | None = None


def init_token_ids(tokenizer, text: str, length: int | None) -> Tensor:
    """The init text's token ids, repeated or cut to `length` (all of them when `length` is None)."""
    if tokenizer is None:
        raise ValueError("a text init ('vocab' or 'activations') needs a tokenizer: PrefixModel(..., tokenizer=...)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {text!r} has no tokens")
    length = length or len(ids)
    repeats = -(-length // len(ids))
    return torch.tensor((ids * repeats)[:length], dtype=torch.long)


@torch.no_grad()
def word_embeddings(model: PreTrainedModel, token_ids: Tensor) -> Tensor:
    embeddings = model.get_input_embeddings()
    return embeddings(token_ids.to(embeddings.weight.device)).float()


@torch.no_grad()
def text_activations(
    model: PreTrainedModel,
    attention_modules: list[nn.Module],
    token_ids: Tensor,
    kv_heads: int,
    head_dim: int,
    state_modules: list[nn.Module] = (),
) -> TextActivations:
    """Run the frozen model on the tokens and keep each layer's keys/values and attention inputs.

    Encoder-decoders read the tokens on both sides: the encoder prefix gets the encoder's
    activations, the decoder prefixes the decoder's (cross-attention: its keys/values of the encoded text).
    Hybrid models' linear-attention layers (`state_modules`): the states their cache holds after the text.
    """
    inputs: dict[nn.Module, Tensor] = {}

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[module] = attention_input(args, kwargs)

    hooks = [
        module.register_forward_pre_hook(keep_input, with_kwargs=True)
        for module in [*attention_modules, *state_modules]
    ]
    capture = Capture()
    ids = token_ids[None].to(model.device)
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    cache = DynamicCache(config=model.config) if state_modules else None  # where the states are read
    if cache is not None:  # transformers 5 names it `cache` (`past_key_values` is a deprecated alias, not in Mamba-2)
        extra["cache"] = cache
    try:
        model(input_ids=ids, use_cache=cache is not None, prefixtune_capture=capture, **extra)
    finally:
        for hook in hooks:
            hook.remove()
    for call in capture.calls:
        refuse_pooled_keys(model, call, len(token_ids))
    by_module = {call.module: call.key_values(kv_heads, head_dim)[0] for call in capture.calls}
    if attention_modules:
        key_values = torch.stack([by_module[module] for module in attention_modules])
        attention_inputs = torch.stack([inputs[module][0] for module in attention_modules])
    else:  # pure state-space models: no attention layer, only states
        key_values = torch.zeros(0, 2, 0, len(token_ids), 0, device=model.device)
        attention_inputs = torch.zeros(0, len(token_ids), model.get_input_embeddings().weight.shape[1])
    activations = TextActivations(key_values=key_values.float(), attention_inputs=attention_inputs.float())
    if state_modules:
        # The cache keeps the last K inputs of each convolution; the conv state is the last K-1.
        conv = [cache.get_conv_state(module.layer_idx)[0, :, 1:] for module in state_modules]
        activations.conv_states = torch.stack(conv).float()
        recurrent = []
        for module in state_modules:  # short convolutions have no recurrent state: shape (0,)
            state = cache.get_recurrent_state(module.layer_idx)
            empty = activations.conv_states.new_zeros(state_shapes(module)[1])
            recurrent.append(empty if state is None else state[0].float())
        activations.recurrent_states = torch.stack(recurrent)
        activations.state_inputs = torch.stack([inputs[module][0] for module in state_modules]).float()
    return activations
