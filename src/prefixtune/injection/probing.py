"""Probing: one forward on dummy tokens finds a model's attention layers, tags them, and yields
the prefix `Geometry` and the `KeyValuePath` that sends hidden states through a layer's own frozen
key/value path. `inject` switches a model to the prefix attention functions and installs the hooks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from ..config import PLACES
from ..transformers_private import (
    attn_implementation,
    override_validate_model_kwargs,
    restore_validate_model_kwargs,
    validate_model_kwargs,
)
from .attention import (
    PREFIX_KWARGS,
    SUPPORTED_IMPLEMENTATIONS,
    AttentionCall,
    Capture,
    UnsupportedModelError,
    new_mask_cache,
)
from .positions import offset_positions, shift_stack_positions


@dataclass(frozen=True)
class Geometry:
    """The shape of a prefix for one base model (what the probe found).

    Layers are numbered across the whole model; ``places`` says which belong to the encoder's
    self-attention, the decoder's self-attention and the decoder's cross-attention (decoder-only
    models have just ``decoder``).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    places: dict[str, tuple[int, ...]]

    def layers_for(self, places: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(sorted(layer for place in places for layer in self.places.get(place, ())))


class KeyValuePath:
    """Sends hidden states through one layer's own frozen key/value path, as a real token at
    positions 0..P-1 would go: its projections, any key norm and rotary embedding. It calls the
    attention module itself and keeps the keys/values it hands to the attention function
    (cross-attention modules get the states as their encoder states)."""

    def __init__(self, model: PreTrainedModel, attention_modules: list[nn.Module], cross: tuple[int, ...]) -> None:
        self.attention_modules = attention_modules
        self.cross = set(cross)
        self.rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
        # Which optional arguments each layer's forward takes, read once here rather than per call.
        self.accepted = [frozenset(inspect.signature(m.forward).parameters) for m in attention_modules]

    def __call__(self, layer: int, hidden: Tensor) -> Tensor:
        """hidden ``[P, d_model]`` -> keys/values ``[2, kv_heads, P, head_dim]``."""
        module, accepted = self.attention_modules[layer], self.accepted[layer]
        hidden = hidden[None].to(next(module.parameters()).dtype)  # [1, P, d_model]
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, P]
        kwargs: dict = {"hidden_states": hidden}
        if "attention_mask" in accepted:
            kwargs["attention_mask"] = None
        if layer in self.cross:
            source = "key_value_states" if "key_value_states" in accepted else "encoder_hidden_states"
            kwargs[source] = hidden
        if "position_embeddings" in accepted:
            if self.rotary is None:
                raise UnsupportedModelError(f"{type(module).__name__} wants rotary embeddings but none was found")
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        if "position_ids" in accepted:
            kwargs["position_ids"] = positions
        capture = Capture()
        module(**kwargs, prefixtune_capture=capture)
        call = capture.calls[-1]
        return torch.stack([call.key[0], call.value[0]])


def _accept_prefix_in_generate(model: PreTrainedModel) -> None:
    """`generate` refuses keyword arguments its forward signature does not name; ours are consumed
    by the attention function, so they are taken out of that check (on this instance only)."""
    validate = validate_model_kwargs(model)

    def validate_without_prefix(model_kwargs: dict) -> None:
        validate({key: value for key, value in model_kwargs.items() if key not in PREFIX_KWARGS})

    override_validate_model_kwargs(model, validate_without_prefix)


def _probe(model: PreTrainedModel) -> Capture:
    """One forward on dummy tokens, recording every attention call. Encoder-decoders get inputs of
    different lengths (3 source, 2 target tokens) so the three kinds of attention tell apart."""
    capture = Capture()
    inputs = {
        "input_ids": torch.zeros(
            (1, 3 if model.config.is_encoder_decoder else 2), dtype=torch.long, device=model.device
        ),
        "use_cache": False,
        "prefixtune_capture": capture,
    }
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    try:
        with torch.no_grad():
            model(**inputs)
    except TypeError as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not pass attention arguments through AttentionInterface: {error}"
        ) from error
    return capture


