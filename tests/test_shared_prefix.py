"""Rows that share one prefix attend to it without a copy per row (`injection.shared_prefix`): the
same logits and greedy tokens as the concatenating path, which rows of equal but separate prefixes
take; training forwards and mixed batches keep the concatenating path."""

from __future__ import annotations

import pytest
import torch

import prefixtune.injection.attention as attention
import prefixtune.injection.shared_prefix as shared_prefix
from prefixtune import PrefixConfig, PrefixModel
from tiny import ARCHITECTURES, SPECIAL, left_padded, tiny_model

PROMPTS = [[5, 9, 12, 30], [7, 8], [11, 40, 41, 42, 43, 44]]


def one_and_twin(architecture: str, parameterization: str = "kv") -> PrefixModel:
    """Prefix "one" and "twin", a separate prefix with the same weights (its rows are stacked, not shared)."""
    config = PrefixConfig(prefix_length=6, parameterization=parameterization, init_std=1.0)
    model = PrefixModel(tiny_model(architecture), config, name="one")
    model.add_prefix("twin", config).load_state_dict(model.prefixes["one"].state_dict())
    return model


def count_shared_calls(monkeypatch) -> list[int]:
    """A list that grows by one for each layer call that takes the shared-prefix path."""
    calls: list[int] = []
    original = attention.shared_prefix_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "shared_prefix_attention", counted)
    return calls


@pytest.fixture
def shared_calls(monkeypatch) -> list[int]:
    """`count_shared_calls`, with the path taken at any prefix length (by default only a prefix of
    `MIN_SLOTS_PER_TEXT_KEY` slots per text key takes it, where it pays)."""
    monkeypatch.setattr(shared_prefix, "MIN_SLOTS_PER_TEXT_KEY", 0)
    return count_shared_calls(monkeypatch)


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rows_sharing_one_prefix_take_the_shared_path_with_the_concatenating_paths_logits(
    architecture, parameterization, shared_calls
):
    model = one_and_twin(architecture, parameterization)
    batch = left_padded(PROMPTS)
    with torch.no_grad():
        separate = model(**batch, prefix=["one", "twin", "one"]).logits  # rows stacked: concatenating path
        assert not shared_calls
        shared = model(**batch, prefix="one").logits
    assert shared_calls, "one prefix for every row should take the shared path"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(shared[valid], separate[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_generate_with_one_shared_prefix_gives_the_concatenating_paths_tokens(architecture, shared_calls):
    model = one_and_twin(architecture)
    batch = left_padded(PROMPTS)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": SPECIAL["pad"], "eos_token_id": None}
    separate = model.generate(**batch, prefix=["one", "twin", "twin"], **options)
    assert not shared_calls
    shared = model.generate(**batch, prefix="one", **options)
    assert shared_calls
    assert shared.tolist() == separate.tolist()


@pytest.mark.parametrize("expanding", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}])
@pytest.mark.parametrize("rows", [PROMPTS, PROMPTS[:1]], ids=["three-rows", "one-row"])
def test_beam_search_keeps_one_shared_prefix_one_row_in_memory(expanding, rows, shared_calls, monkeypatch):
    """`generate` repeats its inputs per beam and returned sequence (a copy); a prefix shared by the
    batch stays one row in memory (stride 0), so it takes the shared path, with the tokens of the
    concatenating path on the same rows."""
    model = one_and_twin("llama")
    batch = left_padded(rows)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": SPECIAL["pad"], "eos_token_id": None}
    strides = []
    gate = shared_prefix.one_shared_prefix
    monkeypatch.setattr(
        attention, "one_shared_prefix", lambda m, kv, *a: strides.append(kv.stride(0)) or gate(m, kv, *a)
    )
    shared = model.generate(**batch, prefix="one", **options, **expanding)
    assert shared_calls and set(strides) == {0}
    monkeypatch.setattr(attention, "one_shared_prefix", lambda *a: None)  # the concatenating path
    assert shared.tolist() == model.generate(**batch, prefix="one", **options, **expanding).tolist()


def test_a_training_forward_keeps_the_concatenating_path_and_its_gradients(shared_calls):
    model = one_and_twin("llama")
    model.train()
    loss = model(**left_padded(PROMPTS), prefix="one").logits.square().mean()
    loss.backward()
    assert not shared_calls
    assert model.prefixes["one"].prefix_key_values.grad.abs().sum() > 0


def test_by_default_only_a_prefix_much_longer_than_the_text_takes_the_shared_path(monkeypatch):
    calls = count_shared_calls(monkeypatch)
    batch = left_padded(PROMPTS)  # 6 text keys at most
    with torch.no_grad():
        one_and_twin("llama")(**batch, prefix="one")  # 6 slots: concatenated
        assert not calls
        long = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=6 * 16, init_std=1.0), name="long")
        long(**batch, prefix="long")
    assert calls
