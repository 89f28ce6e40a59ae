"""prefixtune's own calls into transformers and torch use no deprecated API: a forward, a training
step, `generate`, save/load and a hybrid model's text init (the cache path) raise no
FutureWarning/DeprecationWarning on a stack that passes through prefixtune's code, and log none of
transformers' "deprecated" warnings (how it announces renamed forward arguments, e.g.
``past_key_values`` -> ``cache``, removed in 5.40)."""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as transformers_logging

from architecture_walk import build
from prefixtune import PrefixConfig, PrefixModel
from tiny import tiny_model, tiny_seq2seq, tiny_tokenizer

SOURCES = str(Path(__file__).parents[1] / "src" / "prefixtune")
DEPRECATIONS = (DeprecationWarning, FutureWarning)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(f"{record.name}: {record.getMessage()}")


def deprecations_from_prefixtune(run) -> list[str]:
    """Run `run()` and return each deprecation it triggered from prefixtune's code: a warning whose
    stack at emission holds a frame of src/prefixtune, or a transformers log line saying "deprecated"."""
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, DEPRECATIONS):
            return
        ours = [frame for frame in traceback.extract_stack() if frame.filename.startswith(SOURCES)]
        if ours or filename.startswith(SOURCES):
            where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else f"{filename}:{lineno}"
            found.append(f"{category.__name__} via {where}: {message}")

    collector = _Collector()
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(collector)
    transformers_logging.warning_once.cache_clear()  # a warning logged earlier in the session logs again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored by catch_warnings
            run()
    finally:
        logger.removeHandler(collector)
    return found + collector.messages


def _train_generate_save_load(model: PrefixModel, tmp_path: Path, **inputs) -> None:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    loss = model(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"])).loss
    loss.backward()
    optimizer.step()
    model.eval()
    model.generate(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False)
    model.save_prefix(tmp_path / "prefix")
    model.load_prefix(tmp_path / "prefix", name="loaded")


@pytest.mark.parametrize("kind", ["llama", "t5", "qwen3_5_text"])
def test_prefixtune_code_triggers_no_deprecated_transformers_or_torch_api(tmp_path, kind):
    ids = torch.tensor([[5, 9, 12, 30]])

    def run() -> None:
        if kind == "t5":
            base, inputs = tiny_seq2seq("t5"), {"input_ids": ids, "decoder_input_ids": ids[:, :2]}
        elif kind == "qwen3_5_text":  # hybrid: the text init reads the states from a cache
            layout = {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
            base, inputs = build("qwen3_5_text", **layout), {"input_ids": ids}
        else:
            base, inputs = tiny_model(kind), {"input_ids": ids}
        config = PrefixConfig(prefix_length=None, init="activations", init_text="the cheap pub")
        model = PrefixModel(base, config, tokenizer=tiny_tokenizer())
        _train_generate_save_load(model, tmp_path, **inputs)

    found = deprecations_from_prefixtune(run)
    assert not found, "\n".join(found)


def test_the_check_sees_a_deprecated_argument_passed_by_prefixtune_code():
    """The check itself: transformers' log of the old cache argument name, and a FutureWarning
    raised on a stack through prefixtune, are both reported."""
    model = PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=2))

    def old_cache_name() -> None:
        model(input_ids=torch.tensor([[5, 9]]), past_key_values=None)

    assert any("past_key_values" in line for line in deprecations_from_prefixtune(old_cache_name))

    def warn_inside_a_forward() -> None:
        hook = model.base_model.register_forward_hook(lambda *_: warnings.warn("old", FutureWarning, stacklevel=2))
        try:
            model(input_ids=torch.tensor([[5, 9]]))
        finally:
            hook.remove()

    assert any("FutureWarning via" in line for line in deprecations_from_prefixtune(warn_inside_a_forward))
