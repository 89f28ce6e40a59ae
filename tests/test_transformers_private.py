"""Every private transformers API prefixtune uses is listed in `prefixtune.transformers_private` and
still there, one test each: a transformers upgrade that removes or reshapes one fails the test
named after it, saying what changed and why prefixtune needs it. The guard (`private_api_scan`)
reads all of src/ and fails on any private use the list does not name."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from prefixtune.transformers_private import PRIVATE_APIS
from private_api_scan import private_uses, source_files, unregistered

REGISTERED = [api.name for api in PRIVATE_APIS]


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: api.name)
def test_private_api_still_exists(api):
    problem = api.problem()
    assert problem is None, f"transformers changed a private API prefixtune uses: {problem}. Used for: {api.reason}"


def test_every_private_transformers_use_in_src_is_listed():
    """Anywhere in src/: underscore attributes prefixtune does not define, overrides of a transformers
    class's underscore hooks, underscore names and internal modules imported from transformers."""
    uses = private_uses(source_files())
    names = {use.name for use in uses}
    # the scan sees each kind: an override, an internal import, an underscore attribute
    assert "transformers:Trainer._save_checkpoint" in names
    assert "transformers.integrations.sdpa_attention:sdpa_attention_forward" in names
    assert "._attn_implementation" in names
    missing = unregistered(source_files(), REGISTERED)
    assert not missing, "private transformers uses not listed in prefixtune/transformers_private.py:\n" + "\n".join(
        f"  {use.where}: {use.name}" for use in missing
    )


def test_the_guard_reports_an_unregistered_private_use():
    snippet = textwrap.dedent(
        """
        from transformers import Trainer, PreTrainedModel
        from transformers.cache_utils import DynamicLayer  # public: transformers.DynamicLayer
        from transformers.masking_utils import causal_mask_function
        from transformers.generation.continuous_batching import offloading_manager

        class MyTrainer(Trainer):
            def _inner_training_loop(self, *args, **kwargs):
                return super()._inner_training_loop(*args, **kwargs)

            def _my_own_helper(self):
                self._my_state = 1
                return self._my_state

        def read(model: PreTrainedModel):
            return model.config._experts_implementation, getattr(model, "_keep_in_fp32_modules", None)
        """
    )
    found = {(use.where, use.name) for use in unregistered({"snippet.py": snippet}, REGISTERED)}
    assert found == {
        ("snippet.py:4", "transformers.masking_utils:causal_mask_function"),
        ("snippet.py:5", "transformers.generation.continuous_batching.offloading_manager:"),
        ("snippet.py:8", "transformers:Trainer._inner_training_loop"),
        ("snippet.py:9", "transformers:Trainer._inner_training_loop"),
        ("snippet.py:16", "._experts_implementation"),
        ("snippet.py:16", "._keep_in_fp32_modules"),
    }
    # the same uses, once listed, pass
    listed = [*REGISTERED, "transformers.masking_utils:causal_mask_function"]
    listed += ["transformers:Trainer._inner_training_loop", "transformers:PretrainedConfig._experts_implementation"]
    listed += ["transformers.generation.continuous_batching.offloading_manager:OffloadingManager.x"]
    listed += ["transformers:PreTrainedModel._keep_in_fp32_modules"]
    assert unregistered({"snippet.py": snippet}, listed) == []


@pytest.mark.slow  # a subprocess
def test_import_prefixtune_does_not_need_model_family_internals():
    """A GPT-2 user's `import prefixtune` and prefix must not fail because a Gated-DeltaNet internal
    moved: here those modeling files cannot be imported and accelerate's hook helper and the
    linear-attention cache mixin are gone."""
    script = textwrap.dedent(
        """
        import sys
        for family in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini"):
            sys.modules[f"transformers.models.{family}.modeling_{family}"] = None  # import raises ImportError
        import transformers.integrations.accelerate as accelerate
        del accelerate.force_accelerate_hooks
        import torch
        import prefixtune
        from prefixtune import PrefixConfig, PrefixModel
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = PrefixModel(GPT2LMHeadModel(config), PrefixConfig(prefix_length=3, init="random"))
        ids = torch.tensor([[1, 2, 3]])
        with_prefix = model(input_ids=ids).logits
        with model.disable_prefix():
            bare = model(input_ids=ids).logits
        assert not torch.allclose(with_prefix, bare)
        print("ok", prefixtune.__version__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
