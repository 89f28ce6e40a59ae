"""The vLLM front end holds the base model once only where it must: after `VLLMEngine` takes the model,
the front end keeps the input embeddings (vLLM holds the rest), `kv` and `mlp` prefixes compile to the
same keys/values without loading anything, and the first `hidden` prefix loads the weights once.
The engine is never started here (vLLM is not run): these are the front end's own steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM: bash scripts/setup.sh --vllm, then .venv-vllm")

import prefixtune.vllm.front_base as front_base  # noqa: E402
from prefixtune import PrefixModel  # noqa: E402
from prefixtune.loading import load_base_model  # noqa: E402
from prefixtune.serving.store import PrefixStore  # noqa: E402
from prefixtune.serving.vllm_engine import VLLMEngine, VLLMSettings  # noqa: E402
from test_vllm_serving import PREFIXES, save_model_folder, write_prefix  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(front-end engine, its store, a store over a full base, the front end's load count)."""
    folder = save_model_folder(tmp_path / "model")
    store_folder = tmp_path / "store"
    for seed, (name, config) in enumerate(PREFIXES.items()):
        write_prefix(store_folder, name, config, seed)
    loads = []

    def counted(*args, **kwargs):
        loads.append(args)
        return load_base_model(*args, **kwargs)

    monkeypatch.setattr(front_base, "load_base_model", counted)
    settings = VLLMSettings(model=str(folder), kv_folder=str(store_folder / ".vllm-kv"))
    engine = VLLMEngine(PrefixModel(load_base_model(str(folder), "float32")[0], name=None), tiny_tokenizer(), settings)
    store = PrefixStore(engine.model, store_folder, exclusive=engine.exclusive)
    full = PrefixModel(load_base_model(str(folder), "float32")[0], name=None, tokenizer=tiny_tokenizer())
    return engine, store, PrefixStore(full, store_folder), loads


def test_the_front_end_keeps_only_the_input_embeddings_of_the_base(served):
    engine, _, full_store, _ = served
    base, full = engine.model.base_model, full_store.model.base_model
    embeddings = base.get_input_embeddings().weight
    held = front_base.held_bytes(base)
    buffers = sum(b.nbytes for b in base.buffers())
    assert held == embeddings.nbytes + buffers
    assert held < front_base.held_bytes(full) / 2  # the tiny model's embeddings are a big share: real ones less
    assert engine.model.fingerprint == full_store.model.fingerprint  # taken before the release
    assert all(p.device.type == "meta" for n, p in base.named_parameters() if p is not embeddings)


def test_kv_and_mlp_prefixes_compile_alike_without_loading_the_base(served):
    engine, store, full_store, loads = served
    for name in ("short-kv", "mid-mlp"):
        ours, theirs = store.snapshot(name), full_store.snapshot(name)
        assert torch.equal(ours["prefix_key_values"], theirs["prefix_key_values"]), name
    assert loads == [] and engine.base_loads == 0


def test_a_hidden_prefix_loads_the_base_once_and_compiles_alike(served):
    engine, store, full_store, loads = served
    ours = store.snapshot("long-hidden")["prefix_key_values"]
    assert torch.equal(ours, full_store.snapshot("long-hidden")["prefix_key_values"])
    assert len(loads) == 1 and engine.base_loads == 1
    store.loaded.clear()  # loaded again: the weights are there now
    assert torch.equal(store.snapshot("long-hidden")["prefix_key_values"], ours)
    assert len(loads) == 1 and engine.base_loads == 1
