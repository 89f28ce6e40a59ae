"""The public API's contract: config validation, prefixes by name, unsupported models refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel

from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError
from tiny import tiny_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parameterization": "lora"}, "parameterization: expected one of"),
        ({"init": "zeros"}, "init: expected one of"),
        ({"init": "vocab"}, "needs a non-empty init_text"),
        ({"prefix_length": None}, "prefix_length=None needs a text init"),
        ({"prefix_length": 0}, "expected a positive int"),
        ({"dropout": 1.0}, "0 <= dropout < 1"),
        ({"init_std": 0}, "init_std: expected > 0"),
    ],
)
def test_invalid_config_is_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**kwargs)


def test_text_init_without_tokenizer_says_so():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PrefixModel(tiny_model("gpt2"), PrefixConfig(init="vocab", init_text="cheap food"))


def test_prefixes_by_name_switch_outputs(tokenizer):
    model = PrefixModel(tiny_model("gpt2"), PrefixConfig(prefix_length=3, init_std=1.0), name="a", tokenizer=tokenizer)
    model.add_prefix("b", PrefixConfig(prefix_length=5, init_std=1.0))
    assert model.prefix_names == ["a", "b"] and model.active_prefix == "b"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        active_b = model(input_ids=ids).logits
        model.set_active("a")
        active_a = model(input_ids=ids).logits
        torch.testing.assert_close(active_b, model(input_ids=ids, prefix="b").logits)
    assert not torch.allclose(active_a, active_b)
    with pytest.raises(ValueError, match="exists already"):
        model.add_prefix("a", PrefixConfig())
    with pytest.raises(KeyError, match="unknown prefix 'c'"):
        model.set_active("c")


def test_base_model_is_frozen_and_prefix_is_tiny():
    model = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=10))
    assert not any(p.requires_grad for p in model.base_model.parameters())
    # layers * 2 * kv_heads (GQA: 2, not the 4 query heads) * P * head_dim
    assert sum(p.numel() for p in model.trainable_parameters()) == 2 * 2 * 2 * 10 * 8


class HandWrittenAttentionModel(PreTrainedModel):
    """A model that computes attention itself, bypassing transformers' AttentionInterface."""

    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        return self.attention(x, x, x)[0]


def test_model_outside_the_attention_interface_is_refused_by_type():
    model = HandWrittenAttentionModel(LlamaConfig(hidden_size=16, num_attention_heads=2, vocab_size=20))
    with pytest.raises(UnsupportedModelError, match="HandWrittenAttentionModel .* does not route attention"):
        PrefixModel(model)
