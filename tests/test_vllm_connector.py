"""prefixtune's vLLM connector on a tiny random Llama, in-process, float32: greedy vLLM outputs equal
`PrefixModel.generate`, the salt keeps prefixes apart, preemption keeps a prefix, bad prefixes fail
only their request. Runs in .venv-vllm (tests/test_vllm_suite.py runs it from the main suite)."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from prefixtune import PrefixConfig, PrefixModel  # noqa: E402
from prefixtune.serving import PrefixStore  # noqa: E402
from prefixtune.vllm import VLLMPrefixError, VLLMPrefixes, prefixed_prompt  # noqa: E402
from prefixtune.vllm.connector import kv_head_slice, prefix_params  # noqa: E402
from prefixtune.vllm.vllm_private import cache_refusal, worker_connector  # noqa: E402
from vllm_tiny import generate, reference, tiny_llama, vllm_engine  # noqa: E402

pytestmark = pytest.mark.slow
MAX_LEN = 192
BLOCK = 32  # the smallest CPU block: prefixes of 40 fill a whole block with placeholders


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(PrefixModel holding every prefix, VLLMPrefixes over a store of the same prefixes, model folder)."""
    root = tmp_path_factory.mktemp("vllm")
    model = tiny_llama(root / "model")
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=10, init_std=1.0), name="kv10")
    prefixed.add_prefix("mlp7", PrefixConfig(prefix_length=7, parameterization="mlp", mlp_hidden_size=32, init_std=1.0))
    prefixed.add_prefix("hidden5", PrefixConfig(prefix_length=5, parameterization="hidden", init_std=1.0))
    torch.manual_seed(1)
    prefixed.add_prefix("long_a", PrefixConfig(prefix_length=40, init_std=1.0))
    prefixed.add_prefix("long_b", PrefixConfig(prefix_length=40, init_std=1.0))
    for name in prefixed.prefix_names:
        prefixed.save_prefix(root / "store" / name, name)
    store = PrefixStore(PrefixModel(model, name=None), root / "store")
    return prefixed, VLLMPrefixes(store, max_model_len=MAX_LEN), root / "model"


@pytest.fixture(scope="module")
def llm(served):
    _, prefixes, folder = served
    with vllm_engine(
        folder, prefixes.kv_folder, skip_tokenizer_init=True, max_model_len=MAX_LEN, block_size=BLOCK
    ) as llm:
        yield llm


def test_mixed_prefixes_and_a_bare_row_in_one_batch_equal_prefix_model_generate(served, llm):
    prefixed, prefixes, _ = served
    rows = [
        ("kv10", [5, 6, 7, 8]),
        ("mlp7", [9, 10, 11]),
        (None, [12, 13, 14, 15, 16]),
        ("hidden5", [17]),
        ("kv10", [20, 21]),
    ]
    outputs = generate(llm, [prefixes.prepare(name, ids, 24) for name, ids in rows], 24)
    for (name, ids), output in zip(rows, outputs, strict=True):
        assert list(output.token_ids) == reference(prefixed, name, ids, 24), name
    assert len({tuple(output.token_ids) for output in outputs}) == len(rows)  # the prefixes do change the outputs


def test_the_salt_keeps_two_prefixes_behind_the_same_placeholders_apart(served, llm):
    prefixed, prefixes, _ = served
    ids = [30, 31, 32, 33, 34]
    a, b = prefixes.prepare("long_a", ids, 8), prefixes.prepare("long_b", ids, 8)
    assert a.token_ids == b.token_ids and a.cache_salt != b.cache_salt
    stats = worker_connector().stats
    for prompt, name in ((a, "long_a"), (b, "long_b")):
        before = stats["loaded_tokens"]
        (output,) = generate(llm, [prompt], 8)
        assert list(output.token_ids) == reference(prefixed, name, ids, 8)
        assert stats["loaded_tokens"] - before == 40  # b reused none of a's blocks
    before = stats["loaded_tokens"]
    (again,) = generate(llm, [b], 8)
    assert list(again.token_ids) == reference(prefixed, "long_b", ids, 8)
    assert stats["loaded_tokens"] - before == 40 - BLOCK  # b's own first block stayed cached under its salt

    # Without the salt, b would read a's block of placeholders: what the salt prevents.
    other_ids = [40, 41, 42]
    a_bare = replace(prefixes.prepare("long_a", other_ids, 8), cache_salt=None)
    b_bare = replace(prefixes.prepare("long_b", other_ids, 8), cache_salt=None)
    generate(llm, [a_bare], 8)
    before = stats["loaded_tokens"]
    (wrong,) = generate(llm, [b_bare], 8)
    assert stats["loaded_tokens"] - before == 40 - BLOCK  # b took a's first block
    assert list(wrong.token_ids) != reference(prefixed, "long_b", other_ids, 8)


