"""Sliding-window layers: a prefix slot stands for a token at its position and is windowed like it
(a query at position q sees slot j while q - j < window), so an `activations` prefix of text T acts
exactly like T even where the window cuts T off. (Always-visible prefix columns would be a
different model: a query past the window would still read all of T.)"""

from __future__ import annotations

import pytest
import torch

from architecture_walk import TEXTS, TOLERANCE, build, check, relative_error
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError

WINDOW = 3  # T has 9 tokens and x up to 5: every x token's window cuts into T


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_window_that_binds_cuts_prefix_columns_like_text(model_type):
    assert check(model_type, sliding_window=WINDOW).outcome == "exact"
    # the window binds: the same weights with a wide window give other logits on T + x
    ids = torch.tensor([list(range(3, 15))])
    with torch.no_grad():
        narrow = build(model_type, sliding_window=WINDOW)(input_ids=ids).logits
        wide = build(model_type, sliding_window=64)(input_ids=ids).logits
    assert (narrow - wide).abs().max() > 1e-2


def test_generation_past_the_window_equals_generating_after_the_text(tokenizer):
    model = build("mistral", sliding_window=WINDOW)
    text = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    config = PrefixConfig(prefix_length=None, init="activations", init_text=TEXTS[0])
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    prompt = [5, 9, 12]
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    got = prefixed.generate(input_ids=torch.tensor([prompt]), **options)[0, len(prompt) :]
    want = model.generate(input_ids=torch.tensor([text + prompt]), **options)[0, len(text) + len(prompt) :]
    assert got.tolist() == want.tolist()


def test_chunked_attention_is_exact_within_the_first_chunk_and_refused_beyond(tokenizer):
    """Llama 4's chunked layers: transformers chunks text by index, blind to a prefix before it."""
    assert check("llama4_text", attention_chunk_size=32).outcome == "exact"
    model = build("llama4_text", attention_chunk_size=12)
    config = PrefixConfig(prefix_length=None, init="activations", init_text=TEXTS[0])  # 9 tokens
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    text, x = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"], [5, 9, 12]  # x at 9..11: the first chunk
    with torch.no_grad():
        got = prefixed(input_ids=torch.tensor([x])).logits
        with prefixed.disable_prefix():
            want = prefixed(input_ids=torch.tensor([text + x])).logits[:, len(text) :]
    assert relative_error(got, want) <= TOLERANCE  # the prefix acts as its text there
    with pytest.raises(UnsupportedModelError, match="chunked attention .* first chunk"):
        prefixed(input_ids=torch.tensor([[5, 9, 12, 30]]))
