"""Every part of `transformers` that prefixtune uses beyond its documented public API, in one place.

Each entry of `PRIVATE_APIS` names the object, says why prefixtune needs it, and how
`tests/test_transformers_private.py` checks it is still there (one test per entry: an upgrade that
removes or reshapes it fails a test that names it). Code reaches the private attributes through the
small accessors below, so a rename in transformers is fixed here once.

Tested range: see ``transformers`` in pyproject.toml and the README's "Supported versions" line.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class PrivateAPI:
    """One private (or internal, unexported) transformers object prefixtune depends on.

    ``parameters``: the arguments prefixtune passes or receives, checked against the signature;
    ``None`` for attributes that are not called. ``check``: for instance attributes, which a class
    lookup cannot see, a function that returns what is wrong (None: it holds)."""

    name: str  # "module:Object.attribute"
    reason: str
    parameters: tuple[str, ...] | None = None
    check: Callable[[], str | None] | None = None

    def resolve(self) -> Any:
        module_name, _, path = self.name.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in path.split("."):
            target = getattr(target, part)
        return target

    def problem(self) -> str | None:
        """Why this entry no longer holds in the installed transformers (None: it holds)."""
        if self.check is not None:
            return self.check()
        try:
            target = self.resolve()
        except (ImportError, AttributeError) as error:
            return f"{self.name} is gone ({error})"
        if self.parameters is None:
            return None
        accepted = inspect.signature(target).parameters
        missing = [name for name in self.parameters if name not in accepted]
        return f"{self.name} no longer takes {missing} (signature {inspect.signature(target)})" if missing else None


_TRAINER = "transformers:Trainer"
_DELTA_RULE_PARAMETERS = (
    *("query", "key", "value", "g", "beta"),
    *("initial_state", "output_final_state", "use_qk_l2norm_in_kernel"),
)
_CB = "transformers.generation.continuous_batching"


def _check_attn_implementation() -> str | None:
    from transformers import PretrainedConfig

    config = PretrainedConfig(attn_implementation="eager")
    found = getattr(config, "_attn_implementation", "<missing>")
    return None if found == "eager" else f"PretrainedConfig._attn_implementation is {found!r}, expected 'eager'"


def is_quantized(config: Any) -> bool:
    """Whether a quantizer prepared this model (it sets ``config._is_quantized``; Falcon-Mamba's and Jamba's
    mixers then compute their time step through ``dt_proj`` minus its bias, and ours does as they do)."""
    return hasattr(config, "_is_quantized")


def _check_quantized_flag() -> str | None:
    import inspect

    from transformers.quantizers import HfQuantizer

    if "config._is_quantized = True" in inspect.getsource(inspect.getmodule(HfQuantizer)):
        return None
    return "transformers.quantizers.base no longer sets config._is_quantized on a quantized model's modules"


def _check_checkpointing_function() -> str | None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    model = LlamaForCausalLM(config)
    enable_checkpointing(model, {"use_reentrant": True})
    layer = model.model.layers[0]
    if not reentrant_checkpointing(layer):
        return (
            "GradientCheckpointingLayer._gradient_checkpointing_func no longer records use_reentrant=True "
            f"(found {getattr(layer, '_gradient_checkpointing_func', '<missing>')!r})"
        )
    return None


def _check_output_router() -> str | None:
    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    router = OutputRouter()
    if not hasattr(router, "_lock") or not isinstance(getattr(router, "result_handlers", None), dict):
        return "OutputRouter no longer has `_lock` and a `result_handlers` dict"
    return None


def _check_request_position_offset() -> str | None:
    from dataclasses import fields

    from transformers.generation.continuous_batching.requests import RequestState

    if "position_offset" not in {field.name for field in fields(RequestState)}:
        return "RequestState has no `position_offset` field any more"
    return None


def _check_assigned(target: str, attribute: str, method: str = "__init__") -> Callable[[], str | None]:
    """A check that `target`'s `method` (``"module:Class"``) still sets this instance attribute."""

    def check() -> str | None:
        module_name, _, name = target.partition(":")
        source = inspect.getsource(getattr(getattr(importlib.import_module(module_name), name), method))
        assigned = re.search(rf"self\.{attribute}\s*[:=]", source)
        return None if assigned else f"{target}.{method} no longer sets `{attribute}`"

    return check


