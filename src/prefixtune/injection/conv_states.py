"""Short-convolution layers (Liquid LFM2, LFM2-MoE): their prefix is the convolution's initial state.

An LFM2 convolution layer gates a causal depthwise convolution: ``y = C * conv(B * x)``. What a text
T leaves there is the last K-1 inputs ``B * x`` of the convolution (K = ``conv_L_cache``), the conv
state ``[hidden_size, K-1]`` the model's cache holds; there is no recurrent state (its shape in the
`Geometry` is ``(0,)``). `states` carries it per row and per layer, as for Gated DeltaNet.

transformers' own forward takes a conv state only from its cache, for all rows alike and before the
left pads. So `mix` is the model's own computation (its projections, ``causal_conv1d_fn`` and output
projection, from the model's own modeling file), differing only in that the conv state is put right
before each row's first real token, as the term it adds to the model's own convolution
(`state_kinds.state_conv`, zero for a zero state: without a prefix `mix` is transformers' forward bit for
bit, which tests/test_conv_states.py checks).
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from ..transformers_private import with_accelerate_hooks
from .state_kinds import Shapes, StateKind, state_conv


def shapes(module: nn.Module) -> Shapes:
    """(conv state ``[hidden_size, K-1]``, no recurrent state ``(0,)``)."""
    return (module.conv.in_channels, module.conv_kernel_size - 1), (0,)


@with_accelerate_hooks("conv")  # as the model's own forward: the conv weight is used directly
def mix(
    module: nn.Module,
    hidden: Tensor,  # [B, T, d_model]
    mask: Tensor | None,  # [B, T]
    conv_state: Tensor,  # [B, d_model, K-1]
    recurrent_state: Tensor | None,  # unused: a short convolution has none
    keep_state: bool,
) -> tuple[Tensor, Tensor, None]:
    """The layer on `hidden` from the given conv state (see `state_kinds`; module docstring: what differs)."""
    own = sys.modules[type(module).__module__]  # the modeling file's functions (or the kernels replacing them)
    hidden = own.apply_mask_to_padding_states(hidden, mask)
    B, C, x = module.in_proj(hidden).transpose(-1, -2).chunk(3, dim=-2)  # each [B, d_model, T]
    convolved, window = state_conv(own, module.conv, B * x, mask, conv_state)  # [B, d_model, T], [.., K-1+T]
    output = module.out_proj((C * convolved).transpose(-1, -2).contiguous())
    return output, window, None


STATE_KINDS = dict.fromkeys(("Lfm2ShortConv", "Lfm2MoeShortConv"), StateKind(shapes, mix))
