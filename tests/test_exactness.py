"""A prefix made of the frozen model's own activations on a text T must act exactly like T itself:
logits on x with the prefix equal the bare model's logits on T+x at x's positions. This pins down
the injection (keys/values, mask, positions, GQA) on every supported architecture at once."""

from __future__ import annotations

import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel
from tiny import ARCHITECTURES, left_padded, tiny_model

INIT_TEXT = "the restaurant near the river serves cheap french food"
ROWS = [[5, 9, 12, 30], [7, 8], [11, 40, 41, 42, 43, 44], [20]]


def bare_logits_after_text(model, text_ids: list[int], row: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([text_ids + row])).logits[0, len(text_ids) :]


def prefixed_logits_per_row(prefixed: PrefixModel, rows: list[list[int]], prefix=None) -> list[torch.Tensor]:
    batch = left_padded(rows)
    with torch.no_grad():
        logits = prefixed(**batch, prefix=prefix).logits
    return [logits[i, logits.shape[1] - len(row) :] for i, row in enumerate(rows)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_activation_prefix_equals_text_context_in_left_padded_batches(
    architecture, implementation, parameterization, tokenizer
):
    model = tiny_model(architecture, implementation)
    text_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    expected = [bare_logits_after_text(model, text_ids, row) for row in ROWS]

    config = PrefixConfig(
        prefix_length=None, parameterization=parameterization, init="activations", init_text=INIT_TEXT
    )
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    assert prefixed.prefixes["default"].length == len(text_ids)

    for got, want in zip(prefixed_logits_per_row(prefixed, ROWS), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The comparison is not vacuous: without the prefix the logits are far from T+x.
    bare = [model(input_ids=torch.tensor([row])).logits[0] for row in ROWS]
    assert max((b - e).abs().max() for b, e in zip(bare, expected, strict=True)) > 1e-2


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_mlp_prefix_fitted_to_activations_gets_close_to_text_context(architecture, tokenizer):
    model = tiny_model(architecture)
    text_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    config = PrefixConfig(
        prefix_length=None, parameterization="mlp", init="activations", init_text=INIT_TEXT, mlp_hidden_size=64
    )
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    report = prefixed.prefixes["default"].fit_report
    assert report is not None and report["relative_error"] < 0.1

    for row in ROWS:
        want = bare_logits_after_text(model, text_ids, row)
        with torch.no_grad():
            got = prefixed(input_ids=torch.tensor([row])).logits[0]
            bare = model(input_ids=torch.tensor([row])).logits[0]
        assert (got - want).abs().max() < 0.25 * (bare - want).abs().max()


def test_vocab_init_sends_embeddings_through_each_layers_key_value_path(tokenizer):
    """`kv` vocab init precomputes what a `hidden` prefix of the same embeddings computes live."""
    model = tiny_model("llama")
    prefixed = PrefixModel(
        model,
        PrefixConfig(prefix_length=7, parameterization="kv", init="vocab", init_text="cheap french food"),
        name="kv",
        tokenizer=tokenizer,
    )
    prefixed.add_prefix(
        "hidden", PrefixConfig(prefix_length=7, parameterization="hidden", init="vocab", init_text="cheap french food")
    )
    logits = {name: prefixed(input_ids=torch.tensor([ROWS[0]]), prefix=name).logits for name in ("kv", "hidden")}
    torch.testing.assert_close(logits["kv"], logits["hidden"], atol=1e-5, rtol=0)
    # "repeated or cut to P": 3 tokens repeated to 7 positions.
    hidden = prefixed.prefixes["hidden"].prefix_hidden[0]
    torch.testing.assert_close(hidden[3:6], hidden[0:3])


def test_reference_decoder_with_gpt2_weights_agrees_with_injection(tokenizer):
    from prefixtune.reference import PrefixTunedModel, ReferenceDecoder

    model = tiny_model("gpt2")
    torch.manual_seed(1)
    reference = PrefixTunedModel(ReferenceDecoder.from_gpt2(model), prefix_length=6, init_std=0.5)
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=6))
    with torch.no_grad():
        prefixed.prefixes["default"].prefix_key_values.copy_(reference.prefix_key_values)
        ids = torch.tensor([ROWS[2]])
        torch.testing.assert_close(prefixed(input_ids=ids).logits, reference(ids), atol=1e-5, rtol=0)
        # and without a prefix, the two decoders are the same GPT-2
        torch.testing.assert_close(model(input_ids=ids).logits, reference.decoder(ids), atol=1e-5, rtol=0)
