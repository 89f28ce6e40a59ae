"""PEFT prefix-tuning adapters in and out: a PEFT adapter loaded into prefixtune gives PEFT's own
logits, a prefixtune prefix exported to PEFT gives ours in `PeftModel`, `prefixtune convert` round-
trips, and what PEFT cannot represent (or a mismatched adapter) is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from peft import CartridgeConfig, PeftModel, PrefixTuningConfig, get_peft_model
from typer.testing import CliRunner

from architecture_walk import build
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError, load_base_model
from prefixtune.cli import app
from prefixtune.files import PrefixFileError
from tiny import needs_smollm2, tiny_model, tiny_seq2seq, tiny_tokenizer

ATOL = 1e-5
TEXT = torch.tensor([[5, 9, 14, 3, 22, 7], [11, 4, 30, 8, 6, 19]])  # unpadded: PEFT has no per-row prefix mask
DECODER_TEXT = torch.tensor([[2, 12, 5], [2, 7, 7]])


def peft_adapter(base, tmp_path, task_type: str, projection: bool = False, length: int = 3):
    """A PEFT prefix-tuning model with random non-zero prefix parameters, saved to tmp_path/peft."""
    torch.manual_seed(1)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=length, prefix_projection=projection)
    )
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return model


def logits(model, seq2seq: bool) -> torch.Tensor:
    inputs = {"input_ids": TEXT} | ({"decoder_input_ids": DECODER_TEXT} if seq2seq else {})
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("architecture", "projection"), [("llama", False), ("gpt2", True)])
def test_a_peft_adapter_loaded_into_prefixtune_gives_peft_logits(tmp_path, architecture, projection):
    """GQA Llama (token_dim = kv_heads * head_dim) and GPT-2 with PEFT's MLP (its saved tensor is the MLP output)."""
    peft_model = peft_adapter(tiny_model(architecture), tmp_path, "CAUSAL_LM", projection)
    ours = PrefixModel.from_pretrained(tiny_model(architecture), tmp_path / "peft")
    assert ours.prefix_configs["default"].parameterization == "kv" and ours.prefixes["default"].length == 3
    expected = logits(peft_model, seq2seq=False)
    assert torch.allclose(logits(ours, seq2seq=False), expected, atol=ATOL)
    assert not torch.allclose(logits(tiny_model(architecture), seq2seq=False), expected, atol=1e-2)  # prefix matters


def test_a_peft_cartridge_loaded_into_prefixtune_gives_peft_logits_frozen_rows_included(tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(
        tiny_model("llama"), CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_frozen_tokens=1)
    )
    with torch.no_grad():
        for parameter in peft_model.prompt_encoder.parameters():  # the frozen row too: it must load as well
            parameter.normal_(0, 0.5)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    assert ours.prefixes["default"].length == 4
    expected = logits(peft_model, seq2seq=False)
    assert torch.allclose(logits(ours, seq2seq=False), expected, atol=ATOL)
    assert not torch.allclose(logits(tiny_model("llama"), seq2seq=False), expected, atol=1e-2)


@pytest.mark.parametrize(("architecture", "parameterization"), [("llama", "kv"), ("gpt2", "mlp"), ("llama", "hidden")])
def test_a_prefix_exported_to_peft_gives_our_logits_in_peft_model(tmp_path, architecture, parameterization):
    ours = PrefixModel(
        tiny_model(architecture), PrefixConfig(prefix_length=4, parameterization=parameterization, init_std=0.5)
    )
    path = ours.save_prefix(tmp_path / "peft", format="peft")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    peft_model = PeftModel.from_pretrained(tiny_model(architecture), path).eval()
    expected = logits(ours, seq2seq=False)
    assert torch.allclose(logits(peft_model, seq2seq=False), expected, atol=ATOL)
    assert not torch.allclose(logits(tiny_model(architecture), seq2seq=False), expected, atol=1e-2)


def test_encoder_decoder_both_ways_where_peft_applies_prefixes(tmp_path):
    """PEFT 0.21 prefixes only the decoder's self-attention of BART (layers i and i + L/2 alike)."""
    peft_model = peft_adapter(tiny_seq2seq("bart"), tmp_path, "SEQ_2_SEQ_LM")
    ours = PrefixModel.from_pretrained(tiny_seq2seq("bart"), tmp_path / "peft")
    config = ours.prefix_configs["default"]
    assert (config.encoder, config.decoder, config.cross) == (False, True, False)
    expected = logits(peft_model, seq2seq=True)
    assert torch.allclose(logits(ours, seq2seq=True), expected, atol=ATOL)
    assert not torch.allclose(logits(tiny_seq2seq("bart"), seq2seq=True), expected, atol=1e-2)

    again = ours.save_prefix(tmp_path / "out", format="peft")
    assert torch.allclose(
        logits(PeftModel.from_pretrained(tiny_seq2seq("bart"), again).eval(), True), expected, atol=ATOL
    )

    everywhere = PrefixModel(tiny_seq2seq("bart"), PrefixConfig(prefix_length=3, init_std=0.5))
    with pytest.raises(UnsupportedModelError, match="exactly the decoder's self-attention"):
        everywhere.save_prefix(tmp_path / "no", format="peft")
    decoder_only = PrefixModel(
        tiny_seq2seq("bart"), PrefixConfig(prefix_length=3, init_std=0.5, encoder=False, cross=False)
    )
    with pytest.raises(UnsupportedModelError, match="decoder layers 0 and 1 .* cannot represent it"):
        decoder_only.save_prefix(tmp_path / "no", format="peft")
    assert not (tmp_path / "no" / "adapter_model.safetensors").exists()


