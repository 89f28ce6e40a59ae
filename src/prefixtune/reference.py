"""A small from-scratch decoder with prefix tuning built into its attention: an independent second
implementation that the tests hold the `transformers` injection against.

It follows the seed design: `MultiHeadAttentionWithPrefix` puts learned keys/values in front of
the text's, the prefix is always visible and the text is causal; `PrefixTunedModel` freezes a
decoder and owns one ``[layers, 2, heads, P, head_dim]`` prefix. Positions follow prefixtune's
convention: the prefix owns positions ``0..P-1`` and text starts at ``P``. It loads GPT-2 weights
(`ReferenceDecoder.from_gpt2`), so it is a GPT-2 block: pre-norm, learned positions, tanh-GELU MLP.
Single sequences, no padding, no cache: plain enough to check by reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ReferenceConfig:
    vocab_size: int
    max_positions: int
    d_model: int
    n_heads: int
    n_layers: int
    layer_norm_eps: float = 1e-5


class MultiHeadAttentionWithPrefix(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, prefix_key: Tensor | None = None, prefix_value: Tensor | None = None) -> Tensor:
        """x ``[B, T, d]``; prefix_key/value ``[B, heads, P, head_dim]`` or None."""
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        prefix_length = 0
        if prefix_key is not None:
            prefix_length = prefix_key.shape[2]
            k = torch.cat([prefix_key, k], dim=2)
            v = torch.cat([prefix_value, v], dim=2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        # Prefix columns always visible; text column j visible from text row i when j <= i.
        visible = torch.ones(length, prefix_length + length, dtype=torch.bool, device=x.device)
        visible[:, prefix_length:] = torch.tril(visible[:, prefix_length:])
        scores = scores.masked_fill(~visible, float("-inf"))
        attended = scores.softmax(dim=-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, length, d_model))


class Block(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = MultiHeadAttentionWithPrefix(config)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp_in = nn.Linear(config.d_model, 4 * config.d_model)
        self.mlp_out = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: Tensor, prefix_key: Tensor | None, prefix_value: Tensor | None) -> Tensor:
        x = x + self.attention(self.norm_1(x), prefix_key, prefix_value)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm_2(x)), approximate="tanh"))


class ReferenceDecoder(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, prefix_key_values: Tensor | None = None) -> Tensor:
        """input_ids ``[B, T]``; prefix_key_values ``[layers, 2, heads, P, head_dim]`` -> logits ``[B, T, vocab]``."""
        prefix_length = 0 if prefix_key_values is None else prefix_key_values.shape[3]
        positions = torch.arange(prefix_length, prefix_length + input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for i, block in enumerate(self.blocks):
            if prefix_key_values is None:
                x = block(x, None, None)
            else:
                key, value = (t[None].expand(input_ids.shape[0], -1, -1, -1) for t in prefix_key_values[i])
                x = block(x, key, value)
        return self.norm(x) @ self.token_embedding.weight.T  # tied output embedding, as in GPT-2

    @classmethod
    @torch.no_grad()
    def from_gpt2(cls, gpt2) -> ReferenceDecoder:
        """Copy the weights of a `transformers` GPT2LMHeadModel (its Conv1D weights are transposed Linear)."""
        hf = gpt2.config
        model = cls(
            ReferenceConfig(hf.vocab_size, hf.n_positions, hf.n_embd, hf.n_head, hf.n_layer, hf.layer_norm_epsilon)
        )
        source = gpt2.transformer
        model.token_embedding.weight.copy_(source.wte.weight)
        model.position_embedding.weight.copy_(source.wpe.weight)
        model.norm.load_state_dict(source.ln_f.state_dict())
        for block, hf_block in zip(model.blocks, source.h, strict=True):
            block.norm_1.load_state_dict(hf_block.ln_1.state_dict())
            block.norm_2.load_state_dict(hf_block.ln_2.state_dict())
            pairs = [
                (block.attention.qkv, hf_block.attn.c_attn),
                (block.attention.out, hf_block.attn.c_proj),
                (block.mlp_in, hf_block.mlp.c_fc),
                (block.mlp_out, hf_block.mlp.c_proj),
            ]
            for linear, conv in pairs:
                linear.weight.copy_(conv.weight.T)
                linear.bias.copy_(conv.bias)
        return model


class PrefixTunedModel(nn.Module):
    """A frozen `ReferenceDecoder` and one trainable prefix of per-layer keys and values."""

    def __init__(self, decoder: ReferenceDecoder, prefix_length: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.decoder = decoder.requires_grad_(False)
        config = decoder.config
        shape = (config.n_layers, 2, config.n_heads, prefix_length, config.d_model // config.n_heads)
        self.prefix_key_values = nn.Parameter(torch.randn(shape) * init_std)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.decoder(input_ids, self.prefix_key_values)
