"""PEFT's prefix-tuning adapter folders (PEFT 0.21), read into and written from a `kv` prefix.

A PEFT folder holds ``adapter_config.json`` (``peft_type: PREFIX_TUNING``, ``num_virtual_tokens`` P,
``num_layers`` L, ``num_attention_heads`` H = the KV-head count for grouped-query models,
``token_dim`` = H * head_dim, ``num_transformer_submodules``) and ``adapter_model.safetensors`` with
one tensor ``prompt_embeddings`` ``[P, L * 2 * token_dim]``: the keys/values themselves (with
``prefix_projection`` it is the MLP's output; the MLP is not saved). PEFT's ``get_prompt`` views it
as ``[P, L * 2, H, head_dim]``: layer-major, key before value, then head, then head_dim.

PEFT's ``CARTRIDGE`` adapters (a KV prefix whose first ``num_frozen_tokens`` rows do not train) save
the same tensor in the same layout and are served the same way, so they read as a `kv` prefix too;
the frozen rows are just keys/values once trained. We write only ``PREFIX_TUNING``.

How it differs from our files: no base-model fingerprint (only the checked sizes say it fits), and
the layout is flat. Decoder-only models: each of the L layers' self-attention gets its slot. Encoder-
decoders: PEFT 0.21 concatenates the 2L slots with themselves, regroups them four at a time as
(self key, self value, cross key, cross value) per decoder layer, then drops the cross-attention
part (it recomputes it from the encoder); the encoder gets nothing. So decoder layer i reads slot
``2i mod L``: with an even L, layers i and i + L/2 share keys/values. We load exactly that, and
export only prefixes PEFT can represent; anything else is refused with the reason. Models with a relative
position bias (T5 family) are refused both ways: PEFT's cached prefix gets the bias of positions
0..P-1 while ours gets none (always visible), so the same keys/values would act differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import PrefixConfig
from .files import CONFIG_NAME, PrefixFileError, atomic_write, atomic_write_text
from .injection import Geometry, UnsupportedModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
READ_TYPES = ("PREFIX_TUNING", "CARTRIDGE")  # a cartridge saves the same tensor (its frozen rows first)


def is_peft_folder(path: str | Path) -> bool:
    """A PEFT adapter folder (and not one of ours that happens to hold a PEFT config too)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / CONFIG_NAME).is_file()


def check_model(model_config: Any, geometry: Geometry) -> None:
    """Refuse models where a PEFT prefix and ours act differently on the same keys/values, or where
    ours holds more than keys/values (hybrid models' linear-attention states) or other than one
    shape for every layer (per-layer geometry, KV sharing: see `Geometry`)."""
    if geometry.state_layers:
        raise UnsupportedModelError(
            f"{model_config.model_type}: a PEFT prefix-tuning adapter holds keys/values only, and this model's "
            f"{geometry.state_layers} linear-attention layers take an initial state, so it cannot be converted"
        )
    if geometry.layer_shapes:
        raise UnsupportedModelError(
            f"{model_config.model_type}: its layers differ in key/value heads or head sizes "
            f"{sorted(set(geometry.layer_shapes))} (kv_heads, key_head_dim, value_head_dim), and a PEFT prefix-tuning "
            "adapter has one num_attention_heads and token_dim for all layers, so it cannot be converted"
        )
    if geometry.reusing_layers:
        raise UnsupportedModelError(
            f"{model_config.model_type}: {geometry.reusing_layers} layers reuse an earlier layer's keys/values (KV "
            "sharing) and have no prefix of their own, while a PEFT adapter holds one per layer, so it cannot be "
            "converted"
        )
    if getattr(model_config, "relative_attention_num_buckets", None) is not None:
        raise UnsupportedModelError(
            f"{model_config.model_type}: PEFT gives prefix positions a relative position bias and prefixtune gives "
            "prefix columns none, so PEFT prefix adapters cannot be converted exactly for this model"
        )


def _decoder_layers(geometry: Geometry) -> tuple[tuple[int, ...], int]:
    """The model-wide indices of the layers PEFT prefixes (decoder self-attention) and
    ``num_transformer_submodules`` (2 for encoder-decoders)."""
    return geometry.places["decoder"], 2 if "encoder" in geometry.places else 1


