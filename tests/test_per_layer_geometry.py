"""Per-layer prefix geometry: models whose layers differ in key/value heads or head sizes (Gemma 4:
sliding layers of two 8-wide heads, full layers of one 16-wide head; MiMo-V2-Flash: more heads on
some layers) get each layer's prefix in that layer's own shape (zero-padded to the largest, see
`Geometry`), and layers that reuse an earlier layer's keys/values (Gemma 3n / Gemma 4 KV sharing)
see that layer's prefix, as they see its text. So an `activations` prefix of text T acts exactly as T does:
batched with a different prefix (or none) per row, left-padded, in `generate`, through training,
`compile_prefix`, save/load and the micro-batch engine. Files of uniform models load as before."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from architecture_walk import build, check
from prefixtune import PrefixConfig, PrefixFileError, PrefixModel, UnsupportedModelError
from prefixtune.serving import BASE_NAME, BatchingEngine, ContinuousEngine, PrefixStore, make_engine
from test_hybrid_states import served
from tiny import SPECIAL, left_padded, tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FULL = {"head_dim": 16, "num_key_value_heads": 1}  # full-attention layers: fewer, wider heads
GEMMA4 = {
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "per_layer_config": {1: FULL, 3: FULL},
    "attention_k_eq_v": True,  # full layers' values come from the key projection (Gemma 4 31B)
}
SHARED = GEMMA4 | {"num_kv_shared_layers": 2}  # layers 2, 3 reuse layers 0, 1's keys/values
UNIFORM_SHARED = SHARED | {"per_layer_config": {}, "attention_k_eq_v": False}  # one shape, KV sharing
# Gemma 3n: one shape for all layers, layers 2, 3 reuse layers 0, 1's keys/values (its sizes are per layer)
GEMMA3N_SHARED = UNIFORM_SHARED | {"intermediate_size": [64] * 4, "activation_sparsity_pattern": [0.0] * 4}
TEXTS = {"long": "the restaurant near the river serves cheap french food", "short": "a family friendly pub"}
ROWS = [[5, 9, 12, 30], [7, 8, 11], [11, 40, 41, 42, 43], [20, 21]]
ROW_PREFIXES = ["long", "short", "", "long"]
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": SPECIAL["pad"], "eos_token_id": None}


def prefixed(layout: dict, parameterization: str = "kv", model_type: str = "gemma4_text") -> PrefixModel:
    """A tiny model with an `activations` prefix per text."""
    model = PrefixModel(build(model_type, **layout), name=None, tokenizer=tiny_tokenizer())
    for name, text in TEXTS.items():
        model.add_prefix(name, PrefixConfig(None, parameterization, init="activations", init_text=text))
    return model


def text_ids(name: str) -> list[int]:
    return tiny_tokenizer()(TEXTS[name], add_special_tokens=False)["input_ids"] if name else []


def test_geometry_has_each_layers_heads_and_sizes_and_reusing_layers_have_no_slice_of_their_own():
    model = PrefixModel(build("gemma4_text", **GEMMA4), name=None)
    g = model.geometry
    assert g.layer_shapes == ((2, 8, 8), (1, 16, 16), (2, 8, 8), (1, 16, 16))
    assert (g.num_layers, g.kv_heads, g.head_dim, g.reusing_layers) == (4, 2, 16, 0)
    assert model.fingerprint["layer_shapes"] == [[2, 8, 8], [1, 16, 16], [2, 8, 8], [1, 16, 16]]
    shared = PrefixModel(build("gemma4_text", **SHARED), name=None)
    g = shared.geometry
    assert (g.num_layers, g.layer_shapes, g.reusing_layers) == (2, ((2, 8, 8), (1, 16, 16)), 2)
    layers = [layer.self_attn for layer in shared.base_model.model.layers]
    assert [attention.prefixtune_layer for attention in layers] == [0, 1, 0, 1]
    assert shared.kv_path.attention_modules == layers[:2]
    uniform = PrefixModel(tiny_model("llama"), name=None)
    assert uniform.geometry.layer_shapes == () and "layer_shapes" not in uniform.fingerprint
    gemma3n = PrefixModel(build("gemma3n_text", **GEMMA3N_SHARED), name=None).geometry
    assert (gemma3n.num_layers, gemma3n.layer_shapes, gemma3n.reusing_layers) == (2, (), 2)


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize(
    ("model_type", "layout"),
    [
        ("gemma4_text", GEMMA4),
        ("gemma4_text", SHARED),
        ("gemma4_text", UNIFORM_SHARED),
        ("gemma4_text", SHARED | {"sliding_window": 3}),  # a window that cuts T off for every x token
        ("mimo_v2_flash", {}),
        ("gemma3n_text", GEMMA3N_SHARED | {"sliding_window": 3}),
    ],
    ids=["gemma4", "kv-shared", "uniform-kv-shared", "kv-shared-window-3", "mimo_v2_flash", "gemma3n-kv-shared"],
)
def test_activations_prefix_equals_its_text_per_row_left_padded(model_type, layout, parameterization):
    """The architecture walk's check (mixed prefixes and a row without one, left-padded, logits of T + x)."""
    outcome = check(model_type, parameterization, **layout)
    assert outcome.outcome == "exact" and not outcome.detail, outcome