def _check_scheduler_mapping() -> str | None:
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler

    if not isinstance(SCHEDULER_MAPPING, dict) or SCHEDULER_MAPPING.get("fifo") is not FIFOScheduler:
        return "SCHEDULER_MAPPING is no longer a dict of scheduler classes by name (with 'fifo')"
    return None


def _check_base_streamer() -> str | None:
    from transformers.generation.streamers import BaseStreamer

    found = [list(inspect.signature(getattr(BaseStreamer, name)).parameters) for name in ("put", "end")]
    return None if found == [["self", "value"], ["self"]] else f"BaseStreamer.put/end take {found} now"


def _check_bart_offset() -> str | None:
    from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding

    if not isinstance(getattr(BartLearnedPositionalEmbedding(4, 2), "offset", None), int):
        return "BartLearnedPositionalEmbedding has no integer `offset` any more"
    return None


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "transformers:GenerationMixin._expand_inputs_for_generation",
        "beam search and num_return_sequences repeat every tensor input per beam (a copy); injection wraps it on "
        "the instance so a prefix shared by all rows (stride 0) stays one view, as the shared-prefix path needs",
        ("expand_size", "is_encoder_decoder", "input_ids", "model_kwargs"),
    ),
    PrivateAPI(
        "transformers:GenerationMixin._validate_model_kwargs",
        "`generate` refuses keyword arguments its forward signature does not name; injection wraps it on the "
        "instance so prefix_key_values / prefix_attention_mask pass (the attention function consumes them)",
        ("model_kwargs",),
    ),
    PrivateAPI(
        "transformers:PretrainedConfig._attn_implementation",
        "the model's current attention implementation has no public getter; injection reads it to pick "
        "prefixtune_sdpa / prefixtune_eager, and unload() restores it",
        check=_check_attn_implementation,
    ),
    PrivateAPI(
        "transformers.modeling_layers:GradientCheckpointingLayer._gradient_checkpointing_func",
        "the only place the checkpointing options live once enabled; PrefixModel refuses use_reentrant=True",
        check=_check_checkpointing_function,
    ),
    PrivateAPI(
        f"{_TRAINER}._save",
        "PrefixTrainer saves the prefix file, not the frozen base model",
        ("output_dir", "state_dict"),
    ),
    PrivateAPI(
        f"{_TRAINER}._save_checkpoint",
        "PrefixTrainer marks a checkpoint complete after Trainer wrote it (atomic resume)",
        ("model", "trial"),
    ),
    PrivateAPI(
        f"{_TRAINER}._get_output_dir",
        "where _save_checkpoint wrote, to put the completion marker beside it",
        ("trial",),
    ),
    PrivateAPI(
        f"{_TRAINER}._load_from_checkpoint",
        "--resume restores the prefix in place instead of loading a full model",
        ("resume_from_checkpoint", "model"),
    ),
    PrivateAPI(
        f"{_TRAINER}._load_best_model",
        "load_best_model_at_end restores the best prefix instead of loading a full model",
        (),
    ),
    PrivateAPI(
        f"{_TRAINER}._save_rng_state",
        "tests only (tests/train_process.py): a run killed in the middle of a checkpoint save",
        ("output_dir",),
    ),
    PrivateAPI(
        "transformers.integrations.sdpa_attention:sdpa_attention_forward",
        "internal, unexported: prefixtune_sdpa delegates to it after prepending the prefix",
        ("module", "query", "key", "value", "attention_mask"),
    ),
    PrivateAPI(
        "transformers.masking_utils:sdpa_mask",
        "internal: registered as prefixtune_sdpa's mask function, so padding masks are built",
    ),
    PrivateAPI(
        "transformers.masking_utils:eager_mask",
        "internal: registered as prefixtune_eager's mask function",
    ),
    *(
        PrivateAPI(
            f"transformers.models.{model_type}.modeling_{model_type}:eager_attention_forward",
            "internal convention (one per modeling file, some with softcapping): prefixtune_eager delegates to "
            f"the model's own; checked for the tested {model_type}",
            ("module", "query", "key", "value", "attention_mask"),
        )
        for model_type in ("gpt2", "llama", "qwen2", "opt", "gpt_neox", "bart", "t5")
    ),
    # The continuous-batching engine (serving/continuous.py) subclasses transformers' own, unforked:
    PrivateAPI(
        f"{_CB}.scheduler:FIFOScheduler._get_waiting_candidates",
        "PrefixScheduler writes each request's prefix keys/values into its paged blocks before its first prefill",
        (),
    ),
    PrivateAPI(
        f"{_CB}.cache:PagedAttentionCache.can_store_request_tokens",
        "allocates a request's blocks for its prefix slots (and says when the cache is full)",
        ("state", "request_len"),
    ),
    PrivateAPI(
        f"{_CB}.cache_allocators.cache_allocator:CacheAllocator.get_write_indices",
        "where in the paged cache a request's prefix slots go",
        ("request_id", "past_length", "query_length"),
    ),
    PrivateAPI(
        f"{_CB}.cache_allocators.full_attention:FullAttentionCacheAllocator.update",
        "writes the prefix keys/values into those slots",
        ("key_states", "value_states", "layer_idx"),
    ),
    PrivateAPI(
        f"{_CB}.model_runner:ModelRunner._sample",
        "PerRequestSampling samples each row by its own request's options (greedy, temperature, top-p, seed, logprobs)",
        ("scores", "output_ids"),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:ContinuousBatchingManager._create_batch_processor",
        "the hook where the prefix scheduler and per-request sampling are put in place",
        (),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:ContinuousBatchingManager.switch_to_cb_friendly_attn",
        "called when the manager is built; PrefixBatchingManager keeps the base on per-request paged attention",
        ("model", "auto_switch_to_flash"),
    ),
    PrivateAPI(
        f"{_CB}.cache:PagedAttentionCache.update",
        "gathers each request's keys/values after each other and sets cu_seq_lens_k to that layer's spans, "
        "which prefixtune_paged_sdpa reads",
        ("key_states", "value_states", "layer_idx", "kwargs"),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:ContinuousBatchingManager._generation_step",
        "a failed step fails only its own rows; the engine keeps serving",
        (),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:ContinuousBatchingManager._generation_loop_body",
        "skips the update of a step whose rows were failed",
        ("batch_processor", "bootstrapping"),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:OutputRouter._lock",
        "guards result_handlers, where each request's results are routed to the engine's own handler",
        check=_check_output_router,
    ),
    PrivateAPI(
        f"{_CB}.scheduler:SCHEDULER_MAPPING",
        "the scheduler registry (`scheduler_type` names): register_scheduler adds PrefixScheduler to it",
        check=_check_scheduler_mapping,
    ),
    PrivateAPI(
        f"{_CB}.requests:RequestState.position_offset",
        "where a request's positions start: PrefixScheduler starts them after the prefix it wrote (prefill_offset)",
        check=_check_request_position_offset,
    ),
    PrivateAPI(
        f"{_CB}.requests:GenerationOutput",
        "what the engine's result handler receives per request (request_id, generated_tokens, status, error)",
    ),
    PrivateAPI(f"{_CB}.requests:RequestStatus", "FAILED tells a failed request from a finished one"),
    PrivateAPI(
        f"{_CB}.cache:PagedAttentionCache.cache_allocators",
        "the paged cache's allocators, whose layers PrefixScheduler writes the prefix into (allocator_layers)",
        check=_check_assigned(f"{_CB}.cache:PagedAttentionCache", "cache_allocators"),
    ),
    PrivateAPI(
        f"{_CB}.cache_allocators.cache_allocator:CacheAllocator.layer_indices",
        "the model layers one allocator holds (allocator_layers)",
        check=_check_assigned(
            f"{_CB}.cache_allocators.cache_allocator:CacheAllocator", "layer_indices", "_before_cache_tensor_init"
        ),
    ),
    PrivateAPI(
        f"{_CB}.input_outputs:ContinuousBatchingIOs.requests_in_batch",
        "the rows of the step being run, in batch order: per-request sampling reads them, a failed step fails them",
        check=_check_assigned(f"{_CB}.input_outputs:ContinuousBatchingIOs", "requests_in_batch"),
    ),
    PrivateAPI(
        "transformers:ContinuousBatchingConfig",
        "public, but its options are renamed between minor releases: the ones ContinuousEngine passes",
        (
            *("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "allow_block_sharing"),
            *("use_async_batching", "use_cuda_graph", "scheduler_type", "auto_switch_to_flash", "safety_margin"),
        ),
    ),
    PrivateAPI(
        "transformers.generation.streamers:BaseStreamer",
        "documented, but only importable from its module: the micro-batch engine's per-row streamer subclasses it",
        check=_check_base_streamer,
    ),
    PrivateAPI(
        "transformers.cache_utils:LinearAttentionCacheLayerMixin",
        "internal: the cache layers that carry a recurrent/convolution state; find_state_layers refuses hybrid "
        "models with such layers of a kind it has no initial-state forward for (linear_attention_layers)",
    ),
    PrivateAPI(
        "transformers.trainer_pt_utils:get_length_grouped_indices",
        "internal: the order of Trainer's group_by_length sampler, which data.padding_fractions measures",
        ("lengths", "batch_size", "generator"),
    ),
    PrivateAPI(
        f"{_CB}.continuous_api:OutputRouter.fail_and_deliver",
        "delivers a failed row's error to its request alone",
        ("state", "error"),
    ),
    # Hybrid models' linear-attention layers (injection/states.py) run the modeling file's own functions:
    *(
        PrivateAPI(
            f"transformers.models.{model_type}.modeling_{model_type}:{function}",
            "internal, unexported: the initial-state forward of Gated DeltaNet layers calls the modeling file's own "
            f"{function} (or the kernel that replaces it), as the layer's own forward does",
            parameters,
        )
        for model_type in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid")
        for function, parameters in (
            ("apply_mask_to_padding_states", ("hidden_states", "attention_mask")),
            ("causal_conv1d_fn", ("hidden_states", "weight", "bias", "activation")),
            *(
                (rule, _DELTA_RULE_PARAMETERS)
                for rule in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
            ),
        )
    ),
    # Mamba-1 mixers (injection/mamba1_states.py): the same, from their modeling files.
    *(
        PrivateAPI(
            f"transformers.models.{model_type}.modeling_{model_type}:{function}",
            "internal, unexported: the initial-state forward of Mamba-1 mixers calls the modeling file's own "
            f"{function}, as the mixer's own forward does",
            parameters,
        )
        for model_type in ("mamba", "falcon_mamba", "jamba")
        for function, parameters in (
            ("apply_mask_to_padding_states", ("hidden_states", "attention_mask")),
            ("causal_conv1d_fn", ("hidden_states", "weight", "bias", "activation")),
        )
    ),
    PrivateAPI(
        "transformers.quantizers:HfQuantizer._is_quantized",  # the config attribute its preprocess_model sets
        "internal: Falcon-Mamba's and Jamba's mixers compute their time step another way on quantized models "
        "(config._is_quantized, set by the quantizer); their initial-state forward does as they do",
        check=_check_quantized_flag,
    ),
    PrivateAPI(
        "transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextGatedDeltaNet.fix_query_key_value_ordering",
        "internal: the initial-state forward splits Qwen3-Next's fused projection as the layer's own forward does",
        ("mixed_qkvz", "mixed_ba"),
    ),
    PrivateAPI(
        "transformers.integrations.accelerate:force_accelerate_hooks",
        "internal: the initial-state forward uses the conv weight directly, so it fires accelerate's hooks as the "
        "layer's own forward does",
        ("child_module_names",),
    ),
    PrivateAPI(
        "transformers.activations:ACT2FN",
        "internal: the Mamba-1 and Mamba-2 initial-state forwards apply the mixer's activation by the name its "
        "config gives, as the mixer's own forward does (same function, same rounding)",
    ),
    PrivateAPI(
        "transformers.integrations:get_available_reporting_integrations",
        "--report-to is checked when the options are made: which integrations are installed",
        (),
    ),
    PrivateAPI(
        "transformers.integrations.integration_utils:INTEGRATION_TO_CALLBACK",
        "--report-to is checked when the options are made: the names Trainer's report_to accepts",
    ),
    PrivateAPI(
        "transformers.models.gemma4.modeling_gemma4:Gemma4TextModel._maybe_slice_kv_shared_inputs",
        "internal: Gemma 4 sends only the last `logits_to_keep` queries through its KV-sharing layers, except "
        "under sdpa by name; injection makes prefixtune_sdpa take that exception too",
        ("causal_mask_mapping", "logits_to_keep", "cache"),
    ),
    PrivateAPI(
        "transformers.models.gemma4_unified.modeling_gemma4_unified:Gemma4UnifiedTextModel._maybe_slice_kv_shared_inputs",
        "internal: the same for Gemma 4 unified",
        ("causal_mask_mapping", "logits_to_keep", "cache"),
    ),
    PrivateAPI(
        "transformers:PreTrainedModel._supports_sdpa",
        "whether a model class runs on sdpa; the continuous engine (per-request sdpa) refuses those that do not",
    ),
    PrivateAPI(
        "transformers:PreTrainedModel._no_split_modules",
        "the decoder layer classes a model declares unsplittable; --fsdp wraps one FSDP unit per such layer",
    ),
    PrivateAPI(
        "transformers.models.bart.modeling_bart:BartLearnedPositionalEmbedding.offset",
        "internal: the index offset of BART's learned positions, which injection shifts per row",
        check=_check_bart_offset,
    ),
    PrivateAPI(
        "transformers.models.bart.modeling_bart:BartLearnedPositionalEmbedding.forward",
        "internal: BART-style decoders take no position ids, so injection recomputes this embedding per row "
        "from its `offset` and `position_ids`",
        ("position_ids",),
    ),
)