def _slots(num_layers: int, submodules: int) -> list[int]:
    """Which of the L key/value slots of ``prompt_embeddings`` decoder layer i reads (see module doc)."""
    if submodules == 1:
        return list(range(num_layers))
    # slot rows, twice over, regrouped by four; the first two of each group are self-attention
    return [(4 * i % (2 * num_layers)) // 2 for i in range(num_layers)]


def peft_config(geometry: Geometry, length: int, base_model_name: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT itself writes for this model (its GQA rule included)."""
    if geometry.key_head_dim != geometry.value_head_dim:
        raise UnsupportedModelError(
            f"keys of {geometry.key_head_dim} and values of {geometry.value_head_dim} per head (latent attention): "
            "PEFT's prompt_embeddings hold one head size for both, so this model's prefixes cannot be converted"
        )
    layers, submodules = _decoder_layers(geometry)
    token_dim = geometry.kv_heads * geometry.head_dim
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if submodules == 2 else "CAUSAL_LM",
        "num_virtual_tokens": length,
        "token_dim": token_dim,
        "num_attention_heads": geometry.kv_heads,
        "num_layers": len(layers),
        "num_transformer_submodules": submodules,
        "prefix_projection": False,  # we store the keys/values themselves, as PEFT's saved tensor is
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def _read_config(path: Path, geometry: Geometry) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrefixFileError(f"{file}: not readable JSON ({error})") from error
    if not isinstance(config, dict):
        raise PrefixFileError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") not in READ_TYPES:
        raise PrefixFileError(
            f"{file}: peft_type {config.get('peft_type')!r} is not a prefix-tuning or cartridge adapter {READ_TYPES}"
        )
    length = config.get("num_virtual_tokens")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise PrefixFileError(f"{file}: field 'num_virtual_tokens' must be a positive int, got {length!r}")
    expected = peft_config(geometry, length, None)
    for field in ("num_layers", "num_attention_heads", "token_dim", "num_transformer_submodules"):
        if config.get(field) != expected[field]:
            raise PrefixFileError(
                f"{file}: field {field!r} is {config.get(field)!r}, this base model needs {expected[field]!r} "
                "(an adapter for a different model?)"
            )
    return config


def read(path: str | Path, geometry: Geometry) -> tuple[PrefixConfig, Tensor]:
    """A PEFT prefix-tuning folder -> (its `kv` config, keys/values ``[layers, 2, kv_heads, P, head_dim]``)."""
    path = Path(path)
    config = _read_config(path, geometry)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        note = " (only a pickled adapter_model.bin is there; pickles are never loaded)" if pickled else ""
        raise PrefixFileError(f"{file}: missing adapter weights{note}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise PrefixFileError(f"{file}: corrupt or truncated safetensors file ({error})") from error
    if set(tensors) != {TENSOR}:
        raise PrefixFileError(f"{file}: expected the one tensor {TENSOR!r}, got {sorted(tensors)}")
    length, layers = config["num_virtual_tokens"], config["num_layers"]
    flat = tensors[TENSOR]
    shape = (length, layers * 2 * config["token_dim"])
    if tuple(flat.shape) != shape:
        raise PrefixFileError(f"{file}: tensor {TENSOR!r} has shape {tuple(flat.shape)}, expected {shape}")
    if not torch.isfinite(flat).all():
        raise PrefixFileError(f"{file}: tensor {TENSOR!r} holds NaN or infinite values")
    slots = flat.view(length, layers, 2, geometry.kv_heads, geometry.head_dim).permute(1, 2, 3, 0, 4)
    key_values = slots[_slots(layers, config["num_transformer_submodules"])].contiguous()  # [L, 2, kv, P, hd]
    # decoder-only: the defaults reach every layer; encoder-decoder: PEFT prefixes only decoder self-attention
    places = {"encoder": False, "cross": False} if config["num_transformer_submodules"] == 2 else {}
    return PrefixConfig(prefix_length=length, parameterization="kv", **places), key_values


def write(
    path: str | Path, key_values: Tensor, layers: tuple[int, ...], geometry: Geometry, base_model_name: str | None
) -> Path:
    """Write keys/values ``[len(layers), 2, kv_heads, P, head_dim]`` covering model-wide `layers` as a
    folder ``PeftModel.from_pretrained`` loads; refuse what PEFT cannot represent."""
    decoder, submodules = _decoder_layers(geometry)
    shape = (len(decoder), 2, geometry.kv_heads, key_values.shape[-2], geometry.head_dim)
    if tuple(layers) != tuple(decoder) or tuple(key_values.shape) != shape:
        raise UnsupportedModelError(
            "PEFT prefix tuning prefixes exactly the decoder's self-attention in every layer with "
            f"[layers, 2, kv_heads, P, head_dim] = {shape}; this prefix covers layers {list(layers)} "
            f"(the decoder's are {list(decoder)}) with keys/values {tuple(key_values.shape)}"
        )
    length = key_values.shape[-2]
    slots = key_values.new_zeros(shape)  # encoder-decoder: odd slots are cross-attention, which PEFT drops
    mapping = _slots(len(decoder), submodules)
    for layer, slot in enumerate(mapping):
        first = mapping.index(slot)
        if not torch.equal(key_values[first], key_values[layer]):
            raise UnsupportedModelError(
                f"PEFT 0.21 gives decoder layers {first} and {layer} of an encoder-decoder the same prefix (its "
                "get_prompt duplicates and regroups the slots); this prefix differs there, so PEFT cannot represent it"
            )
        slots[slot] = key_values[layer]
    flat = slots.permute(3, 0, 1, 2, 4).reshape(length, -1).detach().to("cpu").contiguous()  # [P, L * 2 * token_dim]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / ADAPTER_WEIGHTS, lambda temp: save_file({TENSOR: flat}, temp, metadata={"format": "pt"}))
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(peft_config(geometry, length, base_model_name), indent=2))
    return path