def test_each_layers_prefix_is_zero_past_its_own_heads_and_sizes():
    model = prefixed(GEMMA4, "hidden")
    with torch.no_grad():
        key_values = model.prefixes["long"](model.kv_path)  # [layers, 2, kv_heads, P, head_dim]
    for layer, (heads, key_head_dim, value_head_dim) in enumerate(model.geometry.layer_shapes):
        padding = key_values[layer].clone()
        own = padding[0, :heads, :, :key_head_dim], padding[1, :heads, :, :value_head_dim]
        assert all(part.abs().min() > 0 for part in own), layer
        for part in own:
            part.zero_()
        assert not padding.any(), layer


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "layout"),
    [
        ("gemma4_text", GEMMA4),
        ("gemma4_text", SHARED),
        ("gemma4_text", SHARED | {"sliding_window": 3}),
        ("gemma3n_text", GEMMA3N_SHARED),
    ],
    ids=["gemma4", "kv-shared", "kv-shared-window-3", "gemma3n-kv-shared"],
)
def test_greedy_and_beam_generate_equal_the_text_as_a_prompt(model_type, layout):
    """`generate` runs Gemma 4's KV-sharing layers on the last token only, even in the prefill."""
    model = prefixed(layout, model_type=model_type)
    batch = left_padded(ROWS)
    for beams in (1, 2):
        out = model.generate(**batch, prefix=ROW_PREFIXES, num_beams=beams, **GREEDY)[:, batch["input_ids"].shape[1] :]
        for i, (name, row) in enumerate(zip(ROW_PREFIXES, ROWS, strict=True)):
            ids = text_ids(name) + row
            with model.disable_prefix():
                want = model.generate(input_ids=torch.tensor([ids]), num_beams=beams, **GREEDY)[0, len(ids) :]
            assert out[i].tolist() == want.tolist(), (beams, name)


