"""The benchmarks' ``--quick`` base: a tiny random Llama that keeps SmolLM2-135M's tokenizer, so a quick run
sends the real token ids through the same code in seconds (numbers from it check plumbing, never speed)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def tiny_llama_for(tokenizer: Any, max_positions: int) -> Any:
    """2 layers, hidden 64, 2 query heads of 32 (the smallest head vLLM's CPU attention takes), 1 KV head."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
    )
    return AutoModelForCausalLM.from_config(config).eval()
