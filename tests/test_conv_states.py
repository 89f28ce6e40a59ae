"""Short-convolution hybrids (Liquid LFM2, LFM2-MoE): a prefix gives each convolution layer its initial conv
state, so an `activations` prefix of text T acts exactly as T does: per row, left-padded, in `generate`, through
training, checkpointing and save/load. The replacement forward is the layer's own, bit for bit, without a prefix."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from architecture_walk import build
from prefixtune import PrefixModel
from prefixtune.files import PrefixFileError
from prefixtune.injection.conv_states import mix
from test_hybrid_states import (
    assert_compile_and_reload_keep_the_states,
    assert_generate_equals_the_text_as_prompt,
    assert_gradients_reach_every_state_layer,
    assert_state_prefixes_equal_their_text,
    with_text_prefixes,
)

MODEL_TYPES = ["lfm2", "lfm2_moe"]
# Two convolution layers around attention (kernel conv_L_cache = 3: conv state of 2 columns).
LAYOUT = {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"]}


def conv_model(model_type: str, **overrides):
    """The walk's tiny model with two convolution layers; their input projections scaled up, so that
    ``C * conv(B * x)`` (a product of three projections at initializer_range 0.02) shows in the logits."""
    overrides = LAYOUT | ({"num_dense_layers": 3} if model_type == "lfm2_moe" else {}) | overrides
    model = build(model_type, **overrides)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("ShortConv"):
                module.in_proj.weight.mul_(10)
    return model


def hybrid(model_type: str, parameterization: str = "kv") -> PrefixModel:
    return with_text_prefixes(conv_model(model_type), parameterization)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mix_without_a_conv_state_is_the_layers_own_forward_bit_for_bit(model_type):
    """Output and the cache's conv state as transformers' own forward leaves them (also left-padded)."""
    model = conv_model(model_type)
    module = next(m for m in model.modules() if type(m).__name__.endswith("ShortConv"))
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, model.config.hidden_size)
    zeros = hidden.new_zeros(2, model.config.hidden_size, module.conv_kernel_size - 1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        own = type(module).forward(module, hidden, cache=cache, attention_mask=mask)
        output, window, final = mix(module, hidden, mask, zeros, None, True)
    assert torch.equal(output, own) and final is None
    assert torch.equal(window[..., -module.conv_kernel_size :], cache.get_conv_state(module.layer_idx))


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_activations_conv_state_prefix_equals_its_text_per_row_left_padded(model_type, parameterization):
    model = hybrid(model_type, parameterization)
    assert model.geometry.conv_state_shape == (32, 2) and model.geometry.recurrent_state_shape == (0,)
    assert_state_prefixes_equal_their_text(model)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_keeps_the_conv_states_greedy_and_beam(model_type):
    assert_generate_equals_the_text_as_prompt(hybrid(model_type), max_new_tokens=5)


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_gradients_reach_every_conv_state_and_checkpointing_changes_nothing(parameterization):
    assert_gradients_reach_every_state_layer(lambda: conv_model("lfm2"), parameterization, ("prefix_conv_states",))


def test_save_and_load_keep_the_conv_states_and_refuse_another_kernel(tmp_path):
    assert_compile_and_reload_keep_the_states(hybrid("lfm2", "hidden"), conv_model("lfm2"), tmp_path / "long")
    with pytest.raises(PrefixFileError, match=r"conv_state_shape: prefix was trained on \[32, 2\]"):
        PrefixModel.from_pretrained(conv_model("lfm2", conv_L_cache=4), tmp_path / "long")
