"""The three prefix parameterizations. Each is a module whose output is the same thing: every
layer's prefix keys and values, ``[layers, 2, kv_heads, P, head_dim]`` (grouped-query attention:
the KV-head count, not the query's; keys and values of different head sizes, as in multi-head
latent attention, and layers of fewer or smaller heads than others: zero-padded, see `Geometry`).
Only their parameters train; the base stays frozen.

* `KVPrefix`: those keys/values directly.
* `MLPPrefix`: the paper's reparameterization, a shared ``[P, d_model]`` embedding -> Linear ->
  tanh -> Linear to all layers' keys/values. Collapsible to a `KVPrefix` after training.
* `HiddenPrefix`: per-layer ``P_theta[i]`` of shape ``[P, d_model]`` sent through that layer's own
  frozen key/value path (the attention module called with the arguments its layer gives it for
  positions 0..P-1: projections, key norm, its own rotary or none; see `KeyValuePath`), like real tokens.

Initialization is each parameterization's own business: ``init_vocab`` takes word embeddings,
``init_activations`` the frozen model's activations on a text (see `initialization.py`).

Hybrid models (`Geometry.state_layers` linear-attention layers, see `injection.states`): a prefix
covering the decoder also gives each such layer an initial state, ``states()`` -> conv
``[state_layers, conv_dim, K-1]`` and recurrent ``[state_layers, v_heads, k_head_dim, v_head_dim]``.
`KVPrefix` holds them directly; `HiddenPrefix` holds a per-layer ``[P, d_model]`` sent through the
layer's own frozen path from a zero state (`StatePath`); `MLPPrefix` is refused there (its MLP
maps to keys/values only). The counterpart of each init: ``random``: normal with ``init_std``
(`KVPrefix`: the states themselves; `HiddenPrefix`: the hidden inputs); ``vocab``: the state the
layer reaches reading the init text's word embeddings as its inputs; ``activations``: the state the
frozen model's cache holds after the init text (exact: the prefix then acts as the text). Dropout
applies to keys/values only, not to states.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .config import PrefixConfig
from .initialization import TextActivations
from .injection import Geometry, KeyValuePath, UnsupportedModelError

logger = logging.getLogger(__name__)

# `MLPPrefix.init_activations` fits embedding + MLP to the frozen model's keys/values on the init
# text: full-batch Adam on the mean squared error, from the mean attention input as the embedding.
# Measured by `benchmarks/mlp_fit.py` (relative error ||fit - target|| / ||target|| after N steps);
# the result of each fit is kept in `MLPPrefix.fit_report` and logged.
MLP_FIT_STEPS = 300
MLP_FIT_LR = 3e-3


def _layer_key_values(kv_path: KeyValuePath, layers: tuple[int, ...], hidden: Tensor) -> Tensor:
    """Per-layer hidden states ``[layers, P, d]`` (or one ``[P, d]`` for all) -> ``[layers, 2, kv, P, hd]``."""
    if not layers:  # pure state-space models: no attention layer
        return hidden.new_zeros(0, 2, 0, hidden.shape[-2], 0)
    return torch.stack([kv_path(layer, hidden[i] if hidden.ndim == 3 else hidden) for i, layer in enumerate(layers)])


def _layer_states(kv_path: KeyValuePath, count: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Per-state-layer hidden states ``[state_layers, P, d]`` (or one ``[P, d]`` for all) -> the states
    the layers reach reading them: conv ``[state_layers, conv_dim, K-1]``, recurrent ``[state_layers, h, dk, dv]``."""
    states = [kv_path.states(layer, hidden[layer] if hidden.ndim == 3 else hidden) for layer in range(count)]
    return torch.stack([conv for conv, _ in states]), torch.stack([recurrent for _, recurrent in states])


