"""The connector's dispatch by attention backend (`vllm_private.CACHE_WRITERS`, `write_layer`) and its
tensor-parallel head slicing (`connector.local_key_values`, `write_prefix`), on CPU.

No GPU here: the GPU backends' kernels cannot run, so these tests check what can be checked honestly
without them: that every backend named has, in the installed vLLM's own source, the cache writer the
table says (read as text, since FlashInfer does not import without its package); that the dispatch
calls the real backend classes' own ``do_kv_cache_update`` with each worker's heads and the request's
slots (the classes are vLLM's, their writer is replaced by a recorder: the kernels are GPU-only); and
that other backends are refused by name. scripts/gpu_check.sh runs the kernels on a GPU.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from prefixtune.vllm.connector import PrefixKVConnector, local_key_values, write_prefix  # noqa: E402
from prefixtune.vllm.vllm_private import CACHE_WRITERS, backend_refusal, write_layer  # noqa: E402

IMPORTABLE_HERE = [name for name in CACHE_WRITERS if ".flashinfer." not in name]  # flashinfer needs its package
WRITER_SIGNATURE = ["self", "layer", "key", "value", "kv_cache", "slot_mapping"]


def vllm_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def writer_source(qualified: str) -> tuple[list[str], str]:
    """(argument names, source) of ``do_kv_cache_update`` in class `qualified` of the installed vLLM, read as text."""
    module, _, name = qualified.rpartition(".")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    (cls,) = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef) and node.name == name]
    (method,) = [node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "do_kv_cache_update"]
    return [arg.arg for arg in method.args.args], ast.get_source_segment(source, method)


@pytest.mark.parametrize("backend", list(CACHE_WRITERS))
def test_every_backend_named_has_the_cache_writer_the_table_says_in_the_installed_vllm(backend):
    arguments, source = writer_source(backend)
    assert arguments == WRITER_SIGNATURE  # what write_layer (and vLLM's unified_kv_cache_update) passes
    kernel = CACHE_WRITERS[backend].split()[0].removeprefix("ops.")
    assert kernel in source, f"{backend}.do_kv_cache_update no longer runs {kernel}"


class Recorder:
    """Stands in for a GPU kernel: records what the backend's ``do_kv_cache_update`` was given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def method(self):
        def do_kv_cache_update(impl, layer, key, value, kv_cache, slot_mapping) -> None:
            self.calls.append((impl, layer, key.clone(), value.clone(), kv_cache, slot_mapping.clone()))

        return do_kv_cache_update


def layer_of(backend: type, monkeypatch: pytest.MonkeyPatch) -> tuple[SimpleNamespace, Recorder]:
    """An attention layer whose impl is an instance of vLLM's class `backend` (not initialised: no GPU)."""
    recorder = Recorder()
    monkeypatch.setattr(backend, "do_kv_cache_update", recorder.method())
    return SimpleNamespace(impl=object.__new__(backend), kv_cache=torch.zeros(4)), recorder


@pytest.mark.parametrize("backend", IMPORTABLE_HERE)
def test_write_layer_calls_the_backends_own_writer_with_the_layer_cache_and_slots(backend, monkeypatch):
    layer, recorder = layer_of(vllm_class(backend), monkeypatch)
    key, value, slots = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([30, 31, 12])
    write_layer(layer, key, value, slots)
    ((impl, got_layer, got_key, got_value, kv_cache, got_slots),) = recorder.calls
    assert impl is layer.impl and got_layer is layer and kv_cache is layer.kv_cache
    assert torch.equal(got_key, key) and torch.equal(got_value, value) and torch.equal(got_slots, slots)


class HandWrittenImpl:
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        raise AssertionError("never called: not a backend the connector knows")


def test_other_backends_are_refused_by_name_subclasses_included(monkeypatch):
    from vllm.v1.attention.backends.flash_attn_diffkv import FlashAttentionDiffKVImpl

    for backend in (HandWrittenImpl, FlashAttentionDiffKVImpl):  # DiffKV lays out keys and values otherwise
        layer = SimpleNamespace(impl=object.__new__(backend), kv_cache=torch.zeros(4))
        name = f"{backend.__module__}.{backend.__qualname__}"
        with pytest.raises(ValueError, match=f"attention backend {name}: .* only through the cache writers of"):
            write_layer(layer, torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.tensor([0]))
    known, _ = layer_of(vllm_class(IMPORTABLE_HERE[0]), monkeypatch)
    assert backend_refusal({"a": known}) is None


def test_the_connector_refuses_an_unknown_backend_when_vllm_registers_its_caches():
    layer = SimpleNamespace(impl=HandWrittenImpl(), kv_cache=torch.zeros(4), kv_sharing_target_layer_name=None)
    config = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context={"model.layers.0.attn": layer}))
    with pytest.raises(ValueError, match="cannot serve prefixes here: attention backend .*HandWrittenImpl"):
        PrefixKVConnector.register_kv_caches(SimpleNamespace(_vllm_config=config), {})


@pytest.mark.parametrize(("world_size", "heads_of_rank"), [(1, [[0, 1, 2, 3]]), (2, [[0, 1], [2, 3]]), (8, [[0]] * 2)])
def test_each_tensor_parallel_worker_writes_its_own_kv_heads_into_the_requests_slots(
    world_size, heads_of_rank, monkeypatch
):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    prefix = torch.randn(2, 2, 4, 5, 8)  # [layers, 2, kv_heads, P, head_dim]: 4 KV heads
    first, recorder = layer_of(FlashAttentionImpl, monkeypatch)
    layers = {"model.layers.0.self_attn.attn": first, "model.layers.1.self_attn.attn": SimpleNamespace(**vars(first))}
    for rank, heads in enumerate(heads_of_rank):  # with 8 ranks, ranks 0 and 1 both hold head 0
        recorder.calls.clear()
        # positions 0-1 are in vLLM's prefix cache; 2, 3 go to block 7, position 4 to block 3 (4-token blocks)
        write_prefix(layers, local_key_values(prefix, rank, world_size), 2, 5, [7, 3], 4)
        assert [call[1] for call in recorder.calls] == list(layers.values())  # each layer once, its own cache
        for index, (_, _, key, value, _, slots) in enumerate(recorder.calls):
            assert slots.tolist() == [30, 31, 12]
            assert torch.equal(key, prefix[index, 0, heads, 2:5].transpose(0, 1))  # [tokens, local heads, hd]
            assert torch.equal(value, prefix[index, 1, heads, 2:5].transpose(0, 1))
