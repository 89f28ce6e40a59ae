"""Prefix dropout (``PrefixConfig.dropout > 0``): it drops prefix key/value entries in training mode
only. Training forwards differ from each other and from eval mode, gradients reach the prefix and a
few steps lower the loss; in eval mode the prefix acts unchanged and deterministically (as with
``dropout=0``)."""

from __future__ import annotations

import torch

from prefixtune import PrefixConfig, PrefixModel
from tiny import tiny_model

IDS = torch.tensor([[5, 9, 12, 30, 31], [7, 8, 11, 40, 41]])


def _pair(dropout: float) -> PrefixModel:
    torch.manual_seed(0)
    return PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=4, dropout=dropout, init_std=1.0))


def test_dropout_changes_training_forwards_only_and_eval_is_deterministic():
    model, plain = _pair(0.5), _pair(0.0)
    assert torch.equal(model.prefixes["default"].prefix_key_values, plain.prefixes["default"].prefix_key_values)
    with torch.no_grad():
        model.train()
        first, second = model(input_ids=IDS).logits, model(input_ids=IDS).logits
        model.eval()
        evaluated, again = model(input_ids=IDS).logits, model(input_ids=IDS).logits
        want = plain.eval()(input_ids=IDS).logits
    assert not torch.allclose(first, second)  # a fresh dropout mask per training forward
    assert not torch.allclose(first, evaluated)
    assert torch.equal(evaluated, again)  # eval: no randomness
    torch.testing.assert_close(evaluated, want, rtol=0, atol=0)  # eval: the prefix as it is


def test_dropout_masks_prefix_entries_and_scales_the_rest_in_training():
    model = _pair(0.5).train()
    key_values = model.prefix_inputs(None, 1)["prefix_key_values"][0]  # [layers, 2, kv_heads, P, head_dim]
    raw = model.prefixes["default"].prefix_key_values
    dropped = key_values == 0
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(key_values[~dropped], 2 * raw[~dropped])  # inverted dropout: kept ones scaled 1/(1-p)


def test_a_prefix_with_dropout_trains():
    model = _pair(0.2).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        gradient = model.prefixes["default"].prefix_key_values.grad
        assert gradient is not None and bool(gradient.abs().sum() > 0) and bool(torch.isfinite(gradient).all())
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(input_ids=IDS, labels=IDS).loss.item()
    assert final < losses[0] - 0.1, (losses[0], final)
