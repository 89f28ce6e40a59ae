"""Mamba-2 mixers (Mamba-2, Bamba, Granite 4.0 hybrid, Nemotron-H, Falcon-H1, Zamba 2): a prefix gives each mixer an
initial conv + SSM state, so an `activations` prefix of text T acts exactly as T does: batched with a different
prefix (or none) per row, left-padded, in `generate`, through training, checkpointing, save/load and the
micro-batch serving engine. The replacement forward is the mixer's own, bit for bit, from zero states."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from architecture_walk import build, relative_error
from prefixtune import PrefixModel, UnsupportedModelError
from prefixtune.files import PrefixFileError
from prefixtune.injection.mamba_states import CLASSES, mix
from prefixtune.serving import BASE_NAME, BatchingEngine, ContinuousEngine, PrefixStore, Request, make_engine
from test_hybrid_states import (
    ROW_PREFIXES,
    ROWS,
    TOLERANCE,
    assert_checkpointing_changes_nothing,
    assert_generate_equals_the_text_as_prompt,
    bare_logits,
    generated_alone,
    left_padded,
    step_gradients,
    text_ids,
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
}
# Zamba 2's shared attention reads hidden states and embeddings concatenated: its `hidden` prefix is refused.
HIDDEN_TYPES = [model_type for model_type in MODEL_TYPES if model_type != "zamba2"]


def mamba(model_type: str, **overrides):
    """The walk's tiny model; Falcon-H1's mixer output scaled up so its states show in the logits (beside
    attention in every layer, at initializer_range 0.02, it hardly moves them)."""
    model = build(model_type, **LAYOUTS.get(model_type, {}) | overrides)
    with torch.no_grad():
        for module in mixers(model) if model_type == "falcon_h1" else []:
            module.out_proj.weight.mul_(100)
    return model


def hybrid(model_type: str, parameterization: str = "kv") -> PrefixModel:
    """A tiny Mamba-2 model with an `activations` prefix per text."""
    return with_text_prefixes(mamba(model_type), parameterization)


def mixers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in (*CLASSES, "Zamba2MambaMixer")]


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
    if parameterization == "hidden" and model_type not in HIDDEN_TYPES:
        with pytest.raises(UnsupportedModelError, match="Zamba2Attention reads 64-wide inputs.*use 'kv'"):
            hybrid(model_type, parameterization)
        return
    model = hybrid(model_type, parameterization)
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


@pytest.mark.parametrize(
    ("model_type", "parameterization"), [("bamba", "kv"), ("falcon_h1", "hidden"), ("mamba2", "kv")]
)
def test_gradients_reach_every_state_and_checkpointing_changes_nothing(model_type, parameterization):
    results = step_gradients(lambda: mamba(model_type), parameterization)
    (_, grads), _ = results
    states = ["prefix_conv_states", "prefix_recurrent_states"] if parameterization == "kv" else ["prefix_state_hidden"]
    for name in states:  # every state layer gets a gradient
        assert (grads[name].flatten(1).abs().sum(-1) > 0).all(), name
    assert_checkpointing_changes_nothing(results)


@pytest.mark.parametrize("model_type", HIDDEN_TYPES)
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
    assert model.fingerprint["recurrent_state_shape"] == [4, 16, 8]
    again = PrefixModel.from_pretrained(mamba(model_type), tmp_path / "long")
    for key in ("prefix_conv_states", "prefix_recurrent_states"):
        torch.testing.assert_close(again.prefixes["long"].state_dict()[key], model.prefixes["long"].state_dict()[key])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch, prefix="long").logits, model(**batch, prefix="long").logits)
    state_size = "state_size" if model_type == "mamba2" else "ssm_state_size" if model_type == "nemotron_h" else None
    other = mamba(model_type, **{state_size or "mamba_d_state": 4})
    with pytest.raises(PrefixFileError, match=r"recurrent_state_shape: prefix was trained on \[4, 16, 8\]"):
        PrefixModel.from_pretrained(other, tmp_path / "long")


def test_mamba2_hybrids_are_served_by_the_microbatch_engine_per_row_exactly(tmp_path):
    source = hybrid("bamba")
    for name in ("mid", "short"):
        source.save_prefix(tmp_path / "store" / name, name=name)
    model = PrefixModel(mamba("bamba"), name=None, tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="not exact here: .*initial state"):  # a paged KV cache only
        ContinuousEngine(model, tiny_tokenizer())
    store = PrefixStore(model, tmp_path / "store")
    engine = make_engine(model, tiny_tokenizer(), engine="auto")
    assert isinstance(engine, BatchingEngine)
    jobs = [(row, name) for row in ROWS[:3] for name in (BASE_NAME, "mid", "short")]
    engine.wait_seconds = 0.2
    engine.start()
    try:
        requests = [Request(r, n, 4, prefix_inputs=None if n == BASE_NAME else store.snapshot(n)) for r, n in jobs]
        results = [future.result(timeout=120) for future in [engine.submit(request) for request in requests]]
    finally:
        engine.close()
    assert engine.stats().batches < len(jobs)
    for (row, name), result in zip(jobs, results, strict=True):
        want = generated_alone(source, row, name, 4)
        assert result.token_ids == want, (row, name)