def test_a_prefix_that_cannot_be_loaded_fails_its_request_and_the_engine_goes_on(served, llm):
    prefixed, prefixes, _ = served
    wrong_shape = torch.randn(3, 2, 2, 10, 32)  # three layers: a prefix for another base model
    bad = prefixed_prompt(wrong_shape, [5, 6], prefixes.kv_folder)
    good = prefixes.prepare("kv10", [5, 6, 7, 8], 12)
    failed, served_output = generate(llm, [bad, good], 12)
    assert failed.finish_reason == "error" and list(failed.token_ids) == []
    assert list(served_output.token_ids) == reference(prefixed, "kv10", [5, 6, 7, 8], 12)


def test_requests_preempted_and_resumed_keep_their_prefixes(served):
    prefixed, prefixes, folder = served
    rows = [(("kv10", "mlp7", None, "hidden5")[i % 4], [3 + i, 4 + i, 5 + i]) for i in range(8)]
    prompts = [prefixes.prepare(name, ids, 120) for name, ids in rows]
    options = {"skip_tokenizer_init": True, "max_model_len": MAX_LEN, "block_size": BLOCK}
    with vllm_engine(folder, prefixes.kv_folder, num_gpu_blocks_override=7, **options) as small:  # 7 x 32 slots
        outputs = generate(small, prompts, 120)
        preemptions = sum(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0
    for (name, ids), output in zip(rows, outputs, strict=True):
        assert list(output.token_ids) == reference(prefixed, name, ids, 120), name


def test_sampling_options_that_would_compute_the_placeholders_are_refused(served):
    _, prefixes, _ = served
    prompt = prefixes.prepare("kv10", [5, 6], 4)
    for option in ({"prompt_logprobs": 1}, {"repetition_penalty": 1.2}, {"skip_reading_prefix_cache": True}):
        with pytest.raises(VLLMPrefixError, match=f"{next(iter(option))}=.* not supported with a prefix"):
            prompt.sampling_params(max_tokens=4, **option)
    params = prompt.sampling_params(max_tokens=4, repetition_penalty=1.0, extra_args={"mine": 1})
    assert params.extra_args == {"mine": 1, "kv_transfer_params": prompt.kv_transfer_params}
    assert prefixes.prepare(None, [5, 6], 4).sampling_params(prompt_logprobs=1).prompt_logprobs == 1  # no prefix: fine


def test_kv_heads_are_split_across_tensor_parallel_ranks_as_vllm_splits_them():
    assert kv_head_slice(3, 0, 1) == slice(0, 3)
    assert [kv_head_slice(8, rank, 4) for rank in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    # fewer KV heads than ranks: each head replicated on consecutive ranks (QKVParallelLinear)
    assert [kv_head_slice(2, rank, 4) for rank in range(4)] == [slice(0, 1), slice(0, 1), slice(1, 2), slice(1, 2)]


def test_malformed_prefix_parameters_become_a_load_error_not_computed_placeholders():
    assert prefix_params(None, 5) == ("", 0, None)
    assert prefix_params({"other_connector": 1}, 5) == ("", 0, None)
    assert prefix_params({"prefixtune": {"prefix": "ab" * 16, "length": 3}}, 5) == ("ab" * 16, 3, None)
    prefix, length, error = prefix_params({"prefixtune": {"prefix": "ab" * 16, "length": 5}}, 5)
    assert length == 1 and "expected 1..4, got 5" in error
    assert "expected a content hash" in prefix_params({"prefixtune": {"prefix": 7, "length": 2}}, 5)[2]


def test_latent_and_hybrid_caches_are_refused_with_the_reason():
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )

    def config(*specs):
        groups = [KVCacheGroupSpec([f"layer{i}"], spec) for i, spec in enumerate(specs)]
        return KVCacheConfig(num_blocks=4, kv_cache_tensors=[], kv_cache_groups=groups)

    shape = {"block_size": 16, "num_kv_heads": 2, "head_size": 32, "dtype": torch.float32}
    full = FullAttentionSpec(**shape)
    assert cache_refusal(config(full)) is None
    assert "multi-head latent attention" in cache_refusal(config(MLAAttentionSpec(**shape)))
    assert "hybrid model: 2 KV cache groups" in cache_refusal(
        config(full, SlidingWindowSpec(**shape, sliding_window=8))
    )
    assert "sliding-window" in cache_refusal(config(FullAttentionSpec(**shape, sliding_window=8)))
