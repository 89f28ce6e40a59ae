"""Every causal-LM type transformers registers is exact or refused, never silently different; and
the architectures that needed work (multi-head latent attention, RoBERTa positions, decoder-only
BART family, hybrids) behave as README's models section says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from architecture_walk import ROWS, TEXTS, build, check, table, walk
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError

README = Path(__file__).resolve().parents[1] / "README.md"
MLA = ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "minicpm3", "longcat_flash", "sarvam_mla"]
OWN_POSITIONS = ["roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm"]
DECODER_ONLY_SEQ2SEQ = ["bart", "mbart", "marian", "pegasus", "blenderbot-small"]
# Gated DeltaNet hybrids (tests/test_hybrid_states.py), Mamba-2 models (tests/test_mamba_states.py), Mamba-1
# models (tests/test_mamba1_states.py) and LFM2's short convolutions (tests/test_conv_states.py) take an
# initial-state prefix; other hybrids are refused.
STATE_PREFIX_HYBRID = [
    *("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini"),
    *("mamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2", "lfm2", "lfm2_moe"),
    *("mamba", "falcon_mamba", "jamba"),
]
# Layers of different key/value heads or head sizes, or reusing another layer's (tests/test_per_layer_geometry.py).
PER_LAYER_GEOMETRY = ["gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "mimo_v2_flash", "gemma3n_text"]
HYBRID = ["lfm3", "minimax", "zaya"]
# Types whose `hidden` prefix needs the layer's own arguments, as its decoder layer hands them: a
# rotary embedding per layer type (Gemma 3 style), the mask a sparse-attention indexer reads
# (DeepSeek-V3.2 style), attention scaling instead of rotary (Beam), positional arguments (CTRL).
OWN_LAYER_ARGUMENTS = [
    *("gemma3", "gemma3_text", "beam", "laguna", "mellum", "modernbert-decoder", "olmo3"),
    *("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4", "ctrl"),
]


@pytest.mark.slow  # builds and checks ~190 model types
def test_every_causal_lm_type_is_exact_or_refused_and_readme_shows_the_walk():
    outcomes = walk()
    wrong = [o for o in outcomes if o.outcome not in ("exact", "refused", "kv exact, hidden refused", "skipped")]
    assert not wrong, "\n".join(f"{o.model_type}: {o.outcome} {o.detail}" for o in wrong)
    by_type = {o.model_type: o for o in outcomes}
    for model_type in (
        MLA
        + OWN_POSITIONS
        + DECODER_ONLY_SEQ2SEQ
        + STATE_PREFIX_HYBRID
        + OWN_LAYER_ARGUMENTS
        + PER_LAYER_GEOMETRY
        + ["llama", "gpt2", "mistral"]
    ):  # exact: with a `kv` and with a `hidden` prefix
        assert by_type[model_type].outcome == "exact", by_type[model_type]
    for model_type in HYBRID + ["diffllama", "doge", "deepseek_v4", "recurrent_gemma", "reformer"]:
        assert by_type[model_type].outcome == "refused", by_type[model_type]
    for outcome in outcomes:  # a refusal names the model type (or its class) and a reason
        if "refused" in outcome.outcome:
            assert re.search(r"\w+(ForCausalLM|Model|ForConditionalGeneration|WithLMHead)\b", outcome.detail), outcome
    # README's table is for the transformers version it names; under another one, only the above holds.
    readme = set(README.read_text().splitlines())
    if table(outcomes).splitlines()[0] in readme:
        stale = [line for line in table(outcomes).splitlines() if line not in readme]
        assert not stale, f"README's walk table is stale (python tests/architecture_walk.py); now: {stale}"


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe_lite", "roberta", "bart", "olmo_hybrid"])
def test_hidden_prefix_with_activations_init_is_exact_too(model_type):
    """The `hidden` parameterization goes through each layer's own key/value path (MLA: the latent
    compression and decoupled rotary key), so it must reproduce the text as well."""
    assert check(model_type, parameterization="hidden").outcome == "exact"


@pytest.mark.parametrize("model_type", ["gemma3_text", "beam", "ctrl", "deepseek_v32", "lara_mini"])
def test_hidden_prefix_follows_each_layers_own_positions_and_arguments(model_type):
    """Gemma 3: sliding and global layers rotate keys with different rotary embeddings; Beam: layers
    without rotary; CTRL: keys from positional arguments; DeepSeek-V3.2: an indexer reading the mask;
    Lara Mini: global layers without positions. The `hidden` prefix calls each attention module with
    what its layer really hands it, so `activations` init equals the text there too (and the walk
    checks every type)."""
    outcome = check(model_type, parameterization="hidden")
    assert outcome.outcome == "exact", outcome


def test_hidden_prefix_records_the_layers_arguments_once_per_length_not_per_forward(tokenizer):
    model = build("gemma3_text")
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=3, parameterization="hidden"), tokenizer=tokenizer)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    batch = {"input_ids": torch.tensor([ROWS[0]])}
    for _ in range(3):
        prefixed(**batch).logits.sum().backward()
    assert len(forwards) == 3  # the base model's own forwards only: recorded when the prefix was added
    assert list(prefixed.kv_path.recorded) == [(3, torch.float32, model.device)]
    prefixed.train()
    model.model.layers[0].eval()  # recording runs the model in eval mode, then leaves every module as it was
    modes = [module.training for module in model.modules()]
    prefixed.add_prefix("longer", PrefixConfig(prefix_length=5, parameterization="hidden"))
    assert len(forwards) == 4 and len(prefixed.kv_path.recorded) == 2
    assert [module.training for module in model.modules()] == modes


def test_hidden_prefix_on_a_layer_that_cannot_be_called_again_is_refused_when_added(tokenizer):
    """A layer whose key/value path works only inside its model's own forward (here one that says so
    with a TypeError) cannot be followed: `add_prefix` refuses a `hidden` prefix naming the type and
    the layer, rather than a raw error at the first forward; `kv` prefixes still work there."""
    model = build("llama")
    prefixed = PrefixModel(model, None, name=None, tokenizer=tokenizer)
    attention = prefixed.kv_path.attention_modules[1]
    own_forward, inside = attention.forward, []
    model.model.register_forward_pre_hook(lambda *_: inside.append(1))
    model.model.register_forward_hook(lambda *_: inside.clear())

    def only_inside_the_model(*args, **kwargs):
        if not inside:
            raise TypeError("forward() missing 1 required positional argument: 'layer_state'")
        return own_forward(*args, **kwargs)

    attention.forward = only_inside_the_model
    with pytest.raises(UnsupportedModelError, match=r"model_type='llama'.*LlamaAttention.*`hidden`.*layer_state"):
        prefixed.add_prefix("h", PrefixConfig(prefix_length=2, parameterization="hidden"))
    assert prefixed.prefix_names == []
    prefixed.add_prefix("kv", PrefixConfig(prefix_length=2))
    with torch.no_grad():
        assert torch.isfinite(prefixed(input_ids=torch.tensor([ROWS[0]])).logits).all()


def test_mla_geometry_keeps_key_and_value_head_sizes_apart(tokenizer):
    model = build("deepseek_v3")
    config = PrefixConfig(prefix_length=None, init="activations", init_text=TEXTS[1])
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    geometry = prefixed.geometry
    # tiny config: keys 8 (nope) + 8 (rope) = 16 wide, values 8
    assert (geometry.key_head_dim, geometry.value_head_dim, geometry.head_dim) == (16, 8, 16)
    key_values = prefixed.prefixes["default"].prefix_key_values  # [layers, 2, kv_heads, P, head_dim]
    assert key_values.shape == (geometry.num_layers, 2, geometry.kv_heads, 4, 16)
    assert key_values[:, 1, ..., 8:].abs().max() == 0  # values are stored zero-padded
    assert key_values[:, 1, ..., :8].abs().max() > 0
    assert prefixed.fingerprint["key_head_dim"] == 16 and prefixed.fingerprint["value_head_dim"] == 8


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4"])
def test_mla_mlp_prefix_trains_compiles_and_round_trips(tmp_path, tokenizer, model_type):
    model = build(model_type)
    config = PrefixConfig(prefix_length=3, parameterization="mlp", mlp_hidden_size=16, init_std=0.5)
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    batch = {"input_ids": torch.tensor([ROWS[2]])}
    loss = prefixed(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefixed.trainable_parameters())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        before = prefixed(**batch).logits
        values = prefixed.prefix_inputs(None, 1)["prefix_key_values"][:, :, 1]  # [B, layers, kv_heads, P, head_dim]
        assert values[..., 8:].abs().max() == 0 and values[..., :8].abs().max() > 0  # padded with zeros
        prefixed.compile_prefix()
        torch.testing.assert_close(prefixed(**batch).logits, before, atol=1e-5, rtol=0)
        prefixed.save_prefix(tmp_path / "mla")
        again = PrefixModel.from_pretrained(model, tmp_path / "mla")
        torch.testing.assert_close(again(**batch).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["minimax", "zaya"])
def test_hybrids_without_state_prefixes_are_refused_with_type_and_reason(model_type):
    """Other linear-attention layers have no initial-state prefix (Gated DeltaNet, Mamba-1/2 and
    short-convolution hybrids do: tests/test_hybrid_states.py and its siblings), so a key/value
    prefix alone would not act like its text."""
    with pytest.raises(UnsupportedModelError, match=rf"model_type='{model_type}'.*state.*no initial-state prefix"):
        PrefixModel(build(model_type), PrefixConfig(prefix_length=2))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32", "gemma3_text", "roberta"])
def test_checkpointing_on_and_off_give_the_same_loss_and_gradients(model_type):
    def loss_and_gradients(checkpointing: bool):
        model = build(model_type).train()
        torch.manual_seed(0)
        prefixed = PrefixModel(model, PrefixConfig(prefix_length=3, parameterization="hidden", init_std=0.5)).train()
        if checkpointing:
            prefixed.gradient_checkpointing_enable()
        batch = {"input_ids": torch.tensor([ROWS[0], ROWS[0][::-1]])}
        loss = prefixed(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.detach(), prefixed.prefixes["default"].prefix_hidden.grad

    plain, checkpointed = loss_and_gradients(False), loss_and_gradients(True)
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])
    assert plain[1].abs().sum() > 0