# ------------------------------------------------------------------------------------------- accessors
def attn_implementation(model: PreTrainedModel) -> str | None:
    """The model's current attention implementation (``config._attn_implementation``)."""
    return model.config._attn_implementation


def set_attn_implementation(model: PreTrainedModel, name: str | None) -> None:
    """``model.set_attn_implementation(name)``, then the same on sub-models that kept their own
    setting: before transformers 5.20 T5's encoder and decoder stacks (models with their own config
    copy) did not follow their parent."""
    model.set_attn_implementation(name)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and attn_implementation(module) != attn_implementation(model):
            module.set_attn_implementation(name)


def validate_model_kwargs(model: PreTrainedModel) -> Callable[[dict[str, Any]], None]:
    """`generate`'s check of model keyword arguments (``GenerationMixin._validate_model_kwargs``)."""
    return model._validate_model_kwargs


def override_validate_model_kwargs(model: PreTrainedModel, function: Callable[[dict[str, Any]], None]) -> None:
    """Replace that check on this instance only (the class keeps the original)."""
    model._validate_model_kwargs = function


def restore_validate_model_kwargs(model: PreTrainedModel) -> None:
    """Drop the instance's replacement, so the class's own check applies again."""
    model.__dict__.pop("_validate_model_kwargs", None)


