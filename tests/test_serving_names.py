"""One prefix-name rule (prefixtune.names) for add_prefix, load_prefix, the store, multi-task data and
the CLI; ``base`` (the server's bare model) can never be a prefix."""

from __future__ import annotations

import json

import pytest

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.data import DataError, read_examples
from prefixtune.names import PrefixNameError
from prefixtune.serving import PrefixStore, StoreError
from tiny import tiny_model

BAD = ["base", "", "../escape", "a..b", ".hidden", "v1.2", "x" * 65, "with space", "-dash-first"]


@pytest.mark.parametrize("name", BAD)
def test_every_entry_point_refuses_a_bad_name_with_the_rule(tmp_path, name):
    model = PrefixModel(tiny_model("llama"), name=None)
    with pytest.raises(PrefixNameError, match="invalid prefix name.*not 'base'"):
        model.add_prefix(name, PrefixConfig(prefix_length=2))
    saved = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=2), name="good").save_prefix(tmp_path / "p")
    if name:  # an empty name means "the saved one" for load_prefix
        with pytest.raises(PrefixNameError, match="invalid prefix name"):
            model.load_prefix(saved, name=name)
    with pytest.raises(StoreError, match="invalid prefix name"):
        PrefixStore(model, tmp_path / "store").upload(name, b"", b"")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b", "task": name}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'task' must be a (prefix name|non-empty string)"):
        read_examples(data, task_field="task")
    assert model.prefix_names == [] and [p.name for p in (tmp_path / "store").iterdir()] == []


def test_good_names_pass_everywhere(tmp_path):
    model = PrefixModel(tiny_model("llama"), name=None)
    for name in ("formal-blog", "v1_2-x", "Base", "baseline"):
        model.add_prefix(name, PrefixConfig(prefix_length=2))
    assert model.prefix_names == ["formal-blog", "v1_2-x", "Base", "baseline"]


def test_the_cli_reports_a_bad_prefix_name_as_a_user_error_naming_the_rule(tmp_path):
    from typer.testing import CliRunner

    from prefixtune.cli import app
    from tiny import tiny_tokenizer

    base, tokenizer = tiny_model("llama"), tiny_tokenizer()
    base.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    saved = PrefixModel(base, PrefixConfig(prefix_length=2), name="good").save_prefix(tmp_path / "p")
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tmp_path / "tiny"), "--prefix", f"base={saved}", "--prompt", "the food"]
    )
    assert result.exit_code == 2, result.output
    assert "invalid prefix name 'base'" in result.output and "Traceback" not in result.output
