"""Mamba-2 mixers (Mamba-2, Bamba, Granite 4.0 hybrid, Nemotron-H, Falcon-H1, Zamba 2): their prefix is a state.

What a text T leaves in a Mamba-2 mixer is what the model's cache holds after it: the conv state
(the last K-1 inputs ``x, B, C`` of its causal depthwise convolution, ``[conv_dim, K-1]``) and the
SSM state (``[heads, head_dim, ssm_state_size]``). `states` carries them per row and per layer,
as for Gated DeltaNet (see `states` and `state_kinds`).

transformers' own forward (the torch path; ``mamba2_chunk_scan``'s ``initial_states`` comes from
the cache only, for all rows alike) cannot take a state per row, and its cache path puts the conv
state before the left pads and decays the SSM state across them. So `mix` is the model's own
torch path (its projections, ``causal_conv1d_fn``, ``mamba2_chunk_scan``, gated norm and output
projection, taken from the model's own modeling file), differing in exactly three points:

1. the conv state is put right before each row's first real token, as the term it adds to the
   model's own convolution (`state_kinds.state_conv`; zero for a zero state);
2. the time step ``dt`` is 0 at padding positions, so the SSM state crosses left pads unchanged (the
   model's own computes ``softplus(dt + dt_bias)`` there, leaving a zero state zero but decaying any
   other); for that, ``softplus``, ``dt_bias`` and the ``dt`` clamp are applied here, in the order
   and precision ``mamba2_chunk_scan`` applies them, and the scan gets the result as is;
3. the scan starts from the prefix's SSM state.

The five mixer classes share one forward in transformers 5.24 (Bamba's, Granite's, Nemotron-H's and
Zamba 2's are copies of Mamba-2's); Falcon-H1's adds input multipliers (``ssm_in_multiplier``,
``mup_vector``) and may gate without its norm (``mamba_rms_norm``). tests/test_mamba_states.py
compares `mix` from zero states with each class's own forward, bit for bit, so an upgrade that
changes one is caught.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from ..transformers_private import with_accelerate_hooks
from .state_kinds import STATE_KWARGS, Shapes, StateKind, state_conv


def shapes(module: nn.Module) -> Shapes:
    """(conv state ``[conv_dim, K-1]``, SSM state ``[heads, head_dim, ssm_state_size]``)."""
    return (module.conv_dim, module.conv_kernel_size - 1), (module.num_heads, module.head_dim, module.ssm_state_size)


def _project(module: nn.Module, hidden: Tensor) -> Tensor:
    """The input projection ``[B, T, d_model]`` -> ``[B, T, intermediate + conv_dim + heads]``."""
    if type(module).__name__ == "FalconH1Mixer":  # its muP multipliers around the projection
        return module.in_proj(hidden * module.ssm_in_multiplier) * module.mup_vector
    return module.in_proj(hidden)


def _gate(module: nn.Module, scan: Tensor, gate: Tensor) -> Tensor:
    """The scan's output ``[B, T, intermediate]`` gated (and normed) as the layer does."""
    if type(module).__name__ == "FalconH1Mixer" and not module.mamba_rms_norm:
        return scan * F.silu(gate)
    return module.norm(scan, gate)


def _time_step(module: nn.Module, dt: Tensor, mask: Tensor | None) -> Tensor:
    """``dt`` ``[B, T, heads]`` as ``mamba2_chunk_scan`` makes it (bias, softplus, clamp), 0 at pads."""
    dt = F.softplus(dt + module.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=module.time_step_limit[0], max=module.time_step_limit[1])
    return dt if mask is None else dt.masked_fill(~mask.bool()[:, :, None], 0)


@with_accelerate_hooks("conv1d")  # as the model's own forward: the conv weight is used directly
def mix(
    module: nn.Module,
    hidden: Tensor,  # [B, T, d_model]
    mask: Tensor | None,  # [B, T]
    conv_state: Tensor,  # [B, conv_dim, K-1]
    ssm_state: Tensor | None,  # [B, heads, head_dim, ssm_state_size]
    keep_state: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The mixer on `hidden` from the given states (see `state_kinds`; module docstring: what differs)."""
    own = sys.modules[type(module).__module__]  # the modeling file's functions (or the kernels replacing them)
    batch, length, _ = hidden.shape
    dtype = hidden.dtype
    projected = _project(module, own.apply_mask_to_padding_states(hidden, mask))
    A = -torch.exp(module.A_log.float())
    gate, xbc, dt = projected.split([module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)
    xbc, window = state_conv(own, module.conv1d, xbc.transpose(1, 2), mask, conv_state)  # [B, conv_dim, T], [.., K-1+T]
    xbc = F.pad(xbc, (0, window.shape[-1] - length))[:, :, :length]
    xbc = ACT2FN[module.activation](xbc)  # on the layout of the model's own (a cut of K-1+T columns): same rounding
    xbc = own.apply_mask_to_padding_states(xbc.transpose(1, 2), mask)
    groups = module.n_groups * module.ssm_state_size
    x, B, C = torch.split(xbc, [module.intermediate_size, groups, groups], dim=-1)
    scan, final = own.mamba2_chunk_scan(
        x.view(batch, length, module.num_heads, module.head_dim),
        _time_step(module, dt, mask),
        A,
        B.view(batch, length, module.n_groups, module.ssm_state_size),
        C.view(batch, length, module.n_groups, module.ssm_state_size),
        chunk_size=module.chunk_size,
        D=module.D,
        z=None,
        return_final_states=True,
        initial_states=ssm_state,
    )
    output = module.out_proj(_gate(module, scan.reshape(batch, length, -1), gate).to(dtype))
    return output, window, final if keep_state else None


CLASSES = ("Mamba2Mixer", "BambaMixer", "GraniteMoeHybridMambaLayer", "NemotronHMamba2Mixer", "FalconH1Mixer")
STATE_KINDS = dict.fromkeys((*CLASSES, "Zamba2MambaMixer"), StateKind(shapes, mix))


def carry_state_kwargs(model: PreTrainedModel) -> list[RemovableHandle]:
    """Hooks that hand the prefix states from the model's forward call to its base model's, for
    heads that drop extra keyword arguments on the way (``Mamba2ForCausalLM`` calls its backbone
    with its named arguments only); the base model passes them on to its layers. Where the head
    passes them on itself, the base model's call has them already and nothing changes."""
    base = model.base_model
    if base is model:
        return []
    pending: dict[str, Tensor] = {}

    def take(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending.clear()
        pending.update({key: kwargs[key] for key in STATE_KWARGS if kwargs.get(key) is not None})

    def give(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not pending or any(key in kwargs for key in STATE_KWARGS):
            return None
        kwargs = kwargs | pending
        pending.clear()
        return args, kwargs

    return [
        model.register_forward_pre_hook(take, with_kwargs=True),
        base.register_forward_pre_hook(give, with_kwargs=True),
    ]