def expand_inputs_for_generation(model: PreTrainedModel) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """`generate`'s expansion of its inputs per beam (``GenerationMixin._expand_inputs_for_generation``)."""
    return model._expand_inputs_for_generation


def override_expand_inputs_for_generation(model: PreTrainedModel, function: Callable[..., Any]) -> None:
    """Replace that expansion on this instance only (the class keeps the original)."""
    model._expand_inputs_for_generation = function


def restore_expand_inputs_for_generation(model: PreTrainedModel) -> None:
    """Drop the instance's replacement."""
    model.__dict__.pop("_expand_inputs_for_generation", None)


_KV_SHARED_SLICING = "_maybe_slice_kv_shared_inputs"


def kv_shared_slicers(model: PreTrainedModel) -> list[nn.Module]:
    """The modules that run only the last `logits_to_keep` queries through their KV-sharing layers
    (Gemma 4's ``_maybe_slice_kv_shared_inputs``)."""
    return [module for module in model.modules() if hasattr(type(module), _KV_SHARED_SLICING)]


def kv_shared_slicing(module: nn.Module) -> Callable[..., tuple]:
    """That module's slicing of its inputs before the KV-sharing layers."""
    return getattr(module, _KV_SHARED_SLICING)


def override_kv_shared_slicing(module: nn.Module, function: Callable[..., tuple]) -> None:
    """Replace that slicing on this instance only (the class keeps the original)."""
    module.__dict__[_KV_SHARED_SLICING] = function


