"""Probing: one forward on dummy tokens finds a model's attention layers, tags them, and yields
the prefix `Geometry` and the layers' `KeyValuePath` (see `key_value_path`). `inject` switches a
model to the prefix attention functions and installs the hooks (hybrid models: and the
initial-state forward of their linear-attention layers, see `states`).
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
    expand_inputs_for_generation,
    kv_shared_slicers,
    kv_shared_slicing,
    override_expand_inputs_for_generation,
    override_kv_shared_slicing,
    override_validate_model_kwargs,
    restore_expand_inputs_for_generation,
    restore_kv_shared_slicing,
    restore_validate_model_kwargs,
    set_attn_implementation,
    validate_model_kwargs,
)
from .attention import (
    PREFIX_KWARGS,
    SUPPORTED_IMPLEMENTATIONS,
    AttentionCall,
    Capture,
    UnsupportedModelError,
    model_kind,
    new_mask_cache,
    refuse_pooled_keys,
)
from .key_value_path import KeyValuePath, attention_input, run_on_dummy_tokens
from .mamba1_states import carry_to_mixers
from .mamba_states import carry_state_kwargs
from .positions import counts_own_positions, position_shifter, shift_stack_positions
from .states import STATE_KWARGS, find_state_layers, state_shapes
from .states import install as install_state_layers
from .states import remove as remove_state_layers


@dataclass(frozen=True)
class Geometry:
    """The shape of a prefix for one base model (what the probe found).

    Layers are numbered across the whole model; ``places`` says which belong to the encoder's
    self-attention, the decoder's self-attention and the decoder's cross-attention (decoder-only
    models have just ``decoder``).

    ``head_dim`` is the width prefix keys and values are stored at. Where keys and values differ in
    head size (multi-head latent attention, e.g. DeepSeek-V3: keys 192, values 128), it is the
    larger one, keys sit in ``[..., :key_head_dim]`` and values in ``[..., :value_head_dim]``, and
    the rest is zeros (attention never reads it). Elsewhere all three are equal.

    Models whose layers differ in key/value shape (Gemma 4: sliding layers 256-wide, full layers
    512-wide with fewer heads; MiMo-V2-Flash: more heads on some layers) have ``layer_shapes``, one
    ``(kv_heads, key_head_dim, value_head_dim)`` per layer; ``kv_heads`` and the head sizes are then
    the largest over layers, and each layer's slice is zero past its own heads and sizes, so the
    layout stays ``[layers, 2, kv_heads, P, head_dim]`` (at the cost of those zeros). Uniform models
    have ``layer_shapes == ()``.

    ``attention_input_size`` is the width of what attention modules make their keys/values from,
    where that is not ``hidden_size`` (Zamba 2's shared attention reads the hidden states
    concatenated with the token embeddings, 2 x ``hidden_size``), else 0; a `hidden` prefix holds
    inputs of that width.

    ``reusing_layers`` counts attention layers that make no keys/values of their own but reuse an
    earlier layer's (Gemma 3n / Gemma 4 KV sharing): they have no prefix slice; they read the
    slice of the layer whose keys/values they reuse, as they read that layer's text keys/values.

    Hybrid models also have ``state_layers`` linear-attention layers (see `states`), whose prefix
    is an initial state: conv ``conv_state_shape`` ``[conv_dim, K-1]`` and recurrent
    ``recurrent_state_shape`` ``[v_heads, k_head_dim, v_head_dim]``, the same for every such layer.
    They belong to the decoder; their indices are their own (0..state_layers-1, in layer order).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    places: dict[str, tuple[int, ...]]
    key_head_dim: int | None = None  # None: head_dim
    value_head_dim: int | None = None  # None: head_dim
    state_layers: int = 0
    conv_state_shape: tuple[int, ...] = ()  # [conv_dim, K-1]
    recurrent_state_shape: tuple[int, ...] = ()  # [v_heads, k_head_dim, v_head_dim]
    layer_shapes: tuple[tuple[int, int, int], ...] = ()  # per layer (kv_heads, key_head_dim, value_head_dim)
    reusing_layers: int = 0
    attention_input_size: int = 0  # what attention makes keys/values from, where not hidden_size (Zamba 2); 0: it is

    def __post_init__(self) -> None:
        for field in ("key_head_dim", "value_head_dim"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, self.head_dim)

    def layer_shape(self, layer: int) -> tuple[int, int, int]:
        """(kv_heads, key_head_dim, value_head_dim) of one layer."""
        if self.layer_shapes:
            return self.layer_shapes[layer]
        return self.kv_heads, self.key_head_dim, self.value_head_dim

    def used(self, layers: tuple[int, ...]) -> Tensor | None:
        """Which entries of these layers' keys/values attention reads, ``[layers, 2, kv_heads, 1,
        head_dim]`` (1 read, 0 padding), or None where it reads them all."""
        used = torch.zeros(len(layers), 2, self.kv_heads, 1, self.head_dim)
        for row, layer in enumerate(layers):
            heads, key_head_dim, value_head_dim = self.layer_shape(layer)
            used[row, 0, :heads, :, :key_head_dim] = 1
            used[row, 1, :heads, :, :value_head_dim] = 1
        return None if bool(used.all()) else used

    def layers_for(self, places: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(sorted(layer for place in places for layer in self.places.get(place, ())))


def _accept_prefix_in_generate(model: PreTrainedModel) -> None:
    """`generate` refuses keyword arguments its forward signature does not name; ours are consumed
    by the attention function, so they are taken out of that check (on this instance only)."""
    validate = validate_model_kwargs(model)

    def validate_without_prefix(model_kwargs: dict) -> None:
        validate({key: value for key, value in model_kwargs.items() if key not in (*PREFIX_KWARGS, *STATE_KWARGS)})

    override_validate_model_kwargs(model, validate_without_prefix)


def _expand_shared_rows_as_views(model: PreTrainedModel) -> None:
    """Beam search and ``num_return_sequences`` repeat every tensor input per beam, a copy; a prefix
    input whose rows share one storage row (one prefix for the whole batch, stride 0, or one row) is expanded as
    a view instead, so B x beams rows cost one prefix and take the shared-prefix path (on this
    instance only). Rows of different prefixes are repeated as transformers does."""
    expand = expand_inputs_for_generation(model)

    def expand_shared_rows_as_views(expand_size: int = 1, **inputs):
        shared = {
            name: inputs.pop(name)
            for name in (*PREFIX_KWARGS, *STATE_KWARGS)
            if isinstance(inputs.get(name), Tensor) and (inputs[name].shape[0] == 1 or inputs[name].stride(0) == 0)
        }
        input_ids, model_kwargs = expand(expand_size=expand_size, **inputs)
        for name, rows in shared.items():  # [B, ...] -> [B x expand_size, ...], one row in memory
            model_kwargs[name] = rows[:1].expand(rows.shape[0] * expand_size, *rows.shape[1:])
        return input_ids, model_kwargs

    override_expand_inputs_for_generation(model, expand_shared_rows_as_views)


def _slice_kv_shared_inputs_as_sdpa(model: PreTrainedModel) -> None:
    """Gemma 4 runs only the last `logits_to_keep` queries through its KV-sharing layers, except
    under sdpa (by name) where a layer has no mask and more than one logit is kept or the cache is
    static: sdpa's causal flag would then align the kept queries with the first keys. The bare path
    of `prefixtune_sdpa` is that sdpa, so it takes the same exception, with a prefix too (its path
    is exact either way): every query is kept (``logits_to_keep=0``: all of them), on this instance
    only."""
    for module in kv_shared_slicers(model):
        slice_inputs = kv_shared_slicing(module)
        signature = inspect.signature(slice_inputs)

        def slice_as_sdpa(*args, _slice=slice_inputs, _signature=signature, **kwargs) -> tuple:
            bound = _signature.bind(*args, **kwargs)
            keep, cache = bound.arguments["logits_to_keep"], bound.arguments["cache"]
            unmasked = any(mask is None for mask in bound.arguments["causal_mask_mapping"].values())
            causal_flag = attn_implementation(model) == "prefixtune_sdpa" and unmasked
            if causal_flag and isinstance(keep, int) and (keep > 1 or getattr(cache, "is_compileable", False)):
                bound.arguments["logits_to_keep"] = 0
            return _slice(*bound.args, **bound.kwargs)

        override_kv_shared_slicing(module, slice_as_sdpa)


def _probe(model: PreTrainedModel) -> Capture:
    """One forward on dummy tokens, recording every attention call. Encoder-decoders get inputs of
    different lengths (3 source, 2 target tokens) so the three kinds of attention tell apart."""
    capture = Capture()
    run_on_dummy_tokens(model, 3, 2, prefixtune_capture=capture)
    return capture


def _attention_input_size(model: PreTrainedModel, modules: list[nn.Module], hidden_size: int) -> int:
    """`Geometry.attention_input_size`, from one more dummy forward: the width every attention
    module reads its keys/values' input at, where that is not `hidden_size`; 0 where it is, or where
    modules differ (`KeyValuePath` then refuses a `hidden` prefix with the widths)."""
    if not modules:  # pure state-space models
        return 0
    widths: dict[nn.Module, int] = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        widths.setdefault(module, attention_input(args, kwargs).shape[-1])

    hooks = [module.register_forward_pre_hook(keep, with_kwargs=True) for module in modules]
    try:
        run_on_dummy_tokens(model, 3, 2)
    finally:
        for hook in hooks:
            hook.remove()
    sizes = set(widths.values())
    return sizes.pop() if len(sizes) == 1 and hidden_size not in sizes else 0


def _place(model: PreTrainedModel, call: AttentionCall) -> str:
    if not model.config.is_encoder_decoder:
        return "decoder"
    shape = (call.query.shape[2], call.key.shape[2])
    places = {(3, 3): "encoder", (2, 2): "decoder", (2, 3): "cross"}
    if shape not in places:
        raise UnsupportedModelError(
            f"{model_kind(model)}: {type(call.module).__name__} attends {shape[0]} queries to {shape[1]} keys in the "
            "probe (3 source and 2 target tokens), which is no encoder, decoder or cross-attention"
        )
    return places[shape]


def inject(model: PreTrainedModel) -> tuple[Geometry, KeyValuePath]:
    """Switch `model` to the prefix attention functions and find its attention layers.

    A probe forward records the attention modules in call order (= layer order) and the shape of
    their keys; each module is tagged with its layer index. A model whose attention does not go
    through ``AttentionInterface`` (or drops the extra keyword arguments) records nothing and is refused.
    """
    name = original = attn_implementation(model)
    if name not in SUPPORTED_IMPLEMENTATIONS and not (name or "").startswith("prefixtune_"):
        set_attn_implementation(model, "sdpa")
        name = "sdpa"
    set_attn_implementation(model, name if name.startswith("prefixtune_") else f"prefixtune_{name}")

    calls = _probe(model).calls
    sources = _reused_key_values(calls)
    by_place: dict[str, list[nn.Module]] = {place: [] for place in PLACES}
    for call in calls:
        modules = by_place[_place(model, call)]
        if call.module not in sources and all(call.module is not seen for seen in modules):
            modules.append(call.module)
    ordered = [module for place in PLACES for module in by_place[place]]
    state_modules = find_state_layers(model, model_kind(model))
    if not ordered and not state_modules:  # pure state-space models (Mamba-2) have state layers only
        raise UnsupportedModelError(
            f"{model_kind(model)} does not route attention through "
            "transformers' AttentionInterface, so prefixtune cannot inject a prefix into it"
        )
    for index, module in enumerate(ordered):
        module.prefixtune_layer = index
    for place, modules in by_place.items():
        for module in modules:
            module.prefixtune_place = place
    for module, source in sources.items():  # KV sharing: the prefix slice of the keys/values it reuses
        module.prefixtune_layer, module.prefixtune_place = source.prefixtune_layer, source.prefixtune_place
    _tag_windowed_layers(model, by_place["decoder"] + [m for m in sources if m.prefixtune_place == "decoder"])
    places, start = {}, 0
    for place in PLACES:
        if by_place[place]:
            places[place] = tuple(range(start, start + len(by_place[place])))
            start += len(by_place[place])
    places = places or {"decoder": ()}  # pure state-space models: only the decoder's state layers
    _refuse_own_attention(model, calls)  # before the cache layout: e.g. compressed keys are refused as such
    layer_shapes = _key_value_shapes(model, calls, ordered) if calls else []  # none: pure state-space models
    kv_heads, key_head_dim, value_head_dim = (
        tuple(max(sizes) for sizes in zip(*layer_shapes, strict=True)) if layer_shapes else (0, 0, 0)
    )
    shapes = {state_shapes(module) for module in state_modules}
    if len(shapes) > 1:
        raise UnsupportedModelError(
            f"{model_kind(model)}: linear-attention layers disagree on state shapes {sorted(shapes)}"
        )
    (conv_shape, recurrent_shape), *_ = shapes or {((), ())}
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if not getattr(model, "_prefixtune_injected", None):
        model._prefixtune_injected = Injected(original, _install_hooks(model, places, bool(ordered), state_modules))
    head_dim = max(key_head_dim, value_head_dim)
    geometry = Geometry(
        len(ordered),
        kv_heads,
        head_dim,
        hidden_size,
        places,
        key_head_dim,
        value_head_dim,
        len(state_modules),
        conv_shape,
        recurrent_shape,
        tuple(layer_shapes) if len(set(layer_shapes)) > 1 else (),
        len(sources),
        _attention_input_size(model, ordered, hidden_size),
    )
    return geometry, KeyValuePath(model, ordered, kv_heads, head_dim, state_modules)


def _install_hooks(
    model: PreTrainedModel, places: dict[str, tuple[int, ...]], has_attention: bool, state_modules: list[nn.Module]
) -> list:
    """The hooks `inject` installs once per model (mask cache, position shift, state arguments), and
    the state layers' replacement forwards; `remove` undoes them."""
    hooks = [model.register_forward_pre_hook(new_mask_cache, with_kwargs=True)]
    # Decoder text follows its prefix (as with Li & Liang's past_key_values); encoder positions
    # stay put, as in the paper's BART, so an encoder prefix never moves the source text.
    decoder = model.get_decoder()
    if not has_attention:  # pure state-space models: no positions to shift
        pass
    elif model.config.is_encoder_decoder or counts_own_positions(decoder):
        hooks += shift_stack_positions(decoder, places["decoder"])
    else:
        hooks.append(model.register_forward_pre_hook(position_shifter(model), with_kwargs=True))
    _accept_prefix_in_generate(model)
    _expand_shared_rows_as_views(model)
    _slice_kv_shared_inputs_as_sdpa(model)
    install_state_layers(state_modules)
    hooks += carry_state_kwargs(model) if state_modules else []
    hooks += carry_to_mixers(model, state_modules)  # after carry_state_kwargs: it reads the base model's call
    return hooks


def _reused_key_values(calls: list[AttentionCall]) -> dict[nn.Module, nn.Module]:
    """Attention modules that attend to keys/values another module made (KV sharing: Gemma 3n and
    Gemma 4 hand later layers the very key/value tensors of an earlier layer) -> that module."""
    made_by: dict[int, nn.Module] = {}
    sources: dict[nn.Module, nn.Module] = {}
    for call in calls:
        source = made_by.get(id(call.key))
        if source is not None and source is not call.module:
            sources[call.module] = sources.get(source, source)
        else:
            made_by.setdefault(id(call.key), call.module)
    return sources


def _tag_windowed_layers(model: PreTrainedModel, modules: list[nn.Module]) -> None:
    """Tag sliding-window and chunked layers with their window or chunk size. Which layers' masks a
    window cuts is read from the model itself: a second probe with the window set to 1 token shows
    which layers hide the first token from the second (models differ: PhiMoE windows every layer
    without telling attention, Moshi's config has a window its masks never use). Chunked layers
    (Llama 4) are the ``chunked_attention`` entries of ``layer_types``."""
    config = model.config.get_text_config(decoder=True)
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None) or []
    windowed: set[int] = set()
    if window:
        config.sliding_window = 1
        try:
            windowed = {id(call.module) for call in _probe(model).calls if _hides_first_token(call.mask)}
        finally:
            config.sliding_window = window
    for module in modules:
        module.prefixtune_window = window if id(module) in windowed else None
        module.prefixtune_chunk = None
        if "chunked_attention" in layer_types:
            index = getattr(module, "layer_idx", None)
            if not isinstance(index, int) or not 0 <= index < len(layer_types):
                raise UnsupportedModelError(f"{model_kind(model)}: cannot tell which attention layers are chunked")
            module.prefixtune_chunk = chunk if layer_types[index] == "chunked_attention" else None


