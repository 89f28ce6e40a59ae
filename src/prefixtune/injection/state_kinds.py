"""The registration point for state layers: what `states` needs to know of each kind of layer whose
prefix is an initial state (Gated DeltaNet in `states`, Mamba-2 mixers in `mamba_states`, Mamba-1
mixers in `mamba1_states`, short convolutions in `conv_states`), keyed by module class name.

A kind gives two functions of a module:

* ``shapes(module)``: (conv state ``[conv_dim, K-1]``, recurrent state ``[...]``) of one layer, as
  one row of the model's cache holds them (the conv state: the last K-1 inputs of its causal
  depthwise convolution; layers without a recurrent state give ``(0,)``);
* ``mix(module, hidden, mask, conv_state, recurrent_state, keep_state)``: the layer's own
  computation on ``hidden`` ``[B, T, d_model]`` (``mask`` ``[B, T]`` or None) started from the given
  states (``recurrent_state`` None: the model's own zero start), returning (output
  ``[B, T, d_model]``, the convolution's input with the conv state in place ``[B, conv_dim, K-1+T]``
  (what the cache keeps the last K columns of), the final recurrent state or None when
  ``keep_state`` is false or the layer has none). The conv state sits right before each row's first
  real token and left pads neither change nor decay a state: that is how each kind's ``mix`` differs
  from the model's own forward, and only that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# The forward keyword arguments carrying the states, per row and state layer (see `states`).
STATE_KWARGS = ("prefix_conv_states", "prefix_recurrent_states")
Shapes = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class StateKind:
    shapes: Callable[[nn.Module], Shapes]
    mix: Callable[[nn.Module, Tensor, Tensor | None, Tensor, Tensor | None, bool], tuple[Tensor, Tensor, Tensor | None]]


def conv_window(inputs: Tensor, mask: Tensor | None, conv_state: Tensor) -> Tensor:
    """The causal convolution's input ``[B, C, T]`` with K-1 columns in front, the conv state
    ``[B, C, K-1]`` put into the K-1 columns right before each row's first real token (left pads,
    or the columns in front): ``[B, C, K-1+T]``. A zero state gives the zero padding the model's own
    convolution adds, so rows without a prefix stay as they were."""
    batch, _, length = inputs.shape
    context = conv_state.shape[-1]
    window = F.pad(inputs, (context, 0))
    first = torch.zeros(batch, dtype=torch.long, device=inputs.device) if mask is None else mask.long().argmax(-1)
    offset = torch.arange(context + length, device=inputs.device)[None] - first[:, None]  # [B, K-1+T]
    in_state = ((offset >= 0) & (offset < context))[:, None]  # [B, 1, K-1+T]
    state = conv_state.to(inputs.dtype).gather(-1, offset.clamp(0, context - 1)[:, None].expand_as(window))
    return torch.where(in_state, state, window)


def conv_state_term(window: Tensor, inputs: Tensor, weight: Tensor) -> Tensor:
    """What the conv state adds to a causal depthwise convolution ``[B, C, T]`` (before its
    activation): the convolution (``weight`` ``[C, K]``, no bias) of `window` (`conv_window`) minus
    that of the inputs with the model's own zero padding. By linearity the model's own convolution
    of the inputs plus this term is the convolution of the window; for a zero state it is exactly
    zero, so a layer without a prefix computes bit for bit what the model's own does."""
    difference = window - F.pad(inputs, (window.shape[-1] - inputs.shape[-1], 0))
    return F.conv1d(difference.to(weight.dtype), weight.unsqueeze(1), groups=weight.shape[0]).to(inputs.dtype)


def state_conv(own, conv: nn.Conv1d, inputs: Tensor, mask: Tensor | None, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own causal depthwise convolution (``own.causal_conv1d_fn`` of its modeling file,
    no activation) of ``inputs`` ``[B, C, T]``, with the conv state ``[B, C, K-1]`` right before each
    row's first real token (`conv_window`, `conv_state_term`): (output ``[B, C, T]``, the window
    ``[B, C, K-1+T]`` the cache keeps the last K columns of). Shared by the Mamba-1, Mamba-2 and
    short-convolution kinds."""
    weight = conv.weight.squeeze(1)  # [C, K]
    window = conv_window(inputs, mask, conv_state)
    output = own.causal_conv1d_fn(inputs, weight, conv.bias, activation=None)
    return output + conv_state_term(window, inputs, weight), window