def restore_kv_shared_slicing(module: nn.Module) -> None:
    """Drop the instance's replacement."""
    module.__dict__.pop(_KV_SHARED_SLICING, None)


def supports_sdpa(model: PreTrainedModel) -> bool:
    """Whether the model's class declares it runs on sdpa attention (``PreTrainedModel._supports_sdpa``)."""
    return bool(getattr(type(model), "_supports_sdpa", False))


def no_split_modules(model: PreTrainedModel) -> list[str]:
    """The layer class names the model says must not be split (``PreTrainedModel._no_split_modules``)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def reentrant_checkpointing(module: nn.Module) -> bool:
    """Whether `module` is checkpointed by transformers with ``use_reentrant=True``."""
    function = getattr(module, "_gradient_checkpointing_func", None)
    return bool(getattr(module, "gradient_checkpointing", False)) and bool(
        getattr(function, "keywords", {}).get("use_reentrant", False)
    )


def enable_checkpointing(model: PreTrainedModel, kwargs: dict[str, Any] | None) -> None:
    """``activation_checkpointing_enable`` (transformers >= 5.20), or its older name
    ``gradient_checkpointing_enable`` (public on both sides, but renamed within the supported range)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


# --------------------------------------------------------------------- continuous batching accessors
def register_scheduler(name: str, scheduler: type) -> None:
    """Make `scheduler` available as ``ContinuousBatchingConfig(scheduler_type=name)``."""
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    SCHEDULER_MAPPING[name] = scheduler


