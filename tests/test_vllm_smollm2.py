"""The real SmolLM2-135M-Instruct in vLLM (float32, in-process) with prefixtune's connector: one batch of
prefixes of every parameterization and length, and a row without a prefix, token-identical to
`PrefixModel.generate`. Runs in .venv-vllm (tests/test_vllm_suite.py runs it from the main suite)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from prefixtune import PrefixConfig, PrefixModel, load_base_model  # noqa: E402
from prefixtune.serving import PrefixStore  # noqa: E402
from prefixtune.vllm import VLLMPrefixes, model_path  # noqa: E402
from tiny import needs_smollm2  # noqa: E402
from vllm_tiny import generate, reference, vllm_engine  # noqa: E402

pytestmark = [needs_smollm2, pytest.mark.slow]
MAX_LEN = 512
PREFIXES = {
    "french": PrefixConfig(prefix_length=None, init="activations", init_text="Answer only in French."),
    "mlp12": PrefixConfig(prefix_length=12, parameterization="mlp", init_std=0.5),
    "hidden": PrefixConfig(
        prefix_length=None,
        parameterization="hidden",
        init="activations",
        init_text="Write a short restaurant description from the table.",
    ),
}


def test_smollm2_batch_of_mixed_prefixes_and_a_bare_row_equals_prefix_model_generate(tmp_path):
    model, tokenizer = load_base_model("smollm2-135m", dtype="float32")  # vLLM runs float32 here
    prefixed = PrefixModel(model, name=None, tokenizer=tokenizer)
    for name, config in PREFIXES.items():
        prefixed.add_prefix(name, config)
        prefixed.save_prefix(tmp_path / name, name)
    lengths = {prefixed.prefixes[name].length for name in PREFIXES}
    assert len(lengths) == 3  # three different prefix lengths
    prefixes = VLLMPrefixes(PrefixStore(PrefixModel(model, name=None, tokenizer=tokenizer), tmp_path), MAX_LEN)
    rows = [
        ("french", "The capital of Italy is"),
        ("mlp12", "name[Alimentum], area[city centre], food[French]"),
        (None, "The capital of Italy is"),
        ("hidden", "name[The Eagle], eatType[coffee shop]"),
        ("french", "My favourite colour is"),
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in rows]
    prompts = [prefixes.prepare(name, row, 16) for (name, _), row in zip(rows, ids, strict=True)]
    with vllm_engine(model_path("smollm2-135m"), prefixes.kv_folder, max_model_len=MAX_LEN) as llm:
        outputs = generate(llm, prompts, 16)
    for (name, text), row, output in zip(rows, ids, outputs, strict=True):
        assert list(output.token_ids) == reference(prefixed, name, row, 16), (name, text, output.text)
    assert outputs[0].token_ids != outputs[2].token_ids  # the prefix changes what follows the same text
