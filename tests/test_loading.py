"""The SmolLM2 folder that `load_base_model` converts from GGUF is a standard Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prefixtune import loading
from tiny import needs_smollm2


def test_untied_state_dict_keeps_the_input_embedding_of_tied_weights():
    from tiny import TINY_CONFIGS

    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    kept = loading.untied_state_dict(model)
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" not in kept
    assert set(kept) == set(model.state_dict()) - {"lm_head.weight"}


@needs_smollm2
@pytest.mark.slow
def test_converted_smollm2_folder_names_its_architecture_and_loads_with_identical_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    (tmp_path / "smollm2-135m-instruct").mkdir()  # an old (v1) conversion is not reused
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    folder = loading.smollm2_folder()
    assert folder.name == loading.SMOLLM2_FOLDER
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names

    gguf = loading.smollm2_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 7042, 314, 2]])
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, original(input_ids=ids).logits)