def prefill_offset(state: Any) -> int:
    """Where the request's next position starts (``RequestState.position_offset``; 0 before its first prefill)."""
    return state.position_offset


def set_prefill_offset(state: Any, offset: int) -> None:
    state.position_offset = offset


def allocator_layers(cache: Any) -> list[tuple[Any, list[int]]]:
    """Each allocator of a ``PagedAttentionCache`` with the model layers it holds."""
    return [(allocator, allocator.layer_indices) for allocator in cache.cache_allocators.values()]


def batch_requests(inputs_and_outputs: Any) -> list[Any]:
    """The ``FutureRequestState`` rows of the step being run, in batch order."""
    return inputs_and_outputs.requests_in_batch


def clear_batch_requests(inputs_and_outputs: Any) -> None:
    inputs_and_outputs.requests_in_batch = []


def add_result_handler(router: Any, request_id: str, handler: Callable, loop: Any) -> None:
    """Route the request's results to `handler` through `loop` (``OutputRouter.result_handlers``,
    under its ``_lock``): `register_result_handler` needs a running asyncio loop, the engine has none."""
    with router._lock:
        router.result_handlers[request_id] = (handler, loop)


# ----------------------------------------------------------- internals looked up where used (not at import)
def linear_attention_layers(layers: list[Any]) -> list[int]:
    """Indices of the cache layers that hold a recurrent/convolution state (``LinearAttentionCacheLayerMixin``)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return [index for index, layer in enumerate(layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]


def with_accelerate_hooks(*child_module_names: str) -> Callable[[Callable], Callable]:
    """``force_accelerate_hooks(names)``, looked up at the first call (not at import: only the
    Gated DeltaNet path uses it, a GPT-2 user must not depend on it)."""

    def decorate(function: Callable) -> Callable:
        wrapped: list[Callable] = []

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not wrapped:
                from transformers.integrations.accelerate import force_accelerate_hooks

                wrapped.append(force_accelerate_hooks(list(child_module_names))(function))
            return wrapped[0](*args, **kwargs)

        return call

    return decorate


def length_grouped_indices(lengths: list[int], batch_size: int, generator: Any = None) -> list[int]:
    """The order of ``Trainer``'s ``group_by_length`` sampler (``trainer_pt_utils.get_length_grouped_indices``)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, batch_size, generator=generator)
