"""Linear-attention layers (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo Hybrid): their prefix is an initial state.

A key/value prefix of text T makes an attention layer act as if T came first. A linear-attention
layer keeps no keys/values; what T leaves there is the layer's state, as the model's cache holds it:
the conv state (the last ``K-1`` inputs of its causal depthwise convolution, ``[conv_dim, K-1]``)
and the recurrent state of the gated delta rule (``[v_heads, k_head_dim, v_head_dim]``). So a prefix
holds one such pair per linear-attention layer ("state layer"), and the forward call carries them
per row, like the keys/values: ``prefix_conv_states`` ``[B, state_layers, conv_dim, K-1]`` and
``prefix_recurrent_states`` ``[B, state_layers, v_heads, k_head_dim, v_head_dim]``. Zeros are no
prefix: the model's own start (its convolution pads with zeros, its recurrent state starts at 0).
A training forward passes each split by state layer instead (tuples, `attention.split_by_layer`), so
each layer's backward does not allocate and fill the whole tensor's gradient.

`install` replaces each such module's ``forward`` on the instance (`remove` deletes it again) by
`prefixed_forward`. Without those arguments, or once the generation cache holds this layer's state
(decode steps: the state after prefix and text is there already), that is the model's own forward.
Otherwise it is the model's own computation (its projections, its ``causal_conv1d_fn``, its gated
delta rule functions, gated norm and output projection), differing in exactly three points:

1. the conv state is put right before each row's first real token, as left context of the
   convolution (the model's own cache path puts it before the whole input, i.e. before left pads);
2. at padding positions the decay ``g`` and the write strength ``beta`` are 0, so the recurrent
   state crosses left pads unchanged (the model's own leaves a zero state zero there but decays any other);
3. the delta rule starts from the prefix's recurrent state.

Packed sequences (``cu_seq_lens_q``) with a prefix state are refused rather than mixed up.

With a cache (the prefill of ``generate``), the states after the text are written to it through
the cache's own ``update_conv_state`` / ``update_recurrent_state``, as the model's own forward does.
The prefix states themselves never enter the cache, so gradient checkpointing replays the layer
with the same arguments, and ``generate`` expands them per beam like any model input.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import DynamicCache, PreTrainedModel

from ..transformers_private import linear_attention_layers, with_accelerate_hooks
from .attention import MASK_CACHE_KWARG, POSITIONS_KWARG, PREFIX_KWARGS, UnsupportedModelError, layer_of
from .conv_states import STATE_KINDS as SHORT_CONV_KINDS
from .mamba1_states import STATE_KINDS as MAMBA1_KINDS
from .mamba1_states import carried_states
from .mamba_states import STATE_KINDS as MAMBA2_KINDS
from .state_kinds import STATE_KWARGS, Shapes, StateKind

# What prefixtune adds to a forward call, for attention layers; a linear layer's own forward must not see it.
_INJECTION_KWARGS = (*PREFIX_KWARGS, *STATE_KWARGS, MASK_CACHE_KWARG, POSITIONS_KWARG, "prefixtune_capture")


def find_state_layers(model: PreTrainedModel, kind: str) -> list[nn.Module]:
    """The model's linear-attention modules in layer order, after checking that every layer its
    cache declares stateful (linear attention, state-space, convolution) is one `prefixed_forward`
    follows. Anything else is refused: a key/value prefix would reach only the attention layers."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as error:  # a hybrid model's cache that cannot be built: its state layers are unknown
        raise UnsupportedModelError(
            f"{kind}: transformers cannot build this model's cache from its config ({type(error).__name__}: "
            f"{error}), so prefixtune cannot tell which layers carry a recurrent/convolution state; it refuses the "
            "model rather than serve it with key/value prefixes only"
        ) from error
    stateful = linear_attention_layers(layers)
    found = {module.layer_idx: module for module in model.modules() if type(module).__name__ in STATE_LAYER_CLASSES}
    unknown = [index for index in stateful if index not in found]
    if unknown:
        raise UnsupportedModelError(
            f"{kind}: layers {unknown} are linear-attention, state-space or convolution layers (they carry a "
            "recurrent/convolution state, not keys and values) of a kind prefixtune has no initial-state prefix for "
            f"(it has for {', '.join(STATE_LAYER_CLASSES)}); a key/value prefix alone would not act like its text, so "
            "prefixtune refuses this hybrid model"
        )
    return [found[index] for index in stateful]


def state_shapes(module: nn.Module) -> Shapes:
    """(conv state ``[conv_dim, K-1]``, recurrent state) of one state layer, by its kind (`STATE_KINDS`)."""
    return STATE_KINDS[type(module).__name__].shapes(module)


def _gated_deltanet_shapes(module: nn.Module) -> Shapes:
    """(conv state ``[conv_dim, K-1]``, recurrent state ``[v_heads, k_head_dim, v_head_dim]``)."""
    return (
        (module.conv_dim, module.conv_kernel_size - 1),
        (module.num_v_heads, module.head_k_dim, module.head_v_dim),
    )


