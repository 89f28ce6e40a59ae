"""Every private transformers API prefixtune uses is listed in `prefixtune.transformers_private` and
still there, one test each: a transformers upgrade that removes or reshapes one fails the test
named after it, saying what changed and why prefixtune needs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, Trainer
from transformers.modeling_layers import GradientCheckpointingLayer

from prefixtune.transformers_private import PRIVATE_APIS

SOURCES = Path(__file__).parents[1] / "src" / "prefixtune"
TRANSFORMERS_CLASSES = (PreTrainedModel, GenerationMixin, PretrainedConfig, Trainer, GradientCheckpointingLayer)


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: api.name)
def test_private_api_still_exists(api):
    problem = api.problem()
    assert problem is None, f"transformers changed a private API prefixtune uses: {problem}. Used for: {api.reason}"


def test_every_private_transformers_name_in_src_is_listed():
    """A private name of a transformers class used anywhere in src/ (attribute, override or string)
    must be in the list, with its reason; torch's own (nn.Module) private names do not count."""
    listed = {api.name.rpartition(".")[2].rpartition(":")[2] for api in PRIVATE_APIS}
    used: set[str] = set()
    for path in SOURCES.rglob("*.py"):
        if path.name != "transformers_private.py":
            used |= set(re.findall(r"[.\"' ](_[a-z]\w*)", path.read_text()))
    private = {
        name
        for name in used
        if any(hasattr(cls, name) for cls in TRANSFORMERS_CLASSES) and not hasattr(nn.Module, name)
    }
    assert "_save_checkpoint" in private  # the scan sees PrefixTrainer's overrides
    assert private <= listed, f"not listed in prefixtune/transformers_private.py: {sorted(private - listed)}"
