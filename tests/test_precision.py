"""A prefix is float32 whatever the base's precision: trained on a bfloat16 base it loads into a
float32 base (and the reverse) and predicts the same tokens; the file holds float32 either way."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.loading import ModelLoadError
from tiny import left_padded, needs_smollm2

PROMPTS = [[5, 9, 12, 30, 7, 8], [7, 8, 22], [11, 40, 41, 42, 43, 44, 45, 46]]


def trained_prefix(folder, dtype: str, output) -> torch.Tensor:
    """Train a prefix a few steps on a `dtype` base, save it; the logits it gives on PROMPTS."""
    base, tokenizer = load_base_model(str(folder), dtype=dtype)
    torch.manual_seed(0)
    model = PrefixModel(base, PrefixConfig(prefix_length=4, init_std=0.5), tokenizer=tokenizer).train()
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}  # the master copy
    batch = left_padded(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2)
    for _ in range(30):  # until the batch's next tokens are confident predictions, not near-ties
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.save_prefix(output)
    return text_logits(model.eval(), batch)


def assert_same_predictions(got: torch.Tensor, want: torch.Tensor, float32: torch.Tensor, gap: float = 0.5) -> None:
    """Same argmax wherever the float32 logits' top two are more than `gap` apart (the rest are
    near-ties that bfloat16 rounding may flip either way); that must be most positions."""
    top = float32.topk(2, dim=-1).values
    decided = top[:, 0] - top[:, 1] > gap
    assert decided.float().mean() >= 0.4, f"only {decided.float().mean():.0%} of positions are not near-ties"
    assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])


def text_logits(model: PrefixModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()].float()  # [tokens, vocab]


@pytest.mark.parametrize(("trained_in", "loaded_in"), [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_prefix_trained_in_one_precision_predicts_the_same_tokens_in_the_other(
    tiny_folder, tmp_path, trained_in, loaded_in
):
    trained_logits = trained_prefix(tiny_folder, trained_in, tmp_path / "prefix")
    assert {t.dtype for t in load_file(tmp_path / "prefix" / "prefix.safetensors").values()} == {torch.float32}

    base, tokenizer = load_base_model(str(tiny_folder), dtype=loaded_in)
    assert base.dtype == getattr(torch, loaded_in)
    model = PrefixModel.from_pretrained(base, tmp_path / "prefix", tokenizer=tokenizer)
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    logits = text_logits(model.eval(), left_padded(PROMPTS))
    # bfloat16 rounding moves these logits (|logit| < 6) by up to 0.25; a random tiny model has
    # many near-ties, so: the same prediction wherever float32's top two are 0.5 apart.
    torch.testing.assert_close(logits, trained_logits, atol=0.25, rtol=0)
    assert_same_predictions(logits, trained_logits, float32=logits if loaded_in == "float32" else trained_logits)
    # and the prefix matters: the bare base predicts differently
    bare = text_logits(model, left_padded(PROMPTS) | {"prefix": [""] * len(PROMPTS)})
    assert not torch.equal(bare.argmax(-1), trained_logits.argmax(-1))


def test_unknown_dtype_and_missing_gpu_are_refused_by_name(tiny_folder):
    expected = r"dtype: expected one of \['auto', 'float32', 'bfloat16', 'float16'\], got 'fp8'"
    with pytest.raises(ModelLoadError, match=expected):
        load_base_model(str(tiny_folder), dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="device 'cuda': this machine has no CUDA GPU"):
            load_base_model(str(tiny_folder), device="cuda")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_prefix_made_in_bfloat16_predicts_like_float32_and_the_reverse(tmp_path):
    """On the real model: an activations prefix made on each precision, loaded into the other,
    gives the same next-token predictions on a fixed batch of E2E-style prompts."""
    prompts = ["name[Alimentum], area[city centre], familyFriendly[no]\n", "food[French], priceRange[cheap]\n"]
    config = PrefixConfig(prefix_length=10, init="activations", init_text="Describe the restaurant in one sentence.")
    models = {dtype: load_base_model("smollm2-135m", dtype=dtype) for dtype in ("float32", "bfloat16")}
    batch = models["float32"][1](prompts, padding=True, return_tensors="pt")
    for made_in, loaded_in in (("bfloat16", "float32"), ("float32", "bfloat16")):
        base, tokenizer = models[made_in]
        made = PrefixModel(base, config, tokenizer=tokenizer)
        made.save_prefix(tmp_path / made_in)
        loaded = PrefixModel.from_pretrained(models[loaded_in][0], tmp_path / made_in, tokenizer=tokenizer)
        assert {p.dtype for p in loaded.trainable_parameters()} == {torch.float32}
        got, want = text_logits(loaded, batch), text_logits(made, batch)
        assert_same_predictions(got, want, float32=got if loaded_in == "float32" else want)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9  # measured: 27 of 28
