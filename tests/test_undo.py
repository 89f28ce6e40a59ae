"""Undo: `disable_prefix()` runs the bare model through the same object, and `unload()` gives the
base model back exactly as it was (torchtune's `disable_adapter`, PEFT's `unload`)."""

from __future__ import annotations

import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.injection import TAGS
from tiny import SPECIAL, left_padded, tiny_model, tiny_seq2seq

ROWS = [[5, 9, 12, 30, 7], [8, 13]]
TARGET = torch.tensor([[2, 11, 40], [2, 12, 41]])
GENERATE = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "pad_token_id": SPECIAL["pad"]}
MODELS = [("llama", "sdpa"), ("gpt2", "eager"), ("bart", "sdpa"), ("t5", "eager")]


def fresh(architecture: str, attn_implementation: str):
    if architecture in ("bart", "t5"):
        return tiny_seq2seq(architecture, attn_implementation)
    return tiny_model(architecture, attn_implementation)


def inputs(model) -> dict[str, torch.Tensor]:
    batch = left_padded(ROWS)
    return batch | {"decoder_input_ids": TARGET} if model.base_model.config.is_encoder_decoder else batch


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model), **kwargs).logits


def generated(model, **kwargs) -> torch.Tensor:
    batch = {key: value for key, value in inputs(model).items() if key != "decoder_input_ids"}
    return model.generate(**batch, **GENERATE, num_beams=2, **kwargs)


def wrap(base) -> PrefixModel:
    return PrefixModel(base, PrefixConfig(prefix_length=3, init_std=1.0))


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "attn_implementation"), MODELS)
def test_disable_prefix_runs_the_bare_model_through_the_same_object(architecture, attn_implementation):
    bare = fresh(architecture, attn_implementation)
    model = wrap(fresh(architecture, attn_implementation))
    prefixed_logits, prefixed_tokens = logits(model), generated(model)
    assert (prefixed_logits - logits(bare)).abs().max() > 1e-3

    with model.disable_prefix():
        torch.testing.assert_close(logits(model), logits(bare), atol=1e-6, rtol=0)
        assert generated(model).tolist() == generated(bare).tolist()
        with model.disable_prefix():  # nested blocks keep the bare model until the outer one ends
            torch.testing.assert_close(logits(model), logits(bare), atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(model), logits(bare), atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="prefix='default' inside disable_prefix"):
            model(**inputs(model), prefix="default")

    torch.testing.assert_close(logits(model), prefixed_logits, atol=0, rtol=0)
    assert generated(model).tolist() == prefixed_tokens.tolist()


def test_disable_prefix_ends_even_when_the_block_raises():
    model = wrap(tiny_model("llama"))
    prefixed = logits(model)
    with pytest.raises(RuntimeError, match="inside"), model.disable_prefix():
        raise RuntimeError("inside")
    torch.testing.assert_close(logits(model), prefixed, atol=0, rtol=0)


def hooks(model) -> int:
    return sum(
        len(hook_dict) for module in model.modules() for hook_dict in (module._forward_pre_hooks, module._forward_hooks)
    )


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "attn_implementation"), MODELS)
def test_unload_returns_the_base_model_as_it_was(architecture, attn_implementation):
    reference = fresh(architecture, attn_implementation)
    base = fresh(architecture, attn_implementation)
    model = wrap(base)
    assert base.config._attn_implementation == f"prefixtune_{attn_implementation}"
    # the mask-cache hook, plus position hooks: T5 (relative position bias) has none
    position_hooks = {"llama": 1, "gpt2": 1, "bart": 3, "t5": 0}[architecture]
    assert hooks(base) == len(base._prefixtune_injected.hooks) == 1 + position_hooks

    unloaded = model.unload()
    assert unloaded is base
    assert base.config._attn_implementation == attn_implementation
    assert hooks(base) == hooks(reference) == 0
    assert not [(name, tag) for name, module in base.named_modules() for tag in TAGS if hasattr(module, tag)]
    overrides = ("_prefixtune_injected", "_validate_model_kwargs", "_expand_inputs_for_generation")
    assert not [name for name in overrides if name in base.__dict__]
    assert all(p.requires_grad for p in base.parameters())  # as from_config made them
    torch.testing.assert_close(logits(base), logits(reference), atol=0, rtol=0)
    assert generated(base).tolist() == generated(reference).tolist()

    # generate checks its keyword arguments again, and the wrapper refuses to run on the unloaded base
    with pytest.raises(ValueError, match="prefix_key_values"):
        generated(base, prefix_key_values=torch.zeros(1))
    with pytest.raises(RuntimeError, match="unloaded"):
        logits(model)

    # the unloaded base can be wrapped again, and behaves as a freshly wrapped one
    torch.manual_seed(7)
    again = wrap(base)
    torch.manual_seed(7)
    torch.testing.assert_close(logits(again), logits(wrap(reference)), atol=0, rtol=0)


def test_unload_keeps_parameters_that_were_frozen_before_wrapping_frozen():
    base = tiny_model("llama")
    base.lm_head.requires_grad_(False)
    wrap(base).unload()
    assert not base.lm_head.weight.requires_grad
    assert all(p.requires_grad for name, p in base.named_parameters() if not name.startswith("lm_head"))
