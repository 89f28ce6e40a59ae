"""Mamba-1 mixers (Mamba, Falcon-Mamba, Jamba): a prefix gives each mixer an initial conv + SSM state, so an
`activations` prefix of text T acts exactly as T does: batched with a different prefix (or none) per row,
left-padded, in `generate`, through training, checkpointing and save/load. The replacement forward is the
mixer's own, bit for bit, from zero states; the states reach it on the attention mask of their own call."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import test_hybrid_states as checks
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError
from prefixtune.files import PrefixFileError
from prefixtune.injection.mamba1_states import CLASSES, mix
from test_mamba_states import assert_served_per_row_exactly, hybrid, mamba, mixers
from tiny import left_padded, tiny_tokenizer

MODEL_TYPES = ["mamba", "falcon_mamba", "jamba"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mix_from_zero_states_is_the_mixers_own_forward_bit_for_bit(model_type):
    """Without a prefix (zero states) `mix` is transformers' own torch path exactly: its output with
    and without a cache, what the cache holds after it (conv window, SSM state), and the real tokens
    of a left-padded row (there pads keep dt at 0; a zero state stays zero either way)."""
    model = mamba(model_type)
    module = mixers(model)[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, model.config.hidden_size)
    zeros = hidden.new_zeros(2, module.intermediate_size, module.conv_kernel_size - 1)
    cache = DynamicCache(config=model.config)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        own = type(module).forward(module, hidden, cache=cache, attention_mask=None)
        output, window, final = mix(module, hidden, None, zeros, None, True)
        assert torch.equal(output, own) and torch.equal(output, type(module).forward(module, hidden))
        assert torch.equal(window[..., -module.conv_kernel_size :], cache.get_conv_state(module.layer_idx))
        assert torch.equal(final, cache.get_recurrent_state(module.layer_idx))
        own = type(module).forward(module, hidden, attention_mask=mask)
        padded, _, _ = mix(module, hidden, mask, zeros, None, False)
    assert torch.equal(padded[0], own[0]) and torch.equal(padded[1, 4:], own[1, 4:])


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_activations_state_prefix_equals_its_text_per_row_left_padded(model_type, parameterization):
    """Mixed prefixes per row (long, short: fewer tokens than the conv state, none), left-padded by
    0..5 tokens, each row equal to the bare model on T + x; without the states the long row is off."""
    model = hybrid(model_type, parameterization)
    assert model.geometry.conv_state_shape == (64, 3) and model.geometry.recurrent_state_shape == (64, 8)
    checks.assert_state_prefixes_equal_their_text(model)


@pytest.mark.slow  # the models' own scan loops over tokens in Python: 5-30 s per type (shared cores)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_keeps_the_states_greedy_and_beam(model_type):
    checks.assert_generate_equals_the_text_as_prompt(hybrid(model_type), max_new_tokens=5)


@pytest.mark.parametrize(("model_type", "parameterization"), [("mamba", "kv"), ("jamba", "hidden")])
def test_gradients_reach_every_state_and_checkpointing_changes_nothing(model_type, parameterization):
    checks.assert_gradients_reach_every_state_layer(lambda: mamba(model_type), parameterization)


def test_a_checkpointed_replay_uses_the_states_of_its_own_call_after_another_forward():
    """The states travel on the mask of their call, which checkpointing replays with: a forward with
    another prefix between a checkpointed forward and its backward changes none of its gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PrefixModel(mamba("mamba"), PrefixConfig(prefix_length=4, init_std=0.5), tokenizer=tiny_tokenizer())
        model.add_prefix("other", PrefixConfig(prefix_length=4, init_std=0.5))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        batch = left_padded(checks.ROWS[:3])
        loss = model(**batch, labels=batch["input_ids"], prefix="default").loss
        model(**batch, prefix="other").logits.sum()  # its graph is dropped unused
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.prefixes["default"].named_parameters() if p.numel()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compile_save_and_load_keep_the_states(tmp_path, model_type):
    """`hidden` compiles to direct states with the same logits; the file round-trips them and carries
    the state geometry in its fingerprint, so a base with another SSM state size is refused by name."""
    model = hybrid(model_type, "hidden")
    checks.assert_compile_and_reload_keep_the_states(model, mamba(model_type), tmp_path / "long")
    assert model.fingerprint["recurrent_state_shape"] == [64, 8]
    other = mamba(model_type, **{"mamba_d_state" if model_type == "jamba" else "state_size": 4})
    with pytest.raises(PrefixFileError, match=r"recurrent_state_shape: prefix was trained on \[64, 8\]"):
        PrefixModel.from_pretrained(other, tmp_path / "long")


def test_mlp_prefix_is_refused_and_after_unload_the_mixers_and_layers_run_their_own_forward():
    base = mamba("jamba")
    ids = torch.tensor([checks.ROWS[0]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = PrefixModel(base, PrefixConfig(prefix_length=2), tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="mlp parameterization maps to keys/values only"):
        model.add_prefix("m", PrefixConfig(prefix_length=2, parameterization="mlp"))
    with torch.no_grad(), model.disable_prefix():
        assert torch.equal(model(input_ids=ids).logits, want)
    base = model.unload()
    layers = [m for m in base.modules() if type(m).__name__ in ("JambaModel", "JambaMambaDecoderLayer", *CLASSES)]
    assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__ for m in layers)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, want)


@pytest.mark.slow  # greedy generation through the models' own token loop, nine requests
def test_mamba1_models_are_served_by_the_microbatch_engine_per_row_exactly(tmp_path):
    assert_served_per_row_exactly("jamba", tmp_path)