@pytest.mark.parametrize("prefix", ["long", None], ids=["prefix", "bare"])
def test_kv_shared_layers_running_only_the_last_queries_match_the_full_forward(prefix):
    """Gemma 4 sends only the last `logits_to_keep` tokens through its KV-sharing layers, over all
    keys, and passes them no mask where there is no padding; the prefix path must see them as the
    last queries. Under plain sdpa it keeps every query instead where a layer has no mask and more
    than one logit is kept (or the cache is static), deciding by the implementation's name; an
    injected model (`prefixtune_sdpa`) must decide the same, or with no prefix (`disable_prefix`,
    the model's own sdpa) the kept queries align with the first keys. With a prefix and without, a
    forward keeping 3 logits, a static cache (whose prefill keeps 1) and prompt lookup (which
    verifies several tokens at once) then match the full forward and greedy."""
    model = prefixed(SHARED)
    ids = torch.tensor([[5, 9, 12, 5, 9, 12, 5, 9]])
    chosen = {"prefix": prefix} if prefix else {}
    scored = {**GREEDY, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad(), contextlib.nullcontext() if prefix else model.disable_prefix():
        full = model(input_ids=ids, **chosen).logits
        kept = model(input_ids=ids, logits_to_keep=3, **chosen).logits
        dynamic = model.generate(input_ids=ids, **chosen, **scored)
        static = model.generate(input_ids=ids, cache_implementation="static", **chosen, **scored)
        lookup = model.generate(input_ids=ids, prompt_lookup_num_tokens=3, **chosen, **GREEDY)
    torch.testing.assert_close(kept, full[:, -3:], atol=1e-5, rtol=1e-5)
    for step_static, step_dynamic in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(step_static, step_dynamic, atol=1e-4, rtol=1e-4)
    assert lookup.tolist() == dynamic.sequences.tolist() == static.sequences.tolist()


@pytest.mark.parametrize("parameterization", ["kv", "hidden", "mlp"])
def test_training_reaches_every_layer_and_checkpointing_changes_nothing(parameterization):
    results = []
    for checkpointing in (False, True):
        base = build("gemma4_text", **SHARED)
        torch.manual_seed(0)
        config = PrefixConfig(prefix_length=3, parameterization=parameterization, init_std=0.5, mlp_hidden_size=16)
        model = PrefixModel(base, config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        batch = left_padded(ROWS[:3])
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        results.append({name: p.grad.clone() for name, p in model.prefixes["default"].named_parameters()})
        assert all(p.grad is None for p in base.parameters())
    grads, grads_checkpointed = results
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    if parameterization == "kv":  # each layer's own entries learn, its zero padding gets no gradient
        used = model.geometry.used(model.prefixes["default"].layers).bool().expand_as(grads["prefix_key_values"])
        assert grads["prefix_key_values"][~used].abs().max() == 0
        assert all(grads["prefix_key_values"][layer][used[layer]].abs().sum() > 0 for layer in range(2))
    else:
        assert all(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("parameterization", ["hidden", "mlp"])
def test_compile_save_and_load_keep_the_logits_and_another_geometry_is_refused_by_name(tmp_path, parameterization):
    model = PrefixModel(build("gemma4_text", **SHARED), name=None)
    model.add_prefix("p", PrefixConfig(4, parameterization, init_std=0.5, mlp_hidden_size=16))
    batch = left_padded(ROWS)
    with torch.no_grad():
        before = model(**batch, prefix="p").logits
        model.compile_prefix("p")
        assert model.prefix_configs["p"].parameterization == "kv"
        torch.testing.assert_close(model(**batch, prefix="p").logits, before, atol=1e-5, rtol=0)
    model.save_prefix(tmp_path / "p", name="p")
    again = PrefixModel.from_pretrained(build("gemma4_text", **SHARED), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch, prefix="p").logits, before, atol=1e-5, rtol=0)
    wider = SHARED | {"per_layer_config": {1: FULL | {"head_dim": 32}, 3: FULL | {"head_dim": 32}}}
    with pytest.raises(PrefixFileError, match=r"layer_shapes: prefix was trained on \[\[2, 8, 8\], \[1, 16, 16\]\]"):
        PrefixModel.from_pretrained(build("gemma4_text", **wider), tmp_path / "p")


def test_a_prefix_file_written_before_per_layer_geometry_loads_unchanged():
    """``fixtures/prefix_v1_llama`` was written by prefixtune before this change (see its script)."""
    model = PrefixModel.from_pretrained(tiny_model("llama"), FIXTURES / "prefix_v1_llama")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 9, 12, 30, 7]])).logits[0, :, :8]
    want = torch.tensor(json.loads((FIXTURES / "prefix_v1_llama_logits.json").read_text()))
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("layout", "reason"),
    [(GEMMA4, "layers differ in key/value heads or head sizes"), (UNIFORM_SHARED, "reuse an earlier layer's")],
)
def test_peft_export_is_refused_with_the_reason(tmp_path, layout, reason):
    model = PrefixModel(build("gemma4_text", **layout), PrefixConfig(prefix_length=2))
    with pytest.raises(UnsupportedModelError, match=f"gemma4_text: .*{reason}.*cannot be converted"):
        model.save_prefix(tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize(
    ("layout", "reason"),
    [(GEMMA4, "different key/value heads or head sizes"), (UNIFORM_SHARED, "reuse an earlier layer's keys/values")],
)
def test_microbatch_engine_serves_mixed_prefixes_and_the_continuous_one_refuses_by_name(tmp_path, layout, reason):
    source = prefixed(layout)
    for name in TEXTS:
        source.save_prefix(tmp_path / "store" / name, name=name)
    model = PrefixModel(build("gemma4_text", **layout), name=None, tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match=f"not exact here: Gemma4ForCausalLM .*{reason}"):
        ContinuousEngine(model, tiny_tokenizer())
    store = PrefixStore(model, tmp_path / "store")
    engine = make_engine(model, tiny_tokenizer(), engine="auto")
    assert isinstance(engine, BatchingEngine)
    jobs = [(row, name) for row in ROWS[:3] for name in (BASE_NAME, *TEXTS)]
    results = served(engine, store, jobs, 5)
    assert engine.stats().batches < len(jobs)  # really batched, prefixes mixed
    for (row, name), result in zip(jobs, results, strict=True):
        options = GREEDY | {"max_new_tokens": 5, "eos_token_id": SPECIAL["eos"]}
        prefix = ["" if name == BASE_NAME else name]
        want = source.generate(input_ids=torch.tensor([row]), prefix=prefix, **options)[0, len(row) :].tolist()
        want = want[: want.index(SPECIAL["eos"])] if SPECIAL["eos"] in want else want
        assert result.token_ids == want, (row, name)