def _hides_first_token(mask: Tensor | None) -> bool:
    """Whether a probe's text mask keeps the second token from seeing the first."""
    if mask is None or mask.shape[-1] < 2 or mask.shape[-2] < 2:
        return False
    visible = mask[..., 1, 0] if mask.dtype == torch.bool else mask[..., 1, 0] == 0
    return not bool(visible.any())


def _refuse_own_attention(model: PreTrainedModel, calls: list[AttentionCall]) -> None:
    """Attention that does more than softmax(QK^T + mask)V over one key/value per token, which the
    prefix columns cannot follow: several calls per layer with values transformed in between
    (differential attention), or an additive mask computed from the content (dynamic masks)."""
    seen: set[int] = set()
    for call in calls:
        name = type(call.module).__name__
        if id(call.module) in seen:
            raise UnsupportedModelError(
                f"{model_kind(model)}: {name} calls attention more than once per layer (e.g. differential attention on "
                "halves of the values), so prefix keys/values put in front of each call would not combine as its text"
            )
        seen.add(id(call.module))
        mask = call.mask
        if mask is not None and mask.is_floating_point():
            blocked = torch.finfo(mask.dtype).min
            if bool(((mask != 0) & (mask != blocked) & torch.isfinite(mask)).any()):
                raise UnsupportedModelError(
                    f"{model_kind(model)}: {name} adds a content- or position-dependent bias to its attention mask, "
                    "which prefix columns would not get"
                )


