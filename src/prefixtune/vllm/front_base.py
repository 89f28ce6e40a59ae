"""The vLLM front end's base model: the Hugging Face model without the weights vLLM holds.

How it differs from the base the other engines serve: vLLM loads the model in its own workers, so the
front end (the prefix store) runs none of it for `kv` and `mlp` prefixes. It needs the config, the
tokenizer, the geometry and the fingerprint (computed when `PrefixModel` wraps the loaded model), and
the input embeddings (their dtype and device are where prefixes are compiled). `release_weights` moves
every other weight to the meta device, so a served model is held in full once, by vLLM. A `hidden`
prefix runs the base's own layers to compile its keys/values: `restore_weights` loads them again, once,
when the first such prefix is loaded (and checks they are the weights the fingerprint was taken of).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import files
from ..loading import load_base_model
from ..model import PrefixModel

META = torch.device("meta")


def held_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers that are in memory (not on the meta device), each tensor once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if t.device != META}
    return sum(t.nbytes for t in tensors.values())


def weights_released(model: PrefixModel) -> bool:
    return any(parameter.device == META for parameter in model.base_model.parameters())


def release_weights(model: PrefixModel) -> int:
    """Move every base weight except the input embeddings (and weights tied to them) to the meta device;
    returns the bytes released. Buffers (rotary frequencies) stay: they are small."""
    base = model.base_model
    keep = id(base.get_input_embeddings().weight)
    before = held_bytes(base)
    for module in base.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) != keep and parameter.device != META:
                module._parameters[name] = nn.Parameter(torch.empty_like(parameter, device=META), requires_grad=False)
    return before - held_bytes(base)


def restore_weights(model: PrefixModel, spec: str, dtype: str) -> None:
    """Load the base's weights again from `spec` (as `load_base_model`) into the released model; raises
    `files.PrefixFileError` if they are not the weights its fingerprint was taken of."""
    full, _ = load_base_model(spec, dtype=dtype, device="cpu")
    loaded = files.fingerprint(full, model.geometry)
    if loaded != model.fingerprint:
        raise files.PrefixFileError(
            f"model {spec!r} changed on disk since the server started (fingerprint {loaded} != {model.fingerprint})"
        )
    base = model.base_model
    for name, parameter in full.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        base.get_submodule(owner)._parameters[leaf] = parameter.requires_grad_(False)
    model.kv_path.recorded.clear()
