"""`generate` keeps the prefix in every decoding mode (PEFT 0.21.2's silently drops it)."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer

from prefixtune import PrefixConfig, PrefixModel
from tiny import SPECIAL, tiny_model

PROMPT = torch.tensor([[5, 9, 12, 30, 7]])
GREEDY = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": SPECIAL["pad"]}


@pytest.fixture(params=["llama", "gpt2"])
def prefixed(request) -> PrefixModel:
    return PrefixModel(tiny_model(request.param), PrefixConfig(prefix_length=6, init_std=1.0))


def continuation(output: torch.Tensor) -> list[int]:
    return output[0, PROMPT.shape[1] :].tolist()


def forward_greedy(model, steps: int) -> list[int]:
    ids = PROMPT
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[0, PROMPT.shape[1] :].tolist()


def test_greedy_generate_equals_forward_greedy_and_differs_from_bare(prefixed):
    generated = continuation(prefixed.generate(input_ids=PROMPT, **GREEDY))
    assert generated == forward_greedy(prefixed, 8)
    assert generated != continuation(prefixed.base_model.generate(input_ids=PROMPT, **GREEDY))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_beam_search_keeps_the_prefix(architecture, tokenizer):
    """A prefix of the frozen model's own activations on text T is exactly T as context, so beam
    search with it must return what beam search on T + prompt returns, at every step and beam."""
    text = "the restaurant near the river serves cheap french food"
    model = tiny_model(architecture)
    config = PrefixConfig(prefix_length=None, init="activations", init_text=text)
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    context = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    options = {**GREEDY, "num_beams": 3}

    with_prefix = continuation(prefixed.generate(input_ids=PROMPT, **options))
    after_text = model.generate(input_ids=torch.cat([context, PROMPT], dim=1), **options)[0, context.shape[1] :]
    assert with_prefix == continuation(after_text[None])
    assert with_prefix != continuation(model.generate(input_ids=PROMPT, **options))  # the prefix matters here


def test_seeded_sampling_keeps_the_prefix_and_is_reproducible(prefixed):
    options = {**GREEDY, "do_sample": True, "top_k": 0, "temperature": 1.0}
    runs = []
    for generate in (prefixed.generate, prefixed.generate, prefixed.base_model.generate):
        torch.manual_seed(123)
        runs.append(continuation(generate(input_ids=PROMPT, **options)))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_streaming_yields_the_prefixed_greedy_text(prefixed, tokenizer):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    output = prefixed.generate(input_ids=PROMPT, streamer=streamer, **GREEDY)
    streamed = "".join(streamer)
    assert streamed.split() == tokenizer.decode(continuation(output)).split()
    assert continuation(output) == forward_greedy(prefixed, 8)


@pytest.mark.parametrize("padded", [False, True], ids=["one-row-no-mask", "left-padded-batch"])
def test_static_cache_generate_equals_the_dynamic_cache(prefixed, padded):
    """A static cache's prefill attends to keys longer than the text (the cache's empty slots after it)
    and transformers then passes no mask (sdpa's upper-left ``is_causal``); the prefix path must
    align its causal mask like that, not to the end of the keys."""
    inputs = {"input_ids": PROMPT}
    if padded:
        ids = torch.cat([PROMPT, torch.tensor([[SPECIAL["pad"], SPECIAL["pad"], 5, 9, 12]])])
        inputs = {"input_ids": ids, "attention_mask": (ids != SPECIAL["pad"]).long()}
    scored = {**GREEDY, "output_scores": True, "return_dict_in_generate": True}
    dynamic = prefixed.generate(**inputs, **scored)
    static = prefixed.generate(**inputs, **scored, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for step_static, step_dynamic in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(step_static, step_dynamic, rtol=1e-4, atol=1e-4)
