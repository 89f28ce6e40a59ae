"""One batch, a different prefix per row (different lengths too): each row gets exactly what it
would get alone, in forward and in greedy and beam `generate`."""

from __future__ import annotations

import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel
from tiny import ARCHITECTURES, SPECIAL, left_padded, tiny_model

PROMPTS = [[5, 9, 12, 30], [7, 8], [11, 40, 41, 42, 43, 44]]
NAMES = ["formal-blog", "twitter-wit", ""]  # "" = the bare model for that row


def three_prefixes(architecture: str) -> PrefixModel:
    model = PrefixModel(tiny_model(architecture), PrefixConfig(prefix_length=3, init_std=1.0), name="formal-blog")
    model.add_prefix("twitter-wit", PrefixConfig(prefix_length=8, parameterization="hidden", init_std=1.0))
    model.add_prefix(
        "long-mlp", PrefixConfig(prefix_length=5, parameterization="mlp", init_std=1.0, mlp_hidden_size=16)
    )
    return model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mixed_prefix_forward_equals_single_rows(architecture):
    model = three_prefixes(architecture)
    names = ["formal-blog", "twitter-wit", "long-mlp"]
    batch = left_padded(PROMPTS)
    with torch.no_grad():
        logits = model(**batch, prefix=names).logits
        for i, (row, name) in enumerate(zip(PROMPTS, names, strict=True)):
            alone = model(input_ids=torch.tensor([row]), prefix=name).logits[0]
            torch.testing.assert_close(logits[i, -len(row) :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_prefix_generate_equals_single_rows(architecture, num_beams):
    model = three_prefixes(architecture)
    options = {
        "max_new_tokens": 6,
        "do_sample": False,
        "num_beams": num_beams,
        "pad_token_id": SPECIAL["pad"],
        "eos_token_id": None,
    }
    batch = left_padded(PROMPTS)
    together = model.generate(**batch, prefix=NAMES, **options)[:, batch["input_ids"].shape[1] :]
    for i, (row, name) in enumerate(zip(PROMPTS, NAMES, strict=True)):
        alone = model.generate(input_ids=torch.tensor([row]), prefix=[name], **options)[0, len(row) :]
        assert together[i].tolist() == alone.tolist(), f"row {i} ({name or 'bare'})"
    # different prefixes really do lead to different continuations of the same prompt
    same_prompt = left_padded([PROMPTS[0]] * 3)
    outputs = model.generate(**same_prompt, prefix=NAMES, **options)[:, 4:].tolist()
    assert len({tuple(o) for o in outputs}) > 1


def test_per_row_prefix_list_must_match_batch_and_names():
    model = three_prefixes("llama")
    batch = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="got 2 names for a batch of 3"):
        model(**batch, prefix=["formal-blog", "twitter-wit"])
    with pytest.raises(KeyError, match="unknown prefix 'nope'"):
        model(**batch, prefix=["formal-blog", "nope", ""])