def install(modules: list[nn.Module]) -> None:
    """Tag the state layers with their index and put `prefixed_forward` in place on each instance."""
    for index, module in enumerate(modules):
        module.prefixtune_state_layer = index
        own = module.__dict__.get("forward")
        if isinstance(own, partial) and own.func is prefixed_forward:
            continue  # installed already
        if own is not None:  # e.g. accelerate's offloading hooks: wrapping them would leave weights on `meta`
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {module.layer_idx}): its forward is replaced on the instance "
                f"({getattr(own, '__qualname__', type(own).__name__)}; e.g. accelerate's CPU/disk offloading hooks), "
                "so prefixtune cannot put its initial-state forward in place exactly; load the model without offloading"
            )
        module.forward = partial(prefixed_forward, module, module.forward)


def remove(model: nn.Module) -> None:
    """Undo `install` (the module's class forward is its own again)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), partial) and module.forward.func is prefixed_forward:
            del module.forward


def prefixed_forward(
    module: nn.Module,
    own_forward,
    hidden_states: Tensor,  # [B, T, d_model]
    cache=None,
    attention_mask: Tensor | None = None,  # [B, T] (None: no padding)
    **kwargs,
) -> Tensor:
    """The layer's forward with the prefix states as its initial state (module docstring: what differs)."""
    # [B, state_layers, conv_dim, K-1], [B, state_layers, v_heads, k_dim, v_dim] (Mamba-1: on the mask)
    conv_states, recurrent_states = carried_states(attention_mask) or [kwargs.get(key) for key in STATE_KWARGS]
    kwargs = {key: value for key, value in kwargs.items() if key not in _INJECTION_KWARGS}
    if conv_states is None or (cache is not None and cache.get_conv_state(module.layer_idx) is not None):
        return own_forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if kwargs.get("cu_seq_lens_q") is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__}: packed sequences (cu_seq_lens_q) with a prefix state; pass padded rows instead"
        )
    if cache is not None and attention_mask is not None and not bool(attention_mask.bool().any(-1).all()):
        # Chunked prefill whose first chunk holds only pads for some row: the cache would keep pad
        # zeros as that row's conv state and the model's own forward would decay the state over the
        # remaining pads in the next chunk.
        raise UnsupportedModelError(
            f"{type(module).__name__}: a row is all padding in the first prefill chunk; with a prefix state, use a "
            "prefill chunk longer than the longest left padding (or no chunked prefill)"
        )
    layer, device = module.prefixtune_state_layer, hidden_states.device  # layers may sit on other devices
    conv_state, recurrent_state = layer_of(conv_states, layer).to(device), layer_of(recurrent_states, layer).to(device)
    mix_layer = STATE_KINDS[type(module).__name__].mix
    output, window, final = mix_layer(
        module, hidden_states, attention_mask, conv_state, recurrent_state, cache is not None
    )
    if cache is not None:  # what the text leaves, stored as the model's own forward stores it
        kernel_size = state_shapes(module)[0][1] + 1
        cache.update_conv_state(window, module.layer_idx, conv_kernel_size=kernel_size)
        if final is not None:  # short convolutions have no recurrent state
            cache.update_recurrent_state(final, module.layer_idx)
    return output


