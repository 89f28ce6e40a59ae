"""The connector's folder of compiled prefixes (`prefixtune.vllm.kv_folder`) holds a file exactly while a
snapshot of its content lives: deleted, replaced or evicted prefixes' files go once no admitted request
holds them, and start-up/shutdown clear stale files. Needs no vLLM (the engine's own use of it is
checked by tests/test_vllm_serving.py's server tests)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.serving import PrefixStore
from prefixtune.vllm import KV_FOLDER, content_hash, write_kv
from prefixtune.vllm.kv_folder import KVFolder
from tiny import tiny_model


def save(model: PrefixModel, folder: Path, name: str, seed: int) -> None:
    model.add_prefix(name, PrefixConfig(prefix_length=4, init_std=float(seed)))
    model.save_prefix(folder / name, name)
    model.delete_prefix(name)


@pytest.fixture
def served(tmp_path):
    """(store of prefixes "a" and "b", its KVFolder, a writer PrefixModel over the same base)."""
    writer = PrefixModel(tiny_model("llama"), name=None)
    for seed, name in enumerate("ab", start=1):
        save(writer, tmp_path, name, seed)
    store = PrefixStore(PrefixModel(writer.base_model, name=None), tmp_path)
    return store, KVFolder(tmp_path / KV_FOLDER), writer


def admit(store: PrefixStore, kv: KVFolder, name: str):
    """What the engine does on admission: the store's snapshot, its file written; returns (snapshot, hash)."""
    snapshot = store.snapshot(name)["prefix_key_values"]
    return snapshot, kv.hash_of(snapshot)


def test_a_deleted_prefix_file_goes_when_its_last_admitted_request_ends(served):
    store, kv, _ = served
    snapshot, prefix_hash = admit(store, kv, "a")
    _, other = admit(store, kv, "b")
    store.delete("a")
    gc.collect()
    assert [p.stem for p in kv.files()] == sorted([prefix_hash, other])  # still admitted: kept
    del snapshot
    gc.collect()
    assert [p.stem for p in kv.files()] == [other]


def test_a_replaced_prefix_keeps_the_old_file_for_admitted_requests_and_serves_the_new(served, tmp_path):
    store, kv, writer = served
    old_snapshot, old = admit(store, kv, "a")
    save(writer, tmp_path / "upload", "a", seed=7)
    upload = tmp_path / "upload" / "a"
    store.upload("a", (upload / "prefix.safetensors").read_bytes(), (upload / "prefix_config.json").read_bytes())
    new_snapshot, new = admit(store, kv, "a")
    assert new != old and {p.stem for p in kv.files()} == {old, new}
    del old_snapshot
    gc.collect()
    assert [p.stem for p in kv.files()] == [new]
    assert kv.hash_of(new_snapshot) == new  # known: not hashed or written again


def test_a_version_loaded_twice_keeps_its_file_until_both_snapshots_are_gone(served):
    store, kv, _ = served
    first, prefix_hash = admit(store, kv, "a")
    store.loaded.clear()  # evicted: the next request loads it again, a new tensor of the same content
    second, again = admit(store, kv, "a")
    assert again == prefix_hash and second is not first
    store.loaded.clear()
    del first
    gc.collect()
    assert [p.stem for p in kv.files()] == [prefix_hash]
    del second
    gc.collect()
    assert kv.files() == []


def test_clear_removes_stale_compiled_prefixes_and_unfinished_writes_only(served):
    store, kv, _ = served
    stale = write_kv(kv.folder, store.snapshot("b")["prefix_key_values"] + 1)  # a stopped server's file
    unfinished = kv.folder / f".{stale}.safetensors.x1y2.tmp"
    unfinished.write_bytes(b"half")
    keep = kv.folder / "notes.txt"
    keep.write_text("not ours")
    assert kv.clear() == 2
    assert kv.files() == [] and not unfinished.exists() and keep.exists()
    assert content_hash(store.snapshot("a")["prefix_key_values"]) == admit(store, kv, "a")[1]
