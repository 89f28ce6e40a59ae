"""One prompt format: a prefix trained with ``--chat-template`` or a custom ``--template`` gets the same
token ids from `serve`, `generate` and `eval` for the same prompt, exactly as in training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from prefixtune import loading
from prefixtune.cli import app as cli
from prefixtune.data import PromptFormatter
from prefixtune.serving import build_app
from tiny import tiny_model, tiny_tokenizer

CHAT = "{% for m in messages %}name {{ m.content }} eat {% endfor %}{% if add_generation_prompt %}food{% endif %}"
PROMPT = "cheap pub near the river"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("format")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT
    tiny_model("llama").save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rows = [{"prompt": f"cheap {w}", "completion": f"the {w} is good"} for w in ("pub", "food", "river", "city")]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "eval.jsonl").write_text(json.dumps({"prompt": PROMPT, "completion": "good"}) + "\n")
    for name, flags in {"chat": ["--chat-template"], "custom": ["--template", "restaurant {prompt} type"]}.items():
        result = CliRunner().invoke(
            cli,
            ["train", "--model", str(root / "tiny"), "--data", str(root / "data.jsonl"), "--output", str(root / name)]
            + ["--steps", "2", "--batch-size", "2", "--prefix-length", "3", "--warmup-steps", "0", *flags],
        )
        assert result.exit_code == 0, result.output
        shutil.copytree(root / name / "prefix", root / "store" / name)
    return root


def recording_loader(seen: list[list[int]]):
    """`load_base_model` whose model records the prompt ids of every prefill with a prefix (one row here)."""

    def load(spec: str, dtype=torch.float32, device=None):
        model, tokenizer = (
            loading.AutoModelForCausalLM.from_pretrained(spec),
            loading.AutoTokenizer.from_pretrained(spec),
        )
        tokenizer.padding_side = "left"

        def record(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 1 and kwargs.get("prefix_key_values") is not None:
                seen.append(ids[0].tolist())

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model.eval(), tokenizer

    return load


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chat", "custom"])
def test_serve_generate_and_eval_send_the_model_the_ids_training_used(workspace, monkeypatch, name):
    saved = json.loads((workspace / "store" / name / "prefix_config.json").read_text())["prompt_format"]
    tokenizer = loading.AutoTokenizer.from_pretrained(workspace / "tiny")
    trained = PromptFormatter.from_saved(tokenizer, saved).prompt_ids(PROMPT)  # what training fed the model
    assert saved["chat_template"] == (name == "chat")
    assert trained != PromptFormatter(tokenizer).prompt_ids(PROMPT)  # the format really differs from the default

    seen: list[list[int]] = []
    monkeypatch.setattr(loading, "load_base_model", recording_loader(seen))
    prefix = str(workspace / "store" / name)
    generate = CliRunner().invoke(
        cli, ["generate", "--model", str(workspace / "tiny"), "--prefix", prefix, "--prompt", PROMPT, "--no-bare"]
    )
    assert generate.exit_code == 0, generate.output
    evaluate = CliRunner().invoke(
        cli,
        ["eval", "--model", str(workspace / "tiny"), "--prefix", prefix, "--data", str(workspace / "eval.jsonl")]
        + ["--metrics", "chrf", "--max-new-tokens", "2", "--output", str(workspace / f"eval-{name}")],
    )
    assert evaluate.exit_code == 0, evaluate.output
    assert seen == [trained, trained]  # generate's prefill, then eval's

    base, _ = recording_loader([])(str(workspace / "tiny"))
    app, engine, _ = build_app(base, tokenizer, workspace / "store")
    submitted = []
    submit = engine.submit
    engine.submit = lambda request: submitted.append(request.prompt_ids) or submit(request)
    with TestClient(app) as client:
        completion = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        chat = client.post(
            "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": PROMPT}]}
        )
    engine.close()
    assert completion.status_code == 200 and chat.status_code == 200
    assert submitted == [trained, trained]
