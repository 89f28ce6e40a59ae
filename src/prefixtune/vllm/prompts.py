"""The front end's half of serving prefixes in vLLM: a prefix name and prompt ids become the prompt
vLLM runs (P placeholder ids, then the prompt), its ``cache_salt`` and the connector's parameters.

How it differs from the other engines: they hand a prefix's keys/values to the attention layers as
arguments; vLLM only takes token ids, so a prefix of length P stands as P placeholder ids whose cache
slots the connector (`connector.py`) fills with the prefix's keys/values instead of computing them.
The text then starts at position P, where `PrefixModel` puts it. The salt is the prefix's content
hash: vLLM's own prefix caching keeps a popular prefix's blocks across requests, and two prefixes
behind the same placeholder ids never share blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..model import PrefixModel
from ..names import BASE_NAME
from ..serving.continuous import continuous_refusal
from ..serving.store import PrefixStore
from .kv_files import write_kv
from .kv_folder import KVFolder

PARAMS_KEY = "prefixtune"  # kv_transfer_params = {"prefixtune": {"prefix": <hash>, "length": P}}
KV_FOLDER = ".vllm-kv"  # inside the store folder; hidden, so the store never lists it as a prefix
CONNECTOR_CLASS = "PrefixKVConnector"
CONNECTOR_MODULE = "prefixtune.vllm.connector"
# SamplingParams options a prefixed prompt must leave unset or at these values (PrefixedPrompt.sampling_params)
NEUTRAL_WITH_PREFIX = {
    "prompt_logprobs": None,
    "prompt_logprob_token_ids": None,
    "skip_reading_prefix_cache": False,
    "repetition_penalty": 1.0,
}


class VLLMPrefixError(ValueError):
    """A request or model the vLLM engine cannot serve (the message says why)."""


@dataclass(frozen=True)
class PrefixedPrompt:
    """What vLLM runs for one request: ``token_ids`` (P placeholders + the prompt's ids)."""

    token_ids: list[int]
    prefix_length: int  # P; 0: no prefix
    cache_salt: str | None  # the prefix's content hash (None: no prefix)
    kv_transfer_params: dict[str, Any] | None
    # the store snapshot the prefix's .vllm-kv file belongs to: held while this prompt lives, so a
    # delete/replace/evict in between cannot remove the file before vLLM's connector reads it
    holds: Any = field(default=None, repr=False, compare=False)

    def prompt(self) -> dict[str, Any]:
        """A ``vllm.inputs.TokensPrompt``: ``LLM.generate(prompt, ...)`` / ``AsyncLLM.generate(prompt, ...)``."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(self.token_ids)}
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        return prompt

    def extra_args(self) -> dict[str, Any] | None:
        """``SamplingParams(extra_args=...)``: vLLM hands ``kv_transfer_params`` to the connector."""
        return None if self.kv_transfer_params is None else {"kv_transfer_params": self.kv_transfer_params}

    def sampling_params(self, **options: Any) -> Any:
        """``vllm.SamplingParams(**options)`` carrying this prompt's `extra_args`, refusing what would read
        the placeholders as text: ``prompt_logprobs`` (vLLM then skips the prefix cache, the connector's
        load included, and computes the placeholders) and ``repetition_penalty`` (vLLM counts prompt
        tokens, placeholders included; `PrefixModel` counts only the text)."""
        from vllm import SamplingParams

        if self.prefix_length:
            refused = [key for key, neutral in NEUTRAL_WITH_PREFIX.items() if options.get(key) not in (None, neutral)]
            if refused:
                raise VLLMPrefixError(f"{refused[0]}={options[refused[0]]!r} is not supported with a prefix on vLLM")
        extra = (options.pop("extra_args", None) or {}) | (self.extra_args() or {})
        return SamplingParams(**options, extra_args=extra or None)


def vllm_refusal(model: PrefixModel) -> str | None:
    """Why vLLM cannot serve `model`'s prefixes exactly (None: it can). The connector writes plain keys/values
    at positions 0..P-1 of a paged cache, as the continuous engine does, so the same models are refused:
    encoder-decoders, latent attention, hybrid models, sliding windows, shifted positions."""
    return continuous_refusal(model)


def prefixed_prompt(
    key_values: Tensor | None,
    prompt_ids: Sequence[int],
    kv_folder: str | Path,
    placeholder_id: int = 0,
    prefix_hash: str | None = None,
) -> PrefixedPrompt:
    """The vLLM prompt for `prompt_ids` after the prefix `key_values` ``[layers, 2, kv_heads, P, head_dim]``
    (None: no prefix), writing the compiled prefix file to `kv_folder` if it is not there yet
    (`prefix_hash`: the hash a previous call returned for the same tensor, which skips hashing it again)."""
    prompt_ids = [int(token) for token in prompt_ids]
    if key_values is None:
        return PrefixedPrompt(prompt_ids, 0, None, None)
    if not prompt_ids:
        raise VLLMPrefixError("a prefixed prompt needs at least one token after the prefix (vLLM computes >= 1)")
    prefix_hash = prefix_hash or write_kv(kv_folder, key_values)
    length = key_values.shape[3]
    params = {PARAMS_KEY: {"prefix": prefix_hash, "length": length}}
    return PrefixedPrompt([placeholder_id] * length + prompt_ids, length, f"prefixtune-{prefix_hash}", params)


class VLLMPrefixes:
    """The prefixes of a `PrefixStore` as vLLM prompts (the store checks fingerprints and compiles
    `mlp`/`hidden` prefixes to keys/values; this writes each version's keys/values once)."""

    def __init__(self, store: PrefixStore, max_model_len: int, placeholder_id: int = 0) -> None:
        refusal = vllm_refusal(store.model)
        if refusal:
            raise VLLMPrefixError(f"the vLLM engine cannot serve prefixes of this model: {refusal}")
        self.store = store
        self.max_model_len = max_model_len
        self.placeholder_id = placeholder_id
        self.kv_folder = Path(store.folder) / KV_FOLDER
        self.kv = KVFolder(self.kv_folder)  # each snapshot's file, removed when the last of its content is gone

    def prepare(self, name: str | None, prompt_ids: Sequence[int], max_tokens: int = 0) -> PrefixedPrompt:
        """The prompt for `prompt_ids` after the store's prefix `name` (None or ``base``: no prefix);
        `max_tokens`: the tokens to generate, checked against the model's window with the prefix."""
        inputs = None if name in (None, BASE_NAME) else self.store.snapshot(name)
        return self.prepare_snapshot(inputs, prompt_ids, max_tokens, name)

    def prepare_snapshot(
        self,
        inputs: dict[str, Tensor] | None,
        prompt_ids: Sequence[int],
        max_tokens: int = 0,
        name: str | None = None,
    ) -> PrefixedPrompt:
        """As `prepare`, from a snapshot taken at admission (`PrefixStore.snapshot`; None: no prefix)."""
        return admitted_prompt(self.kv, inputs, prompt_ids, max_tokens, self.max_model_len, name, self.placeholder_id)


def admitted_prompt(
    kv: KVFolder,
    inputs: dict[str, Tensor] | None,
    prompt_ids: Sequence[int],
    max_tokens: int,
    max_model_len: int,
    name: str | None,
    placeholder_id: int = 0,
) -> PrefixedPrompt:
    """The prompt for `prompt_ids` after the admitted snapshot `inputs` of prefix `name` (None: no
    prefix), holding the snapshot, its file written once through `kv`; `VLLMPrefixError` when prefix +
    prompt + `max_tokens` exceed `max_model_len` (the placeholders count like prompt tokens)."""
    key_values = None if inputs is None else inputs["prefix_key_values"]  # [layers, 2, kv_heads, P, head_dim]
    length = 0 if key_values is None else key_values.shape[3]
    needed = length + len(prompt_ids) + max_tokens
    if needed > max_model_len:
        raise VLLMPrefixError(
            f"prefix {name!r} ({length} positions) + prompt ({len(prompt_ids)} tokens) + max_tokens "
            f"({max_tokens}) = {needed} exceed the model's window of {max_model_len} tokens (vLLM's max_model_len, "
            "--max-model-len)"
        )
    if key_values is None:
        return prefixed_prompt(None, prompt_ids, kv.folder)
    prefix_hash = kv.hash_of(key_values)  # written once per version, removed when its last snapshot goes
    prompt = prefixed_prompt(key_values, prompt_ids, kv.folder, placeholder_id, prefix_hash)
    return replace(prompt, holds=inputs)


def kv_transfer_config(kv_folder: str | Path, cached_prefixes: int = 64) -> Any:
    """The ``KVTransferConfig`` that loads prefixtune's connector into vLLM (``LLM(kv_transfer_config=...)``,
    ``AsyncEngineArgs(kv_transfer_config=...)``), reading compiled prefixes from `kv_folder`. A failed load
    fails its request (``kv_load_failure_policy="fail"``): placeholders are never computed as text.
    `cached_prefixes`: compiled prefixes each worker keeps on its device for requests that miss vLLM's
    prefix cache (least recently used dropped)."""
    from .vllm_private import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy="fail",
        kv_connector_extra_config={"kv_folder": str(kv_folder), "cached_prefixes": cached_prefixes},
    )