class Prefix(nn.Module):
    """Common part: the length, the layers it covers (model-wide indices, see `Geometry`), dropout on
    the produced keys/values, and the init hooks."""

    # Whether `key_values`/`states` run the frozen base's own layers (a server pauses its engine for
    # those); direct and MLP prefixes compute them from their own parameters alone.
    runs_base_model = False

    def __init__(self, config: PrefixConfig, length: int, geometry: Geometry) -> None:
        super().__init__()
        self.length = length
        self.geometry = geometry
        self.layers = geometry.layers_for(config.places)
        self.state_layers = geometry.state_layers if "decoder" in config.places else 0
        if not self.layers and not self.state_layers:
            raise ValueError(
                f"prefix covers no attention or state layer: places {config.places}, model has {list(geometry.places)}"
            )
        self.dropout = nn.Dropout(config.dropout)
        # Keys and values of different head sizes (MLA), layers of fewer or smaller heads (Gemma 4):
        # what lies past each layer's own heads and sizes is zeroed, so the output is exactly what
        # attention reads, padded with zeros.
        used = geometry.used(self.layers)  # [layers, 2, kv_heads, 1, head_dim] or None
        self.register_buffer("used", used, persistent=False)

    def key_values(self, kv_path: KeyValuePath) -> Tensor:
        raise NotImplementedError

    def states(self, kv_path: KeyValuePath) -> tuple[Tensor, Tensor] | None:
        """The linear-attention layers' initial states (conv, recurrent), None where the model has none."""
        return None

    def forward(self, kv_path: KeyValuePath) -> Tensor:
        key_values = self.key_values(kv_path)  # [layers, 2, kv_heads, P, head_dim]
        if self.used is not None:
            key_values = key_values * self.used
        return self.dropout(key_values)

    def init_vocab(self, embeddings: Tensor, kv_path: KeyValuePath) -> None:
        raise NotImplementedError

    def init_activations(self, activations: TextActivations) -> None:
        raise NotImplementedError


class KVPrefix(Prefix):
    """Direct per-layer keys and values."""

    def __init__(self, config: PrefixConfig, length: int, geometry: Geometry) -> None:
        super().__init__(config, length, geometry)
        shape = (len(self.layers), 2, geometry.kv_heads, length, geometry.head_dim)
        self.prefix_key_values = nn.Parameter(torch.randn(shape) * config.init_std)
        if self.state_layers:
            conv, recurrent = geometry.conv_state_shape, geometry.recurrent_state_shape
            self.prefix_conv_states = nn.Parameter(torch.randn(self.state_layers, *conv) * config.init_std)
            self.prefix_recurrent_states = nn.Parameter(torch.randn(self.state_layers, *recurrent) * config.init_std)

    def key_values(self, kv_path: KeyValuePath) -> Tensor:
        return self.prefix_key_values

    def states(self, kv_path: KeyValuePath) -> tuple[Tensor, Tensor] | None:
        return (self.prefix_conv_states, self.prefix_recurrent_states) if self.state_layers else None

    @torch.no_grad()
    def set_states(self, states: tuple[Tensor, Tensor] | None) -> None:
        """Copy states in (as `states` gives them), e.g. from another parameterization."""
        if self.state_layers:
            self.prefix_conv_states.copy_(states[0])
            self.prefix_recurrent_states.copy_(states[1])

    @torch.no_grad()
    def init_vocab(self, embeddings: Tensor, kv_path: KeyValuePath) -> None:
        self.prefix_key_values.copy_(_layer_key_values(kv_path, self.layers, embeddings))
        if self.state_layers:
            self.set_states(_layer_states(kv_path, self.state_layers, embeddings))

    @torch.no_grad()
    def init_activations(self, activations: TextActivations) -> None:
        self.prefix_key_values.copy_(activations.key_values[list(self.layers)])
        self.set_states((activations.conv_states, activations.recurrent_states))