def _qwen3_next_inputs(module: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3-Next: one fused projection, grouped per key head (see `_INPUTS`)."""
    query, key, value, z, b, a = module.fix_query_key_value_ordering(
        module.in_proj_qkvz(hidden), module.in_proj_ba(hidden)
    )
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value)], dim=-1)
    return mixed.transpose(1, 2), z, b.sigmoid(), a


def _qwen3_5_inputs(module: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3.5 (dense and MoE), Lara Mini: separate query/key/value, gate, b and a projections."""
    z = module.in_proj_z(hidden).reshape(hidden.shape[0], hidden.shape[1], -1, module.head_v_dim)
    return module.in_proj_qkv(hidden).transpose(1, 2), z, module.in_proj_b(hidden).sigmoid(), module.in_proj_a(hidden)


def _olmo_hybrid_inputs(module: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OLMo Hybrid: one projection each, its own output-gate projection, beta up to 2 when allowed."""
    mixed = torch.cat([module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)], dim=-1)
    gate = module.g_proj(hidden).reshape(hidden.shape[0], hidden.shape[1], -1, module.head_v_dim)
    beta = module.b_proj(hidden).sigmoid()
    if module.allow_neg_eigval:
        beta = beta * 2.0
    return mixed.transpose(1, 2), gate, beta, module.a_proj(hidden)


# The Gated DeltaNet module classes `mix` follows, and how each makes its inputs from the (masked)
# hidden states, as its own forward does: the convolution input ``[B, conv_dim, T]``, the output
# gate ``[B, T, v_heads, v_head_dim]``, ``beta`` and ``a`` ``[B, T, v_heads]``. The rest of their
# forwards is the same code (Qwen3.5 MoE's and Lara Mini's layers are copies of Qwen3.5's).
_INPUTS = {
    "Qwen3NextGatedDeltaNet": _qwen3_next_inputs,
    "Qwen3_5GatedDeltaNet": _qwen3_5_inputs,
    "Qwen3_5MoeGatedDeltaNet": _qwen3_5_inputs,
    "LaraMiniGatedDeltaNet": _qwen3_5_inputs,
    "OlmoHybridGatedDeltaNet": _olmo_hybrid_inputs,
}


@with_accelerate_hooks("conv1d")  # as the model's own forward: the conv weight is used directly
def mix(
    module: nn.Module,
    hidden: Tensor,  # [B, T, d_model]
    mask: Tensor | None,  # [B, T]
    conv_state: Tensor,  # [B, conv_dim, K-1]
    recurrent_state: Tensor | None,  # [B, v_heads, k_head_dim, v_head_dim]
    keep_state: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The layer on `hidden` from the given states: (output ``[B, T, d_model]``, the convolution's
    input with the conv state in place ``[B, conv_dim, K-1+T]``, the final recurrent state or None)."""
    own = sys.modules[type(module).__module__]  # the modeling file's functions (or the kernels replacing them)
    hidden = own.apply_mask_to_padding_states(hidden, mask)  # pads are zeros, as in the model's own
    batch, length, _ = hidden.shape
    mixed, gate, beta, a = _INPUTS[type(module).__name__](module, hidden)
    context = module.conv_kernel_size - 1
    # The conv state goes into the K-1 columns right before each row's first real token. Those
    # columns are zeros (left pads, or the K-1 added in front), so adding puts it there exactly.
    first = torch.zeros(batch, dtype=torch.long, device=hidden.device) if mask is None else mask.long().argmax(-1)
    columns = (first[:, None] + torch.arange(context, device=hidden.device))[:, None].expand(-1, mixed.shape[1], -1)
    seeded = mixed.new_zeros(batch, mixed.shape[1], context + length).scatter(-1, columns, conv_state.to(mixed.dtype))
    window = F.pad(mixed, (context, 0)) + seeded  # [B, conv_dim, K-1+T]
    weight = module.conv1d.weight.squeeze(1)
    mixed = own.causal_conv1d_fn(window, weight, module.conv1d.bias, activation=module.activation)[:, :, -length:]
    query, key, value = torch.split(mixed.transpose(1, 2), [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(batch, length, -1, module.head_k_dim)
    key = key.reshape(batch, length, -1, module.head_k_dim)
    value = value.reshape(batch, length, -1, module.head_v_dim)
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    if mask is not None:  # pads neither decay nor write the state
        real = mask[:, :, None].bool()
        beta, g = beta.masked_fill(~real, 0), g.masked_fill(~real, 0)
    rule = own.torch_recurrent_gated_delta_rule if length == 1 else own.torch_chunk_gated_delta_rule
    output, final = rule(
        query,
        key,
        value,
        g=g,
        beta=beta,
        initial_state=recurrent_state,
        output_final_state=keep_state,
        use_qk_l2norm_in_kernel=True,
    )
    norm, projection = (module.o_norm, module.o_proj) if hasattr(module, "o_proj") else (module.norm, module.out_proj)
    output = norm(output.reshape(-1, module.head_v_dim), gate.reshape(-1, module.head_v_dim))
    return projection(output.reshape(batch, length, -1)), window, final


# Every kind of state layer prefixtune follows, by module class name: the registration point (see `state_kinds`).
STATE_KINDS: dict[str, StateKind] = {
    **dict.fromkeys(_INPUTS, StateKind(_gated_deltanet_shapes, mix)),
    **MAMBA1_KINDS,
    **MAMBA2_KINDS,
    **SHORT_CONV_KINDS,
}
STATE_LAYER_CLASSES = tuple(STATE_KINDS)


class StatePath:
    """Sends hidden states ``[P, d_model]`` through one state layer's own frozen path from the
    model's own start (zero states), as P real tokens at its input would go, and returns the
    states they leave: conv ``[conv_dim, K-1]``, recurrent ``[v_heads, k_head_dim, v_head_dim]``.
    Differentiable: the `hidden` parameterization trains through it."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __call__(self, layer: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        module = self.modules[layer]
        hidden = hidden[None].to(next(module.parameters()).dtype)  # [1, P, d_model]
        conv_shape, recurrent_shape = state_shapes(module)
        start = hidden.new_zeros(1, *conv_shape)
        _, window, final = STATE_KINDS[type(module).__name__].mix(module, hidden, None, start, None, True)
        final = hidden.new_zeros(1, *recurrent_shape).float() if final is None else final  # short convolutions: none
        return window[0, :, window.shape[-1] - conv_shape[1] :], final[0]