def _key_value_shapes(
    model: PreTrainedModel, calls: list[AttentionCall], ordered: list[nn.Module]
) -> list[tuple[int, int, int]]:
    """Each layer's (kv_heads, key_head_dim, value_head_dim), with one key and value per token (a
    prefix slot stands for one token) and as many key heads as value heads."""
    kind = model_kind(model)
    shapes: dict[nn.Module, tuple[int, int, int]] = {}
    for call in calls:
        (_, kv_heads, _, key_head_dim), (_, value_heads, _, value_head_dim) = call.key.shape, call.value.shape
        if value_heads != kv_heads:
            raise UnsupportedModelError(f"{kind}: {kv_heads} key heads but {value_heads} value heads")
        refuse_pooled_keys(model, call, _probe_length(model, call))
        shapes.setdefault(call.module, (kv_heads, key_head_dim, value_head_dim))
    return [shapes[module] for module in ordered]


def _probe_length(model: PreTrainedModel, call: AttentionCall) -> int:
    """How many keys the probe's tokens give this call: 2 decoder tokens, or 3 source tokens."""
    return 3 if model.config.is_encoder_decoder and _place(model, call) in ("encoder", "cross") else 2


TAGS = (  # attributes inject puts on modules
    "prefixtune_layer",
    "prefixtune_place",
    "prefixtune_window",
    "prefixtune_chunk",
    "prefixtune_shift",
    "prefixtune_state_layer",
)


@dataclass
class Injected:
    """What `inject` changed on a model beyond `TAGS`, kept on it so `uninject` can undo it."""

    attn_implementation: str | None  # the model's own, before prefixtune's
    hooks: list[RemovableHandle]


def uninject(model: PreTrainedModel) -> None:
    """Undo `inject`: remove its hooks, module tags and linear-attention forwards, give `generate`
    back its own keyword check, and restore the model's own attention implementation."""
    injected = model.__dict__.pop("_prefixtune_injected", None)
    if not isinstance(injected, Injected):
        raise ValueError(f"{type(model).__name__} has no prefixtune injection to undo")
    for hook in injected.hooks:
        hook.remove()
    remove_state_layers(model)
    for module in model.modules():
        for tag in TAGS:
            module.__dict__.pop(tag, None)
    restore_validate_model_kwargs(model)
    restore_expand_inputs_for_generation(model)
    for module in kv_shared_slicers(model):
        restore_kv_shared_slicing(module)
    set_attn_implementation(model, injected.attn_implementation)