def test_a_peft_adapter_for_another_model_or_method_is_refused_naming_the_field(tmp_path):
    peft_adapter(tiny_model("gpt2"), tmp_path, "CAUSAL_LM")
    with pytest.raises(PrefixFileError, match=r"adapter_config\.json: field 'num_attention_heads' is 4, .* needs 2"):
        PrefixModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"peft_type": "LORA"}))
    with pytest.raises(PrefixFileError, match="peft_type 'LORA' is not a prefix-tuning or cartridge adapter"):
        PrefixModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft")
    config_file.write_text(json.dumps(config | {"num_virtual_tokens": 5}))
    with pytest.raises(PrefixFileError, match=r"'prompt_embeddings' has shape \(3, 128\), expected \(5, 128\)"):
        PrefixModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft")


def test_prefixtune_convert_round_trips_through_peft(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    ours = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=3, parameterization="mlp", init_std=0.5))
    ours.save_prefix(tmp_path / "ours")
    runner = CliRunner()
    for source, target, kind in (("ours", "peft", "peft"), ("peft", "back", "prefixtune")):
        result = runner.invoke(
            app, ["convert", str(tmp_path / source), str(tmp_path / target), "--to", kind, "--model", str(folder)]
        )
        assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    shown = ["generate", "--prompt", "name pub", "--prefix", f"theirs={tmp_path / 'peft'}", "--model", str(folder)]
    result = runner.invoke(app, [*shown, "--max-new-tokens", "3"])  # a PEFT folder works wherever ours does
    assert result.exit_code == 0 and "theirs" in result.output, result.output
    back = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path / "back")
    assert back.prefix_configs[back.active_prefix].parameterization == "kv"  # mlp compiled on the way
    assert torch.allclose(logits(back, seq2seq=False), logits(ours, seq2seq=False), atol=ATOL)
    result = runner.invoke(
        app, ["convert", str(tmp_path / "ours"), str(tmp_path / "peft"), "--to", "peft", "--model", str(folder)]
    )
    assert result.exit_code == 2 and "exists" in result.output  # never overwrites


def test_t5_relative_position_bias_models_are_refused_both_ways(tmp_path):
    """PEFT's cached prefix gets T5's position bias of positions 0..P-1, ours none: not the same model."""
    peft_adapter(tiny_seq2seq("t5"), tmp_path, "SEQ_2_SEQ_LM")
    with pytest.raises(UnsupportedModelError, match="t5: PEFT gives prefix positions a relative position bias"):
        PrefixModel.from_pretrained(tiny_seq2seq("t5"), tmp_path / "peft")
    ours = PrefixModel(tiny_seq2seq("t5"), PrefixConfig(prefix_length=3, encoder=False, cross=False))
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
        ours.save_prefix(tmp_path / "out", format="peft")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_peft_adapter_loads_to_the_same_logits(tmp_path):
    """The real GQA model (30 layers, 9 query / 3 KV heads): PEFT's adapter, its forward, our load."""
    peft_model = peft_adapter(load_base_model("smollm2-135m", dtype="float32")[0], tmp_path, "CAUSAL_LM", length=5)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (3, 192, 30)
    ours = PrefixModel.from_pretrained(load_base_model("smollm2-135m", dtype="float32")[0], tmp_path / "peft")
    assert torch.allclose(logits(ours, seq2seq=False), logits(peft_model, seq2seq=False), atol=ATOL)


def test_odd_layer_encoder_decoder_gives_every_decoder_layer_its_own_peft_slot(tmp_path):
    """With L = 3, PEFT's regrouping sends decoder layer i to slot 2i mod 3: all distinct, so any
    decoder self-attention prefix exports, and loads back to PEFT's logits."""
    from transformers import AutoModelForSeq2SeqLM

    from tiny import TINY_SEQ2SEQ_CONFIGS

    def bart3():
        torch.manual_seed(0)
        config = TINY_SEQ2SEQ_CONFIGS["bart"]()
        config.encoder_layers = config.decoder_layers = config.num_hidden_layers = 3
        return AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()

    ours = PrefixModel(bart3(), PrefixConfig(prefix_length=3, init_std=0.5, encoder=False, cross=False))
    path = ours.save_prefix(tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(bart3(), path).eval()
    assert torch.allclose(logits(peft_model, seq2seq=True), logits(ours, seq2seq=True), atol=ATOL)
    again = PrefixModel.from_pretrained(bart3(), path)
    assert torch.equal(again.prefixes["default"].prefix_key_values, ours.prefixes["default"].prefix_key_values)


def test_latent_attention_prefixes_are_refused_for_peft_with_the_reason(tmp_path):
    """PEFT's prompt_embeddings have one head size; MLA keys and values differ in theirs."""
    ours = PrefixModel(build("deepseek_v3"), PrefixConfig(prefix_length=3))
    with pytest.raises(UnsupportedModelError, match="keys of .* and values of .* per head"):
        ours.save_prefix(tmp_path / "out", format="peft")


def test_convert_to_an_unknown_format_is_a_one_line_user_error_not_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "x"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error: --to: expected 'peft' or 'prefixtune', got 'x'" in result.output
    assert "Traceback" not in result.output