class MLPPrefix(Prefix):
    """Li & Liang's reparameterization: a shared prefix embedding through an MLP to all layers' K/V."""

    def __init__(self, config: PrefixConfig, length: int, geometry: Geometry) -> None:
        super().__init__(config, length, geometry)
        if self.state_layers:
            raise UnsupportedModelError(
                f"the mlp parameterization maps to keys/values only, and this model has {self.state_layers} "
                "linear-attention layers whose prefix is an initial state; use parameterization 'kv' or 'hidden'"
            )
        self.embedding = nn.Parameter(torch.randn(length, geometry.hidden_size) * config.init_std)
        self.mlp = nn.Sequential(
            nn.Linear(geometry.hidden_size, config.mlp_hidden_size),
            nn.Tanh(),
            nn.Linear(config.mlp_hidden_size, len(self.layers) * 2 * geometry.kv_heads * geometry.head_dim),
        )
        self.fit_report: dict[str, float] | None = None  # set by init_activations

    def key_values(self, kv_path: KeyValuePath) -> Tensor:
        flat = self.mlp(self.embedding)  # [P, layers * 2 * kv * hd]
        shape = (self.length, len(self.layers), 2, self.geometry.kv_heads, self.geometry.head_dim)
        return flat.view(shape).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def init_vocab(self, embeddings: Tensor, kv_path: KeyValuePath) -> None:
        self.embedding.copy_(embeddings)

    def init_activations(
        self, activations: TextActivations, steps: int = MLP_FIT_STEPS, lr: float = MLP_FIT_LR
    ) -> None:
        """Fit embedding + MLP by regression to the frozen model's keys/values on the init text
        (settings: `MLP_FIT_STEPS`, `MLP_FIT_LR`); the outcome goes to ``fit_report`` and the log."""
        with torch.no_grad():
            self.embedding.copy_(activations.attention_inputs[list(self.layers)].mean(0))
        target = activations.key_values[list(self.layers)].detach()
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = (self.key_values(None) - target).pow(2).mean()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            error = (self.key_values(None) - target).norm() / target.norm().clamp_min(1e-12)
        self.fit_report = {"steps": steps, "lr": lr, "mse": loss.item(), "relative_error": error.item()}
        logger.info("mlp prefix fitted to activations: %s", self.fit_report)


class HiddenPrefix(Prefix):
    """Per-layer hidden-space prefix sent through each layer's own frozen key/value path: one input
    ``[P, width]`` per layer, ``width`` what its attention reads (`Geometry.attention_input_size`)."""

    runs_base_model = True

    def __init__(self, config: PrefixConfig, length: int, geometry: Geometry) -> None:
        super().__init__(config, length, geometry)
        shape = (len(self.layers), length, geometry.attention_input_size or geometry.hidden_size)
        self.prefix_hidden = nn.Parameter(torch.randn(shape) * config.init_std)
        if self.state_layers:  # the linear-attention layers' inputs, [state_layers, P, d_model]
            shape = (self.state_layers, length, geometry.hidden_size)
            self.prefix_state_hidden = nn.Parameter(torch.randn(shape) * config.init_std)

    def key_values(self, kv_path: KeyValuePath) -> Tensor:
        return _layer_key_values(kv_path, self.layers, self.prefix_hidden)

    def states(self, kv_path: KeyValuePath) -> tuple[Tensor, Tensor] | None:
        return _layer_states(kv_path, self.state_layers, self.prefix_state_hidden) if self.state_layers else None

    @torch.no_grad()
    def init_vocab(self, embeddings: Tensor, kv_path: KeyValuePath) -> None:
        if self.geometry.attention_input_size:  # Zamba 2: attention reads more than a token's embedding
            raise UnsupportedModelError(
                f"vocab init of a `hidden` prefix: attention here reads {self.geometry.attention_input_size}-wide "
                f"inputs, the word embeddings are {embeddings.shape[-1]} wide; use init='activations' or 'random'"
            )
        self.prefix_hidden.copy_(embeddings.expand_as(self.prefix_hidden))
        if self.state_layers:
            self.prefix_state_hidden.copy_(embeddings.expand_as(self.prefix_state_hidden))

    @torch.no_grad()
    def init_activations(self, activations: TextActivations) -> None:
        self.prefix_hidden.copy_(activations.attention_inputs[list(self.layers)])
        if self.state_layers:
            self.prefix_state_hidden.copy_(activations.state_inputs)


PARAMETERIZATION_CLASSES: dict[str, type[Prefix]] = {"kv": KVPrefix, "mlp": MLPPrefix, "hidden": HiddenPrefix}
