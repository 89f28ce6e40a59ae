"""Mamba-1 mixers (Mamba, Falcon-Mamba, Jamba): their prefix is a state, as for Mamba-2.

What a text T leaves in a Mamba-1 mixer is what the model's cache holds after it: the conv state
(the last K-1 inputs of its causal depthwise convolution, ``[intermediate, K-1]``) and the SSM state
(``[intermediate, ssm_state_size]``). `states` carries them per row and per layer, as for Gated
DeltaNet (see `states` and `state_kinds`).

transformers' own forward (the torch path) starts its selective scan from zeros and takes a conv
state only from its cache, for all rows alike and before the left pads. So `mix` is the model's own
torch path (its projections, ``causal_conv1d_fn``, the dt/B/C norms of Falcon-Mamba and Jamba, the
recurrent branch of ``mamba_selective_scan`` and output projection), differing in exactly three points:

1. the conv state is put right before each row's first real token, as the term it adds to the
   model's own convolution (`state_kinds.state_conv`; zero for a zero state);
2. the time step ``dt`` is 0 at padding positions, so the SSM state crosses left pads unchanged (the
   model's own gives pads ``softplus(dt_bias)``, leaving a zero state zero but decaying any other);
   for that, the bias and ``softplus`` are applied here, in the order and precision the scan applies them;
3. the scan (`selective_scan`, the model's recurrent loop) starts from the prefix's SSM state.

These models' layers drop extra keyword arguments on the way to the mixer (``MambaModel`` calls its
blocks with its named arguments only; ``MambaBlock`` and Jamba's Mamba layer call the mixer so), so
`carry_to_mixers` hands the states over on the one argument that reaches the mixer: the attention
mask, replaced for the call by a fresh copy (all ones where there was none, which the model's own
forward multiplies by exactly) that carries them. Gradient checkpointing replays a layer with the
arguments of its call, that same mask included, so a replay sees the states of its own call.
tests/test_mamba1_states.py compares `mix` from zero states with each class's own forward, bit for bit.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from ..transformers_private import is_quantized, with_accelerate_hooks
from .state_kinds import STATE_KWARGS, Shapes, StateKind, state_conv

CLASSES = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")
_CARRIED = "prefixtune_states"  # the attribute of the fresh attention mask that carries the states


def shapes(module: nn.Module) -> Shapes:
    """(conv state ``[intermediate, K-1]``, SSM state ``[intermediate, ssm_state_size]``)."""
    return (module.intermediate_size, module.conv_kernel_size - 1), (module.intermediate_size, module.ssm_state_size)


def _selective_inputs(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``[B, T, intermediate]`` -> time step ``[B, intermediate, T]`` (before its bias), B, C ``[B, T, N]``."""
    time_step, B, C = torch.split(
        module.x_proj(x), [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1
    )
    if not hasattr(module, "b_layernorm"):  # Mamba
        return module.dt_proj.weight @ time_step.transpose(1, 2), B, C
    time_step, B, C = module.dt_layernorm(time_step), module.b_layernorm(B), module.c_layernorm(C)
    if is_quantized(module.config):  # as Falcon-Mamba's and Jamba's own: nn.Linear minus its bias
        return (module.dt_proj(time_step) - module.dt_proj.bias).transpose(1, 2), B, C
    return module.dt_proj.weight @ time_step.transpose(1, 2), B, C


def selective_scan(
    x: Tensor,  # [B, I, T]
    dt: Tensor,  # [B, I, T], bias and softplus applied
    A: Tensor,  # [I, N]
    B: Tensor,  # [B, T, N]
    C: Tensor,  # [B, T, N]
    initial: Tensor | None,  # [B, I, N]; None: zeros, as the model's own
) -> tuple[Tensor, Tensor]:
    """The recurrent branch of the model's ``mamba_selective_scan`` (before D and the gate), from `initial`:
    (scan output ``[B, I, T]``, final state ``[B, I, N]``)."""
    batch, channels, length = x.shape
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # [B, I, T, N]
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * x[:, :, :, None].float()
    state = x.new_zeros(batch, channels, A.shape[-1]) if initial is None else initial
    outputs = []
    for index in range(length):
        state = discrete_A[:, :, index] * state + deltaB_u[:, :, index]
        outputs.append(torch.matmul(state.to(x.dtype), C[:, index, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(outputs, dim=-1), state


@with_accelerate_hooks("conv1d", "dt_proj")  # as the model's own forward: these weights are used directly
def mix(
    module: nn.Module,
    hidden: Tensor,  # [B, T, d_model]
    mask: Tensor | None,  # [B, T]
    conv_state: Tensor,  # [B, intermediate, K-1]
    ssm_state: Tensor | None,  # [B, intermediate, ssm_state_size]
    keep_state: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The mixer on `hidden` from the given states (see `state_kinds`; module docstring: what differs)."""
    own = sys.modules[type(module).__module__]  # the modeling file's functions
    length, dtype = hidden.shape[1], hidden.dtype
    inputs, gate = module.in_proj(own.apply_mask_to_padding_states(hidden, mask)).transpose(1, 2).chunk(2, dim=1)
    x, window = state_conv(own, module.conv1d, inputs, mask, conv_state)  # inputs, gate, x [B, I, T]
    x = ACT2FN[module.activation](F.pad(x, (0, window.shape[-1] - length))[:, :, :length])  # the model's own layout
    x = own.apply_mask_to_padding_states(x.transpose(1, 2), mask)  # [B, T, I]
    time_step, B, C = _selective_inputs(module, x)
    dt = F.softplus(time_step + module.dt_proj.bias.float()[..., None])
    dt = dt if mask is None else dt.masked_fill(~mask.bool()[:, None, :], 0)
    x = x.transpose(1, 2)
    scan, final = selective_scan(x, dt, -torch.exp(module.A_log.float()), B, C, ssm_state)
    scan = (scan + x * module.D.float()[None, :, None]) * F.silu(gate)
    return module.out_proj(scan.transpose(1, 2).to(dtype)), window, final if keep_state else None


STATE_KINDS = dict.fromkeys(CLASSES, StateKind(shapes, mix))


def carried_states(mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The (conv, SSM) states of all state layers that `carry_to_mixers` put on this call's mask, if any."""
    return getattr(mask, _CARRIED, None)


def carry_to_mixers(model: PreTrainedModel, modules: list[nn.Module]) -> list[RemovableHandle]:
    """Hooks that hand the prefix states of a forward call to the Mamba-1 mixers among `modules`
    on a fresh attention mask (module docstring: why); none where there are no such mixers."""
    mixers = [module for module in modules if type(module).__name__ in CLASSES]
    if not mixers:
        return []
    pending: dict[str, Tensor] = {}

    def take(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending.clear()
        pending.update({key: kwargs[key] for key in STATE_KWARGS if kwargs.get(key) is not None})

    def carry(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not pending:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d_model]
        mask = kwargs.get("attention_mask")
        fresh = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device) if mask is None else mask.clone()
        setattr(fresh, _CARRIED, tuple(pending[key] for key in STATE_KWARGS))
        return args, kwargs | {"attention_mask": fresh}

    hooks = [model.base_model.register_forward_pre_hook(take, with_kwargs=True)]
    hooks.append(model.base_model.register_forward_hook(lambda *_: pending.clear()))
    layers = [m for m in model.modules() if any(getattr(m, name, None) in mixers for name in ("mixer", "mamba"))]
    return hooks + [layer.register_forward_pre_hook(carry, with_kwargs=True) for layer in layers]
