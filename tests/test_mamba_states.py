"""Mamba-2 mixers (Mamba-2, Bamba, Granite 4.0 hybrid, Nemotron-H, Falcon-H1, Zamba 2): a prefix gives each mixer an
initial conv + SSM state, so an `activations` prefix of text T acts exactly as T does: batched with a different
prefix (or none) per row, left-padded, in `generate`, through training, checkpointing, save/load and the
micro-batch serving engine (Zamba 2's `hidden` prefix at its shared attention's wider input). The replacement
forward is the mixer's own, bit for bit, from zero states."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from architecture_walk import build, relative_error
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError
from prefixtune.files import PrefixFileError
from prefixtune.injection.mamba1_states import CLASSES as MAMBA1_CLASSES
from prefixtune.injection.mamba_states import CLASSES, mix
from prefixtune.serving import BASE_NAME, BatchingEngine, ContinuousEngine, PrefixStore, make_engine
from test_hybrid_states import (
    ROWS,
    assert_compile_and_reload_keep_the_states,
    assert_generate_equals_the_text_as_prompt,
    assert_gradients_reach_every_state_layer,
    assert_state_prefixes_equal_their_text,
    generated_alone,
    served,
    with_text_prefixes,
)
from tiny import tiny_tokenizer

MODEL_TYPES = ["mamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2"]
# Two mixers around an attention layer where the type allows it (walk configs: kernel 4, chunk 16, 4 heads x 16).
LAYOUTS = {
    "bamba": {"num_hidden_layers": 3, "attn_layer_indices": [1]},
    "granitemoehybrid": {"num_hidden_layers": 3, "layer_types": ["mamba", "attention", "mamba"]},
    # Zamba 2: two hybrid layers sharing one attention block (transformer + adapters), as its checkpoints do
    "zamba2": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]}
    | {"hybrid_layer_ids": [1, 3], "num_mem_blocks": 1},
    # Mamba-1 (tests/test_mamba1_states.py), Jamba: attention every 2nd layer from layer 1 (intermediate 64, kernel 4)
    "jamba": {"num_hidden_layers": 3},
}


def mamba(model_type: str, **overrides):
    """The walk's tiny model (Mamba-2 or Mamba-1); Falcon-H1's and Jamba's mixer output scaled up so their
    states show in the logits (beside attention, at initializer_range 0.02, they hardly move them)."""
    model = build(model_type, **LAYOUTS.get(model_type, {}) | overrides)
    with torch.no_grad():
        for module in mixers(model) if model_type in ("falcon_h1", "jamba") else []:
            module.out_proj.weight.mul_(100)
    return model


def hybrid(model_type: str, parameterization: str = "kv") -> PrefixModel:
    """A tiny Mamba-2 (or Mamba-1) model with an `activations` prefix per text."""
    return with_text_prefixes(mamba(model_type), parameterization)


def mixers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in (*CLASSES, "Zamba2MambaMixer", *MAMBA1_CLASSES)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mix_from_zero_states_is_the_mixers_own_forward_bit_for_bit(model_type):
    """Without a prefix (zero states) `mix` is transformers' own torch path exactly: its output, and
    what the cache holds after it (conv window, SSM state); under left padding equal at real tokens
    up to rounding (there pads keep dt at 0, which the model's own scan sums differently)."""
    model = mamba(model_type)
    module = mixers(model)[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, model.config.hidden_size)  # 40 tokens: three chunks of 16
    zeros = hidden.new_zeros(2, module.conv_dim, module.conv_kernel_size - 1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        own = type(module).forward(module, hidden, cache=cache, attention_mask=None)
        output, window, final = mix(module, hidden, None, zeros, None, True)
        assert torch.equal(output, own)
        assert torch.equal(window[..., -module.conv_kernel_size :], cache.get_conv_state(module.layer_idx))
        assert torch.equal(final, cache.get_recurrent_state(module.layer_idx))
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :7] = 0
        own = type(module).forward(module, hidden, attention_mask=mask)
        padded, _, _ = mix(module, hidden, mask, zeros, None, False)
    assert torch.equal(padded[0], own[0])
    assert relative_error(padded[1, 7:], own[1, 7:]) <= 1e-6


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_activations_state_prefix_equals_its_text_per_row_left_padded(model_type, parameterization):
    """Mixed prefixes per row (long: five scan chunks; short: fewer tokens than the conv state; none),
    left-padded by 0..5 tokens, each row equal to the bare model on T + x; without the states the long
    row is off."""
    assert_state_prefixes_equal_their_text(hybrid(model_type, parameterization))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_keeps_the_states_greedy_and_beam(model_type):
    assert_generate_equals_the_text_as_prompt(hybrid(model_type), max_new_tokens=5)


@pytest.mark.parametrize(
    ("model_type", "parameterization"),
    [("bamba", "kv"), ("falcon_h1", "hidden"), ("mamba2", "kv"), ("zamba2", "hidden")],
)
def test_gradients_reach_every_state_and_checkpointing_changes_nothing(model_type, parameterization):
    assert_gradients_reach_every_state_layer(lambda: mamba(model_type), parameterization)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compile_save_and_load_keep_the_states(tmp_path, model_type):
    """`hidden` compiles to direct states with the same logits; the file round-trips them and carries
    the state geometry in its fingerprint, so a base with another SSM state size is refused by name."""
    model = hybrid(model_type, "hidden")
    assert_compile_and_reload_keep_the_states(model, mamba(model_type), tmp_path / "long")
    assert model.fingerprint["recurrent_state_shape"] == [4, 16, 8]
    state_size = "state_size" if model_type == "mamba2" else "ssm_state_size" if model_type == "nemotron_h" else None
    other = mamba(model_type, **{state_size or "mamba_d_state": 4})
    with pytest.raises(PrefixFileError, match=r"recurrent_state_shape: prefix was trained on \[4, 16, 8\]"):
        PrefixModel.from_pretrained(other, tmp_path / "long")


def test_zamba2_hidden_prefix_holds_its_shared_attentions_wider_input_and_vocab_init_is_refused():
    """Zamba 2's shared attention reads the hidden states concatenated with the token embeddings
    (2 x 32 wide): its `hidden` prefix holds inputs of that width, in the fingerprint; a `vocab` init
    (32-wide word embeddings) cannot stand for them and is refused with the widths."""
    model = hybrid("zamba2", "hidden")
    assert model.geometry.attention_input_size == 64 and model.fingerprint["attention_input_size"] == 64
    assert model.prefixes["long"].prefix_hidden.shape[-1] == 64
    assert model.prefixes["long"].prefix_state_hidden.shape[-1] == 32  # the mixers read the hidden states
    bamba = hybrid("bamba")
    assert bamba.geometry.attention_input_size == 0 and "attention_input_size" not in bamba.fingerprint
    with pytest.raises(UnsupportedModelError, match="reads 64-wide inputs, the word embeddings are 32 wide"):
        model.add_prefix("v", PrefixConfig(prefix_length=3, parameterization="hidden", init="vocab", init_text="a b c"))
    assert "v" not in model.prefixes


def test_mamba2_hybrids_are_served_by_the_microbatch_engine_per_row_exactly(tmp_path):
    assert_served_per_row_exactly("bamba", tmp_path)


def assert_served_per_row_exactly(model_type: str, tmp_path) -> None:
    """`--engine auto` picks the micro-batch engine (the continuous one refuses: a paged KV cache
    only); rows with mixed prefixes, batched, equal `generate` of each row alone (also Mamba-1's)."""
    source = hybrid(model_type)
    for name in ("mid", "short"):
        source.save_prefix(tmp_path / "store" / name, name=name)
    model = PrefixModel(mamba(model_type), name=None, tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="not exact here: .*initial state"):
        ContinuousEngine(model, tiny_tokenizer())
    engine = make_engine(model, tiny_tokenizer(), engine="auto")
    assert isinstance(engine, BatchingEngine)
    jobs = [(row, name) for row in ROWS[:3] for name in (BASE_NAME, "mid", "short")]
    results = served(engine, PrefixStore(model, tmp_path / "store"), jobs, 4)
    assert engine.stats().batches < len(jobs)
    for (row, name), result in zip(jobs, results, strict=True):
        assert result.token_ids == generated_alone(source, row, name, 4), (row, name)
