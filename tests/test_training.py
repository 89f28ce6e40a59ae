"""Training touches only the prefix, gradient checkpointing (which PEFT 0.21.2 refuses for prefix
tuning) gives the same loss and gradients as a plain backward pass, and length-grouped batches
change only which rows share a batch."""

from __future__ import annotations

import pytest
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

import prefixtune.model as model_module
from prefixtune import PrefixConfig, PrefixModel
from prefixtune.data import pad_batch, padding_fraction, padding_fractions
from tiny import ARCHITECTURES, left_padded, tiny_model

PROMPTS = [[5, 9, 12, 30], [7, 8], [11, 40, 41, 42, 43, 44]]


def batch_with_labels() -> dict[str, torch.Tensor]:
    batch = left_padded(PROMPTS)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :-2] = -100  # loss only on the last two ("response") tokens
    return batch | {"labels": labels}


def prefixed_model(architecture: str, parameterization: str, seed: int = 0) -> PrefixModel:
    model = tiny_model(architecture)
    torch.manual_seed(seed)
    config = PrefixConfig(prefix_length=4, parameterization=parameterization, init_std=0.5, mlp_hidden_size=16)
    return PrefixModel(model, config).train()


@pytest.mark.parametrize("parameterization", ["kv", "mlp", "hidden"])
def test_optimizer_steps_change_only_the_prefix(parameterization):
    model = prefixed_model("llama", parameterization)
    base_before = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    prefix_before = {name: p.detach().clone() for name, p in model.prefixes.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch_with_labels()).loss
        loss.backward()
        assert all(p.grad is None for p in model.base_model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefixes.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.equal(p, base_before[name]) for name, p in model.base_model.named_parameters())
    assert all(not torch.equal(p, prefix_before[name]) for name, p in model.prefixes.named_parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.prefixes.parameters()}
    assert losses[-1] < losses[0]


def loss_and_gradients(model: PrefixModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch_with_labels()).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.prefixes.named_parameters()}


def count_attention_calls(model: PrefixModel) -> list[int]:
    calls = [0]
    module = model.kv_path.attention_modules[0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_a_training_forward_splits_the_prefix_by_layer_with_the_one_tensors_gradients(parameterization, monkeypatch):
    model = prefixed_model("llama", parameterization)
    seen = []
    original = model_module.split_by_layer
    monkeypatch.setattr(model_module, "split_by_layer", lambda kv: seen.append(kv.shape) or original(kv))
    loss, grads = loss_and_gradients(model)
    assert len(seen) == 1 and seen[0][1] == model.geometry.num_layers  # one unbind per forward, every layer
    with torch.no_grad():
        model(**batch_with_labels())
    assert len(seen) == 1  # no split without gradients (generate, serving)
    monkeypatch.setattr(model_module, "split_by_layer", lambda kv: kv)  # attention slices the one tensor
    expected_loss, expected_grads = loss_and_gradients(model)
    torch.testing.assert_close(loss, expected_loss, atol=0, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("when", ["before_wrapping", "after_wrapping"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(architecture, parameterization, when):
    plain = prefixed_model(architecture, parameterization)
    expected_loss, expected_grads = loss_and_gradients(plain)

    if when == "before_wrapping":
        base = tiny_model(architecture)
        base.gradient_checkpointing_enable()
        torch.manual_seed(0)
        config = PrefixConfig(prefix_length=4, parameterization=parameterization, init_std=0.5)
        checkpointed = PrefixModel(base, config).train()
    else:
        checkpointed = prefixed_model(architecture, parameterization)
        checkpointed.gradient_checkpointing_enable()
    calls = count_attention_calls(checkpointed)
    loss, grads = loss_and_gradients(checkpointed)

    # The kv_path (hidden) calls attention once more per forward; checkpointing replays the layer once.
    replays = calls[0] - (2 if parameterization == "hidden" else 1)
    assert replays == 1, f"gradient checkpointing did not replay the layer (attention calls: {calls[0]})"
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0)


def test_reentrant_checkpointing_is_refused_when_enabled_with_a_clear_message():
    model = prefixed_model("llama", "hidden")
    with pytest.raises(ValueError, match="use_reentrant=True.*non-reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())


@pytest.mark.parametrize("when", ["before_wrapping", "after_wrapping"])
def test_reentrant_checkpointing_enabled_on_the_base_is_refused_once_on_the_first_training_forward(when, monkeypatch):
    base = tiny_model("llama")
    if when == "before_wrapping":
        base.gradient_checkpointing_enable({"use_reentrant": True})
    model = PrefixModel(base, PrefixConfig(prefix_length=4, parameterization="hidden")).train()
    if when == "after_wrapping":
        base.gradient_checkpointing_enable({"use_reentrant": True})
    with torch.no_grad():
        model(**batch_with_labels())  # no gradients, nothing to refuse
    with pytest.raises(ValueError, match="Llama.* asks for reentrant.*use_reentrant=True"):
        model(**batch_with_labels())

    # Once non-reentrant, the check passes on the first training forward and is not repeated.
    base.gradient_checkpointing_enable({"use_reentrant": False})
    checked = []
    monkeypatch.setattr("prefixtune.model.reentrant_checkpointing", lambda module: checked.append(module) or False)
    for _ in range(3):
        model(**batch_with_labels()).loss.backward()
    assert len(checked) == len(list(base.modules()))


def per_example_losses(model: PrefixModel, rows: list[dict[str, list[int]]], order: list[int], batch_size: int):
    """Each example's mean token loss, computed inside the padded batches that `order` makes."""
    losses = {}
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = pad_batch([rows[i] for i in chosen], pad_token_id=0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none"
        ).view(labels.shape)
        for row, index in enumerate(chosen):
            losses[index] = token_losses[row][labels[row] != -100].mean()
    return losses


def test_length_grouping_changes_batch_composition_only():
    model = prefixed_model("llama", "kv").eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(48):
        ids = torch.randint(3, 100, (int(torch.randint(3, 30, (1,), generator=generator)),), generator=generator)
        rows.append({"input_ids": ids.tolist(), "labels": [-100] * (len(ids) - 2) + ids[-2:].tolist()})
    lengths = [len(row["input_ids"]) for row in rows]
    random_order = torch.randperm(len(rows), generator=generator).tolist()
    grouped_order = get_length_grouped_indices(lengths, 4, generator=generator)

    assert sorted(grouped_order) == sorted(random_order) == list(range(len(rows)))  # every row once
    batches = {tuple(sorted(grouped_order[i : i + 4])) for i in range(0, 48, 4)}
    assert batches != {tuple(sorted(random_order[i : i + 4])) for i in range(0, 48, 4)}  # different company
    assert padding_fraction(lengths, grouped_order, 4) < padding_fraction(lengths, random_order, 4) / 2
    fractions = padding_fractions(lengths, 4, seed=0)  # what `prefixtune train` reports
    assert 0 <= fractions["grouped"] < fractions["random"] < 1

    ungrouped = per_example_losses(model, rows, random_order, 4)
    grouped = per_example_losses(model, rows, grouped_order, 4)
    for index in range(len(rows)):
        torch.testing.assert_close(grouped[index], ungrouped[index], atol=1e-5, rtol=0)
