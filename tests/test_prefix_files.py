"""Prefix files: compile keeps logits, save -> load keeps logits, bad files are refused clearly."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from prefixtune import PrefixConfig, PrefixFileError, PrefixModel
from prefixtune.config import ConfigError
from prefixtune.files import CONFIG_HASH_KEY, CONFIG_NAME, WEIGHTS_NAME
from tiny import TINY_CONFIGS, tiny_model

IDS = torch.tensor([[5, 9, 12, 30, 7]])


def logits(model: PrefixModel, prefix=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, prefix=prefix).logits


def tensor_bytes(folder) -> int:
    """Bytes of tensor data in a saved prefix: the file minus safetensors' 8-byte length and JSON header."""
    data = (folder / WEIGHTS_NAME).read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("parameterization", ["mlp", "hidden"])
def test_compile_prefix_keeps_logits_and_shrinks_the_file_to_the_key_values(parameterization, tmp_path):
    """Compiled, a prefix stores only its keys/values [layers, 2, kv_heads, P, head_dim]: far less than
    the MLP; for `hidden` ([layers, P, d_model]) it shrinks by 2 * kv_heads * head_dim / d_model, here
    1/2 on a grouped-query Llama with one KV head (SmolLM2: 2/3)."""
    config = TINY_CONFIGS["llama"]()
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = PrefixModel(
        base, PrefixConfig(prefix_length=5, parameterization=parameterization, init_std=0.5, mlp_hidden_size=64)
    )
    before = logits(model)
    model.save_prefix(tmp_path / "raw")
    model.compile_prefix()
    assert model.prefix_configs["default"].parameterization == "kv"
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    model.save_prefix(tmp_path / "compiled")

    g = model.geometry
    assert (g.num_layers, g.kv_heads, g.head_dim, g.hidden_size) == (2, 1, 8, 32)
    raw, compiled = tensor_bytes(tmp_path / "raw"), tensor_bytes(tmp_path / "compiled")
    assert compiled == 4 * g.num_layers * 2 * g.kv_heads * 5 * g.head_dim  # float32
    if parameterization == "mlp":
        assert compiled < raw / 4
    else:
        assert raw == 4 * g.num_layers * 5 * g.hidden_size
        assert compiled * g.hidden_size == raw * 2 * g.kv_heads * g.head_dim  # = raw / 2
    assert (tmp_path / "compiled" / WEIGHTS_NAME).stat().st_size < (tmp_path / "raw" / WEIGHTS_NAME).stat().st_size


@pytest.mark.parametrize("parameterization", ["kv", "mlp", "hidden"])
def test_save_load_round_trip_keeps_logits(parameterization, tmp_path):
    model = PrefixModel(
        tiny_model("qwen2"),
        PrefixConfig(prefix_length=4, parameterization=parameterization, init_std=0.5, mlp_hidden_size=16),
        name="task",
    )
    expected = logits(model)
    model.save_prefix(tmp_path / "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    loaded = PrefixModel.from_pretrained(tiny_model("qwen2"), tmp_path / "task")
    assert loaded.prefix_names == ["task"]
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)
    assert not logits(loaded).equal(loaded.base_model(input_ids=IDS).logits)

    loaded.load_prefix(tmp_path / "task", name="copy")
    torch.testing.assert_close(logits(loaded, "copy"), expected, atol=0, rtol=0)


@pytest.fixture
def saved(tmp_path):
    model = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=4))
    return model.save_prefix(tmp_path / "prefix")


def test_prefix_from_another_base_is_refused(saved):
    with pytest.raises(PrefixFileError, match="different base model.*weights_sha256"):
        PrefixModel.from_pretrained(tiny_model("llama", seed=1), saved)
    with pytest.raises(PrefixFileError, match="different base model.*model_type: prefix was trained on 'llama'"):
        PrefixModel.from_pretrained(tiny_model("qwen2"), saved)


def test_truncated_weights_are_refused(saved):
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(PrefixFileError, match=r"prefix\.safetensors: corrupt or truncated"):
        PrefixModel.from_pretrained(tiny_model("llama"), saved)


def test_pickle_in_place_of_weights_is_refused_not_executed(saved, tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (marker.touch, ())

    (saved / WEIGHTS_NAME).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(PrefixFileError, match="corrupt or truncated"):
        PrefixModel.from_pretrained(tiny_model("llama"), saved)
    assert not marker.exists()


def test_wrong_shape_is_refused(saved):
    config_hash = hashlib.sha256((saved / CONFIG_NAME).read_bytes()).hexdigest()
    save_file(
        {"prefix_key_values": torch.zeros(2, 2, 2, 6, 8)}, saved / WEIGHTS_NAME, metadata={CONFIG_HASH_KEY: config_hash}
    )
    with pytest.raises(
        PrefixFileError, match=r"'prefix_key_values' has shape \(2, 2, 2, 6, 8\), expected \(2, 2, 2, 4, 8\)"
    ):
        PrefixModel.from_pretrained(tiny_model("llama"), saved)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda text: text[: len(text) // 2], PrefixFileError, "not valid JSON"),
        (
            lambda text: json.dumps({**json.loads(text), "prefix_length": "4"}),
            PrefixFileError,
            "field 'prefix_length' missing or not int",
        ),
        # the file's "config" object is read as a PrefixConfig: its errors are the config's own
        (
            lambda text: json.dumps({**json.loads(text), "config": {"parameterization": "lora"}}),
            ConfigError,
            "parameterization: expected one of",
        ),
        (
            lambda text: json.dumps({**json.loads(text), "config": {"rank": 4}}),
            ConfigError,
            r"unknown prefix config field\(s\) \['rank'\]",
        ),
    ],
)
def test_bad_config_json_is_refused_with_the_file_and_field_named(saved, edit, error, message):
    path = saved / CONFIG_NAME
    path.write_text(edit(path.read_text()))
    with pytest.raises(error, match=message) as raised:
        PrefixModel.from_pretrained(tiny_model("llama"), saved)
    assert type(raised.value) is error and str(raised.value).startswith(str(path))


def test_weights_and_config_from_different_saves_are_refused(saved, tmp_path):
    other = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=4, init_std=2.0)).save_prefix(tmp_path / "b")
    (saved / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(PrefixFileError, match="come from different saves"):
        PrefixModel.from_pretrained(tiny_model("llama"), saved)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(PrefixFileError, match="no prefix config here"):
        PrefixModel.from_pretrained(tiny_model("llama"), tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_prefix_loadable(saved, monkeypatch):
    model = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=4, init_std=3.0))
    expected = PrefixModel.from_pretrained(tiny_model("llama"), saved).prefixes["default"].prefix_key_values

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("prefixtune.files.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_prefix(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    reloaded = PrefixModel.from_pretrained(tiny_model("llama"), saved).prefixes["default"].prefix_key_values
    assert torch.equal(reloaded, expected)
