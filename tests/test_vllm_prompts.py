"""The front end's half of the vLLM engine (`prefixtune.vllm.prompts`, `kv_files`): prompts with P
placeholders, content-hash salts, compiled prefix files, and the errors for bad requests. Needs no vLLM,
so it runs in the main environment too."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.serving import PrefixStore, StoreError
from prefixtune.vllm import (
    KV_FOLDER,
    KVFileError,
    VLLMPrefixError,
    VLLMPrefixes,
    content_hash,
    read_kv,
    write_kv,
)
from tiny import tiny_model, tiny_seq2seq


@pytest.fixture
def store(tmp_path):
    prefixed = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=6, parameterization="mlp"), name="six")
    prefixed.save_prefix(tmp_path / "six", "six")
    return PrefixStore(PrefixModel(prefixed.base_model, name=None), tmp_path)


def test_a_prefix_becomes_p_placeholders_before_the_prompt_salted_with_its_content_hash(store):
    prefixes = VLLMPrefixes(store, max_model_len=64, placeholder_id=3)
    prompt = prefixes.prepare("six", [11, 12, 13], max_tokens=4)
    key_values = store.snapshot("six")["prefix_key_values"]  # the mlp compiled to keys/values
    prefix_hash = content_hash(key_values)
    assert prompt.token_ids == [3] * 6 + [11, 12, 13] and prompt.prefix_length == 6
    assert prompt.cache_salt == f"prefixtune-{prefix_hash}"
    assert prompt.prompt() == {"prompt_token_ids": prompt.token_ids, "cache_salt": prompt.cache_salt}
    assert prompt.extra_args() == {"kv_transfer_params": {"prefixtune": {"prefix": prefix_hash, "length": 6}}}
    assert torch.equal(read_kv(prefixes.kv_folder, prefix_hash), key_values)
    assert prefixes.kv_folder == store.folder / KV_FOLDER and store.names() == ["six"]  # the store does not list it


def test_a_prompt_without_prefix_goes_to_vllm_unchanged(store):
    prefixes = VLLMPrefixes(store, max_model_len=64)
    for name in (None, "base"):
        prompt = prefixes.prepare(name, [11, 12], max_tokens=4)
        assert prompt.prompt() == {"prompt_token_ids": [11, 12]} and prompt.extra_args() is None


def test_a_replaced_prefix_gets_a_new_salt_and_the_old_version_stays_readable_while_admitted(store, tmp_path):
    prefixes = VLLMPrefixes(store, max_model_len=64)
    admitted = store.snapshot("six")  # what a request admitted before the replacement holds until it ends
    old = prefixes.prepare_snapshot(admitted, [11], max_tokens=1)
    other = PrefixModel(store.model.base_model, PrefixConfig(prefix_length=6, init_std=1.0), name="six")
    other.save_prefix(tmp_path / "upload", "six")
    assert prefixes.prepare("six", [11], max_tokens=1).cache_salt == old.cache_salt  # same version, same salt
    upload = tmp_path / "upload"
    store.upload("six", (upload / "prefix.safetensors").read_bytes(), (upload / "prefix_config.json").read_bytes())
    new = prefixes.prepare("six", [11], max_tokens=1)
    assert new.cache_salt != old.cache_salt
    old_hash = old.kv_transfer_params["prefixtune"]["prefix"]
    assert read_kv(prefixes.kv_folder, old_hash).shape[3] == 6  # an admitted request still reads its version
    del admitted
    gc.collect()
    assert (prefixes.kv_folder / f"{old_hash}.safetensors").exists()  # the prepared prompt holds it too
    del old
    gc.collect()
    assert not (prefixes.kv_folder / f"{old_hash}.safetensors").exists()  # its last request ended: removed
    assert read_kv(prefixes.kv_folder, new.kv_transfer_params["prefixtune"]["prefix"]).shape[3] == 6


def test_a_prepared_prompt_keeps_its_file_after_the_prefix_is_deleted_until_the_prompt_is_gone(store):
    prefixes = VLLMPrefixes(store, max_model_len=64)
    prompt = prefixes.prepare("six", [11, 12], max_tokens=2)  # LLM.generate may run it later
    path = prefixes.kv_folder / f"{prompt.kv_transfer_params['prefixtune']['prefix']}.safetensors"
    store.delete("six")
    gc.collect()
    assert path.exists()  # the connector can still read what the prompt names
    del prompt
    gc.collect()
    assert not path.exists()


def test_a_prefix_for_another_base_model_is_refused_by_its_fingerprint(store, tmp_path):
    stranger = PrefixModel(tiny_model("llama", seed=1), PrefixConfig(prefix_length=6), name="alien")
    stranger.save_prefix(store.folder / "alien", "alien")
    store.available.add("alien")
    with pytest.raises(StoreError, match="prefix belongs to a different base model; weights_sha256"):
        VLLMPrefixes(store, max_model_len=64).prepare("alien", [11], max_tokens=1)


def test_a_prefix_longer_than_the_models_window_is_refused_with_the_numbers(store):
    prefixes = VLLMPrefixes(store, max_model_len=12)
    expected = r"\(6 positions\) \+ prompt \(3 tokens\) \+ max_tokens \(4\) = 13 exceed .*window of 12 tokens"
    with pytest.raises(VLLMPrefixError, match=expected):
        prefixes.prepare("six", [11, 12, 13], max_tokens=4)
    assert prefixes.prepare("six", [11, 12, 13], max_tokens=3).prefix_length == 6  # exactly the window fits


def test_a_prefix_with_nothing_after_it_is_refused(store):
    with pytest.raises(VLLMPrefixError, match="at least one token after the prefix"):
        VLLMPrefixes(store, max_model_len=64).prepare("six", [], max_tokens=4)


def test_models_the_connector_cannot_serve_are_refused_by_name(tmp_path):
    encoder_decoder = PrefixStore(PrefixModel(tiny_seq2seq("bart"), name=None), tmp_path)
    with pytest.raises(VLLMPrefixError, match="cannot serve prefixes of this model: .*encoder-decoder"):
        VLLMPrefixes(encoder_decoder, max_model_len=64)


def test_a_compiled_prefix_file_is_checked_against_its_name(tmp_path):
    key_values = torch.randn(2, 2, 2, 5, 8)
    prefix_hash = write_kv(tmp_path, key_values)
    assert write_kv(tmp_path, key_values.clone()) == prefix_hash  # same content, same file
    assert torch.equal(read_kv(tmp_path, prefix_hash), key_values)
    save_file({"prefix_key_values": key_values + 1}, str(tmp_path / f"{prefix_hash}.safetensors"))
    with pytest.raises(KVFileError, match="expected one tensor 'prefix_key_values' stored as"):
        read_kv(tmp_path, prefix_hash)  # no hash in its metadata
    save_file(
        {"prefix_key_values": key_values + 1},
        str(tmp_path / f"{prefix_hash}.safetensors"),
        {"content_hash": prefix_hash},
    )
    with pytest.raises(KVFileError, match="content does not match its hash"):
        read_kv(tmp_path, prefix_hash)
    with pytest.raises(KVFileError, match="no compiled prefix of hash"):
        read_kv(tmp_path, "0" * 32)
    with pytest.raises(KVFileError, match="expected 32 lowercase hex digits, got '../x'"):
        read_kv(tmp_path, "../x")