def _place(model: PreTrainedModel, call: AttentionCall) -> str:
    if not model.config.is_encoder_decoder:
        return "decoder"
    shape = (call.query.shape[2], call.key.shape[2])
    places = {(3, 3): "encoder", (2, 2): "decoder", (2, 3): "cross"}
    if shape not in places:
        raise UnsupportedModelError(f"{type(call.module).__name__}: unexpected attention shape {shape} in the probe")
    return places[shape]


def inject(model: PreTrainedModel) -> tuple[Geometry, KeyValuePath]:
    """Switch `model` to the prefix attention functions and find its attention layers.

    A probe forward records the attention modules in call order (= layer order) and the shape of
    their keys; each module is tagged with its layer index. A model whose attention does not go
    through ``AttentionInterface`` (or drops the extra keyword arguments) records nothing and is refused.
    """
    name = original = attn_implementation(model)
    if name not in SUPPORTED_IMPLEMENTATIONS and not (name or "").startswith("prefixtune_"):
        model.set_attn_implementation("sdpa")
        name = "sdpa"
    model.set_attn_implementation(name if name.startswith("prefixtune_") else f"prefixtune_{name}")

    calls = _probe(model).calls
    by_place: dict[str, list[nn.Module]] = {place: [] for place in PLACES}
    for call in calls:
        modules = by_place[_place(model, call)]
        if all(call.module is not seen for seen in modules):
            modules.append(call.module)
    ordered = [module for place in PLACES for module in by_place[place]]
    if not ordered:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model.config.model_type!r}) does not route attention through "
            "transformers' AttentionInterface, so prefixtune cannot inject a prefix into it"
        )
    for index, module in enumerate(ordered):
        module.prefixtune_layer = index
    for place, modules in by_place.items():
        for module in modules:
            module.prefixtune_place = place
    places, start = {}, 0
    for place in PLACES:
        if by_place[place]:
            places[place] = tuple(range(start, start + len(by_place[place])))
            start += len(by_place[place])
    shapes = {(call.key.shape[1], call.key.shape[3]) for call in calls}
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: layers disagree on key shapes {sorted(shapes)}")
    ((kv_heads, head_dim),) = shapes
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if not getattr(model, "_prefixtune_injected", None):
        hooks = [model.register_forward_pre_hook(new_mask_cache, with_kwargs=True)]
        if model.config.is_encoder_decoder:
            # Decoder text follows its prefix (as with Li & Liang's past_key_values); encoder positions
            # stay put, as in the paper's BART, so an encoder prefix never moves the source text.
            hooks += shift_stack_positions(model.get_decoder(), places["decoder"])
        else:
            hooks.append(model.register_forward_pre_hook(offset_positions, with_kwargs=True))
        _accept_prefix_in_generate(model)
        model._prefixtune_injected = Injected(original, hooks)
    geometry = Geometry(len(ordered), kv_heads, head_dim, hidden_size, places)
    return geometry, KeyValuePath(model, ordered, places.get("cross", ()))


TAGS = ("prefixtune_layer", "prefixtune_place", "prefixtune_shift")  # attributes inject puts on modules


@dataclass
class Injected:
    """What `inject` changed on a model beyond `TAGS`, kept on it so `uninject` can undo it."""

    attn_implementation: str | None  # the model's own, before prefixtune's
    hooks: list[RemovableHandle]


def uninject(model: PreTrainedModel) -> None:
    """Undo `inject`: remove its hooks and module tags, give `generate` back its own keyword check,
    and restore the model's own attention implementation."""
    injected = model.__dict__.pop("_prefixtune_injected", None)
    if not isinstance(injected, Injected):
        raise ValueError(f"{type(model).__name__} has no prefixtune injection to undo")
    for hook in injected.hooks:
        hook.remove()
    for module in model.modules():
        for tag in TAGS:
            module.__dict__.pop(tag, None)
    restore_validate_model_kwargs(model)
    model.set_attn_implementation(injected.attn_implementation)
