"""Mamba-1 mixers (Mamba, Falcon-Mamba, Jamba): a prefix gives each mixer an initial conv + SSM state, so an
`activations` prefix of text T acts exactly as T does: batched with a different prefix (or none) per row,
left-padded, in `generate`, through training, checkpointing and save/load. The replacement forward is the
mixer's own, bit for bit, from zero states; the states reach it on the attention mask of their own call."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from architecture_walk import build, relative_error
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError
from prefixtune.files import PrefixFileError
from prefixtune.injection.mamba1_states import CLASSES, mix
from test_hybrid_states import (
    ROW_PREFIXES,
    ROWS,
    TOLERANCE,
    assert_checkpointing_changes_nothing,
    assert_generate_equals_the_text_as_prompt,
    bare_logits,
    left_padded,
    step_gradients,
    text_ids,
    with_text_prefixes,
)
from tiny import tiny_tokenizer

MODEL_TYPES = ["mamba", "falcon_mamba", "jamba"]
# Jamba: two mixers around an attention layer (attention every 2nd layer from layer 1); the walk's sizes:
# intermediate 64 (expand 2 x hidden 32), kernel 4, SSM state 8.
LAYOUTS = {"jamba": {"num_hidden_layers": 3}}


def mamba(model_type: str, **overrides):
    """The walk's tiny model; Jamba's mixer output scaled up so its states show in the logits (beside
    attention and experts, at initializer_range 0.02, it hardly moves them)."""
    model = build(model_type, **LAYOUTS.get(model_type, {}) | overrides)
    with torch.no_grad():
        for module in mixers(model) if model_type == "jamba" else []:
            module.out_proj.weight.mul_(100)
    return model


def hybrid(model_type: str, parameterization: str = "kv") -> PrefixModel:
    """A tiny Mamba-1 model with an `activations` prefix per text."""
    return with_text_prefixes(mamba(model_type), parameterization)


def mixers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in CLASSES]


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
    with torch.no_grad():
        logits = model(**left_padded(ROWS), prefix=ROW_PREFIXES).logits
    for i, (name, row) in enumerate(zip(ROW_PREFIXES, ROWS, strict=True)):
        want = bare_logits(model, text_ids(name) + row)[-len(row) :]
        assert relative_error(logits[i, -len(row) :], want) <= TOLERANCE, (name, row)
    with torch.no_grad():
        inputs = model.prefix_inputs("long", 1)
        for key in ("prefix_conv_states", "prefix_recurrent_states"):
            inputs[key] = torch.zeros_like(inputs[key])
        without = model.base_model(input_ids=torch.tensor([ROWS[0]]), **inputs).logits[0]
    assert relative_error(without, logits[0]) > 10 * TOLERANCE


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_keeps_the_states_greedy_and_beam(model_type):
    assert_generate_equals_the_text_as_prompt(hybrid(model_type), max_new_tokens=5)


@pytest.mark.parametrize(("model_type", "parameterization"), [("mamba", "kv"), ("jamba", "hidden")])
def test_gradients_reach_every_state_and_checkpointing_changes_nothing(model_type, parameterization):
    results = step_gradients(lambda: mamba(model_type), parameterization)
    (_, grads), _ = results
    states = ["prefix_conv_states", "prefix_recurrent_states"] if parameterization == "kv" else ["prefix_state_hidden"]
    for name in states:  # every state layer gets a gradient
        assert (grads[name].flatten(1).abs().sum(-1) > 0).all(), name
    assert_checkpointing_changes_nothing(results)


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
        batch = left_padded(ROWS[:3])
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
    batch = left_padded(ROWS)
    with torch.no_grad():
        before = model(**batch, prefix=ROW_PREFIXES).logits
        model.compile_prefix("long")
        torch.testing.assert_close(model(**batch, prefix=ROW_PREFIXES).logits, before, atol=1e-5, rtol=0)
    model.save_prefix(tmp_path / "long", name="long")
    assert model.fingerprint["recurrent_state_shape"] == [64, 8]
    again = PrefixModel.from_pretrained(mamba(model_type), tmp_path / "long")
    for key in ("prefix_conv_states", "prefix_recurrent_states"):
        torch.testing.assert_close(again.prefixes["long"].state_dict()[key], model.prefixes["long"].state_dict()[key])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch, prefix="long").logits, model(**batch, prefix="long").logits)
    other = mamba(model_type, **{"mamba_d_state" if model_type == "jamba" else "state_size": 4})
    with pytest.raises(PrefixFileError, match=r"recurrent_state_shape: prefix was trained on \[64, 8\]"):
        PrefixModel.from_pretrained(other, tmp_path / "long")


def test_mlp_prefix_is_refused_and_after_unload_the_mixers_and_layers_run_their_own_forward():
    base = mamba("jamba")
    ids = torch.tensor([ROWS[0]])
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
