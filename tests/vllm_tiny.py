"""Shared pieces of the vLLM tests (they run in .venv-vllm: see tests/test_vllm_suite.py): a tiny random
Llama saved to a folder (vLLM's CPU attention needs head sizes of 32 and up, which tests/tiny.py's
models do not have), in-process vLLM engines, and `PrefixModel.generate` references."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (no __main__ guard needed)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default takes far more

import torch  # noqa: E402

from prefixtune import PrefixModel  # noqa: E402
from prefixtune.vllm import PrefixedPrompt, kv_transfer_config  # noqa: E402
from tiny import vllm_llama  # noqa: E402


def tiny_llama(folder: Path) -> Any:
    """A 2-layer Llama (4 query / 2 KV heads of 32) with no eos (fixed-length generations), saved to `folder`."""
    model = vllm_llama(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=128,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    model.save_pretrained(folder)
    return model


@contextmanager
def vllm_engine(model_folder: str | Path, kv_folder: str | Path, **options: Any) -> Iterator[Any]:
    """An in-process ``vllm.LLM`` (float32, eager) with prefixtune's connector, shut down afterwards so
    the next one can start in this process. ``PREFIXTUNE_VLLM_DTYPE`` / ``PREFIXTUNE_VLLM_ATTENTION_BACKEND``
    override the dtype and pick vLLM's attention backend (scripts/gpu_check.sh)."""
    from vllm import LLM
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    settings = {"dtype": os.environ.get("PREFIXTUNE_VLLM_DTYPE", "float32"), "enforce_eager": True, "seed": 0}
    settings |= {"disable_log_stats": False} | options
    if os.environ.get("PREFIXTUNE_VLLM_ATTENTION_BACKEND"):  # scripts/gpu_check.sh: each GPU backend in turn
        settings["attention_config"] = {"backend": os.environ["PREFIXTUNE_VLLM_ATTENTION_BACKEND"]}
    llm = LLM(model=str(model_folder), kv_transfer_config=kv_transfer_config(kv_folder), **settings)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        ensure_kv_transfer_shutdown()
        cleanup_dist_env_and_memory()


def generate(llm: Any, prompts: Sequence[PrefixedPrompt], max_tokens: int) -> list[Any]:
    """Greedy vLLM outputs (``CompletionOutput``) for prepared prompts, all submitted together (one batch)."""
    params = [p.sampling_params(temperature=0, max_tokens=max_tokens) for p in prompts]
    return [output.outputs[0] for output in llm.generate([p.prompt() for p in prompts], params, use_tqdm=False)]


def reference(model: PrefixModel, prefix: str | None, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy `PrefixModel.generate` for one prompt (``prefix=None``: the bare model)."""
    ids = torch.tensor([list(prompt_ids)])
    options = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_tokens}
    if prefix is None:
        with model.disable_prefix():
            out = model.generate(**options, do_sample=False)
    else:
        out = model.generate(**options, prefix=prefix, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()
