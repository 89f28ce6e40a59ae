"""Hybrid linear-attention models (Qwen3-Next, Qwen3.5, OLMo Hybrid): a prefix gives each Gated DeltaNet layer an
initial state (conv + recurrent), so an `activations` prefix of text T acts exactly as T does:
batched with a different prefix (or none) per row, left-padded, in `generate`, through training,
checkpointing, save/load, `compile_prefix` and the micro-batch serving engine."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from architecture_walk import build, relative_error
from prefixtune import PrefixConfig, PrefixModel, UnsupportedModelError
from prefixtune import model as model_module
from prefixtune.data import PromptFormatter
from prefixtune.files import PrefixFileError
from prefixtune.serving import (
    BASE_NAME,
    BatchingEngine,
    ContinuousEngine,
    PrefixStore,
    Request,
    build_app,
    make_engine,
)
from tiny import SPECIAL, generated_alone, left_padded, tiny_model, tiny_tokenizer

MODEL_TYPES = ["qwen3_next", "qwen3_5_text", "olmo_hybrid", "lara_mini"]
# Two linear-attention layers around an attention layer; convolution kernel 4 (conv state: 3 columns).
LAYOUT = {"num_hidden_layers": 3, "layer_types": ["linear_attention", "full_attention", "linear_attention"]}
# Lara Mini: around a sliding-window layer (rotary positions, window 64) and a global one (no positions).
LAYOUTS = {
    "lara_mini": {
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "sliding_attention", "full_attention", "linear_attention"],
    }
}
TEXTS = {
    "long": " ".join(
        ["the restaurant near the river serves cheap french food"] * 8
    ),  # 72 tokens: two delta-rule chunks
    "mid": "a family friendly pub in the city centre",
    "short": "cheap food",  # 2 tokens, fewer than the conv state's 3 columns
}
ROWS = [[5, 9, 12, 30, 31, 33, 34], [7, 8], [11, 40, 41, 42, 43], [20, 21, 22], [23, 24, 25, 26]]
ROW_PREFIXES = ["long", "short", "", "mid", "long"]  # pads per row: 0, 5, 2, 4, 3
TOLERANCE = 1e-4


def text_ids(name: str) -> list[int]:
    return tiny_tokenizer()(TEXTS[name], add_special_tokens=False)["input_ids"] if name else []


def layout(model_type: str) -> dict:
    return LAYOUTS.get(model_type, LAYOUT)


def with_text_prefixes(base, parameterization: str = "kv") -> PrefixModel:
    """`base` with an `activations` prefix per text (also the Mamba-2 and short-conv tests' models)."""
    model = PrefixModel(base, name=None, tokenizer=tiny_tokenizer())
    for name, text in TEXTS.items():
        model.add_prefix(name, PrefixConfig(None, parameterization, init="activations", init_text=text))
    return model


def hybrid(model_type: str, parameterization: str = "kv", **overrides) -> PrefixModel:
    """A tiny hybrid with an `activations` prefix per text."""
    return with_text_prefixes(build(model_type, **layout(model_type) | overrides), parameterization)


def bare_logits(model: PrefixModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), model.disable_prefix():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_geometry_has_one_conv_and_recurrent_state_per_linear_attention_layer():
    model = hybrid("qwen3_next")
    geometry = model.geometry
    # tiny config: conv_dim = 2 * (2 key heads x 8) + 4 value heads x 8 = 64, kernel 4; heads 4 x 8 x 8
    assert (geometry.num_layers, geometry.state_layers) == (1, 2)
    assert geometry.conv_state_shape == (64, 3) and geometry.recurrent_state_shape == (4, 8, 8)
    prefix = model.prefixes["mid"]
    assert prefix.prefix_conv_states.shape == (2, 64, 3)
    assert prefix.prefix_recurrent_states.shape == (2, 4, 8, 8)
    assert prefix.prefix_recurrent_states.abs().max() > 0  # read from the model's cache after the text
    assert model.fingerprint["state_layers"] == 2 and model.fingerprint["conv_state_shape"] == [64, 3]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bare_hybrid_is_exact_under_left_padding(model_type):
    """The premise of the padded comparisons below: the bare model ignores left pads."""
    model = hybrid(model_type)
    full = [text_ids(p) + row for p, row in zip(ROW_PREFIXES, ROWS, strict=True)]
    with torch.no_grad(), model.disable_prefix():
        padded = model(**left_padded(full)).logits
    for i, ids in enumerate(full):
        assert relative_error(padded[i, padded.shape[1] - len(ids) :], bare_logits(model, ids)) <= TOLERANCE


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_activations_state_prefix_equals_its_text_per_row_left_padded(model_type, parameterization):
    """Mixed prefixes per row (long over two delta-rule chunks, shorter than the conv state, none),
    left-padded by 0..5 tokens, each row equal to the bare model on T + x."""
    model = hybrid(model_type, parameterization)
    assert_state_prefixes_equal_their_text(model)
    with torch.no_grad():
        unpadded = model(input_ids=torch.tensor([ROWS[0]]), prefix="long").logits[0]
    assert relative_error(unpadded, bare_logits(model, text_ids("long") + ROWS[0])[-len(ROWS[0]) :]) <= TOLERANCE


def assert_state_prefixes_equal_their_text(model: PrefixModel) -> None:
    """The left-padded rows, a prefix per row (`ROW_PREFIXES`), each equal to the bare model on its
    text + row; without the states (attention prefix only) the long row is off, well past the
    tolerance: the states matter (also the Mamba-1/2 and short-conv tests' check)."""
    with torch.no_grad():
        logits = model(**left_padded(ROWS), prefix=ROW_PREFIXES).logits
    for i, (name, row) in enumerate(zip(ROW_PREFIXES, ROWS, strict=True)):
        want = bare_logits(model, text_ids(name) + row)[-len(row) :]
        assert relative_error(logits[i, -len(row) :], want) <= TOLERANCE, (name, row)
    with torch.no_grad():
        inputs = model.prefix_inputs("long", 1)
        for key in ("prefix_conv_states", "prefix_recurrent_states"):
            inputs[key] = torch.zeros_like(inputs[key])
        without = model.base_model(input_ids=torch.tensor([ROWS[0]]), **inputs).logits[0]
    assert relative_error(without, logits[0]) > 10 * TOLERANCE


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_keeps_the_states_greedy_and_beam(model_type):
    """The prefill starts each linear layer from the row's prefix state; the cache then holds the
    state after prefix and text, so every generated token equals the bare model's on T + x."""
    assert_generate_equals_the_text_as_prompt(hybrid(model_type), max_new_tokens=6)


def assert_generate_equals_the_text_as_prompt(model: PrefixModel, max_new_tokens: int) -> None:
    """Greedy and beam `generate` over the left-padded rows, a prefix per row, equal the bare model's
    on each row's text + row (also the Mamba-2 and short-conv tests' check)."""
    options = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": SPECIAL["pad"],
        "eos_token_id": None,
    }
    for beams in (1, 2):
        batch = left_padded(ROWS)
        out = model.generate(**batch, prefix=ROW_PREFIXES, num_beams=beams, **options)[:, batch["input_ids"].shape[1] :]
        for i, (name, row) in enumerate(zip(ROW_PREFIXES, ROWS, strict=True)):
            ids = text_ids(name) + row
            with model.disable_prefix():
                want = model.generate(input_ids=torch.tensor([ids]), num_beams=beams, **options)[0, len(ids) :]
            assert out[i].tolist() == want.tolist(), (beams, name)


def test_vocab_and_random_inits_give_states_their_counterparts():
    """`vocab`: the state each layer reaches reading the init text's word embeddings (direct `kv`
    states equal what `hidden` computes from the same embeddings); `random`: small normal states."""
    model = PrefixModel(build("qwen3_next", **LAYOUT), name=None, tokenizer=tiny_tokenizer())
    for parameterization in ("kv", "hidden"):
        config = PrefixConfig(prefix_length=5, parameterization=parameterization, init="vocab", init_text=TEXTS["mid"])
        model.add_prefix(parameterization, config)
    with torch.no_grad():
        direct, computed = model.prefixes["kv"].states(model.kv_path), model.prefixes["hidden"].states(model.kv_path)
    for got, want in zip(direct, computed, strict=True):
        torch.testing.assert_close(got, want)
        assert want.abs().max() > 0
    random = model.add_prefix("random", PrefixConfig(prefix_length=5, init_std=0.02))
    assert 0 < random.prefix_recurrent_states.std() < 0.05 and 0 < random.prefix_conv_states.std() < 0.05


def served(engine: BatchingEngine, store: PrefixStore, jobs: list[tuple[list[int], str]], max_new_tokens: int) -> list:
    """The engine's results for (row, prefix name) requests submitted at once (`BASE_NAME`: none),
    started and closed here (also the Mamba-2 and per-layer geometry serving tests')."""
    engine.wait_seconds = 0.2
    engine.start()
    try:
        requests = [
            Request(row, name, max_new_tokens, prefix_inputs=None if name == BASE_NAME else store.snapshot(name))
            for row, name in jobs
        ]
        return [future.result(timeout=120) for future in [engine.submit(request) for request in requests]]
    finally:
        engine.close()


def step_gradients(make_base, parameterization: str) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss, prefix gradients) of one training step on the left-padded rows, from the same seed,
    without and with gradient checkpointing; the frozen base gets no gradient. Empty parameters
    (a state kind the model lacks) have none. Shared by the Mamba-2 and short-conv tests."""
    results = []
    for checkpointing in (False, True):
        base = make_base()
        torch.manual_seed(0)
        config = PrefixConfig(prefix_length=4, parameterization=parameterization, init_std=0.5)
        model = PrefixModel(base, config, tokenizer=tiny_tokenizer())
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        batch = left_padded(ROWS[:3])
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.prefixes["default"].named_parameters() if p.numel()}
        assert all(p.grad is None for p in base.parameters())
        results.append((loss.detach(), grads))
    return results


def assert_checkpointing_changes_nothing(results: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> None:
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_gradients_reach_the_state_prefixes_and_checkpointing_changes_nothing(parameterization):
    assert_gradients_reach_every_state_layer(lambda: build("qwen3_next", **LAYOUT), parameterization)


def test_a_training_forward_splits_the_states_by_layer_like_the_keys_values(monkeypatch):
    """Each state tensor is unbound once per training forward (a per-layer slice of the one tensor
    would fill its whole gradient in every state layer's backward); the gradients are unchanged."""
    seen = []
    original = model_module.split_by_layer
    monkeypatch.setattr(model_module, "split_by_layer", lambda per_row: seen.append(per_row.shape) or original(per_row))
    split = step_gradients(lambda: build("qwen3_next", **LAYOUT), "kv")[0]
    # per step (without, then with checkpointing): the attention layer's keys/values, each state kind (2 layers)
    assert [shape[1] for shape in seen] == [1, 2, 2] * 2
    monkeypatch.setattr(model_module, "split_by_layer", lambda per_row: per_row)  # each layer slices the tensor
    (loss, grads), ((expected_loss, expected_grads), _) = (
        split,
        step_gradients(lambda: build("qwen3_next", **LAYOUT), "kv"),
    )
    torch.testing.assert_close(loss, expected_loss, atol=0, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0)


def assert_gradients_reach_every_state_layer(
    make_base, parameterization: str, states: tuple[str, ...] = ("prefix_conv_states", "prefix_recurrent_states")
) -> None:
    """One training step (`step_gradients`) gives every state layer a gradient (`kv`: in each of
    `states`; `hidden`: in its inputs), the same with gradient checkpointing (also the Mamba-1/2 and
    short-conv tests' check)."""
    results = step_gradients(make_base, parameterization)
    (_, grads), _ = results
    for name in states if parameterization == "kv" else ("prefix_state_hidden",):
        assert (grads[name].flatten(1).abs().sum(-1) > 0).all(), name
    assert_checkpointing_changes_nothing(results)


def assert_compile_and_reload_keep_the_states(model: PrefixModel, fresh_base, path) -> None:
    """`model`'s `hidden` prefix "long" compiles to direct states with the same logits over the
    left-padded rows, and saved to `path` and loaded onto `fresh_base` gives the same states and
    logits (also the Mamba-1/2 and short-conv tests' check)."""
    batch = left_padded(ROWS)
    with torch.no_grad():
        before = model(**batch, prefix=ROW_PREFIXES).logits
        model.compile_prefix("long")
        assert model.prefix_configs["long"].parameterization == "kv"
        torch.testing.assert_close(model(**batch, prefix=ROW_PREFIXES).logits, before, atol=1e-5, rtol=0)
    model.save_prefix(path, name="long")
    again = PrefixModel.from_pretrained(fresh_base, path)
    for key in ("prefix_conv_states", "prefix_recurrent_states"):
        torch.testing.assert_close(again.prefixes["long"].state_dict()[key], model.prefixes["long"].state_dict()[key])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch, prefix="long").logits, model(**batch, prefix="long").logits)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compile_save_and_load_keep_the_states(tmp_path, model_type):
    """`hidden` compiles to direct states with the same logits; the file round-trips them and
    carries the state geometry in its fingerprint, so another geometry is refused by name."""
    model = hybrid(model_type, "hidden")
    assert_compile_and_reload_keep_the_states(model, build(model_type, **layout(model_type)), tmp_path / "long")
    other_kernel = build(model_type, **layout(model_type), linear_conv_kernel_dim=3)
    with pytest.raises(PrefixFileError, match="conv_state_shape: prefix was trained on \\[64, 3\\], this base has"):
        PrefixModel.from_pretrained(other_kernel, tmp_path / "long")


def test_mlp_prefix_and_peft_export_and_import_are_refused_with_the_reason(tmp_path):
    model = hybrid("qwen3_5_text")
    with pytest.raises(UnsupportedModelError, match="mlp parameterization maps to keys/values only.*'kv' or 'hidden'"):
        model.add_prefix("m", PrefixConfig(prefix_length=2, parameterization="mlp"))
    with pytest.raises(UnsupportedModelError, match="PEFT prefix-tuning adapter holds keys/values only"):
        model.save_prefix(tmp_path / "peft", name="mid", format="peft")
    assert not (tmp_path / "peft").exists()
    PrefixModel(tiny_model("llama"), PrefixConfig(prefix_length=2)).save_prefix(tmp_path / "llama", format="peft")
    with pytest.raises(UnsupportedModelError, match="qwen3_5_text: a PEFT prefix-tuning adapter holds keys/values"):
        model.load_prefix(tmp_path / "llama", name="theirs")
    assert "theirs" not in model.prefixes


def test_without_a_prefix_and_after_unload_the_linear_attention_layers_run_their_own_forward():
    base = build("qwen3_next", **LAYOUT)
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    modules = [m for m in base.modules() if type(m).__name__ == "Qwen3NextGatedDeltaNet"]
    model = PrefixModel(base, PrefixConfig(prefix_length=2))
    assert all("forward" in m.__dict__ for m in modules)
    with torch.no_grad(), model.disable_prefix():  # wrapped, without a prefix: the model's own forward
        assert torch.equal(model(input_ids=ids).logits, want)
    base = model.unload()
    assert all("forward" not in m.__dict__ and "prefixtune_state_layer" not in m.__dict__ for m in modules)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, want)


def test_hybrids_are_served_by_the_microbatch_engine_per_row_exactly(tmp_path):
    """`--engine auto` picks the micro-batch engine (the continuous one writes keys/values into a
    paged cache and has no place for a state, so it refuses with that reason); served rows with
    mixed prefixes equal `PrefixModel.generate` of each row alone, through the engine and over HTTP."""
    source = hybrid("qwen3_5_text")
    for name in ("mid", "short"):
        source.save_prefix(tmp_path / "store" / name, name=name)
    model = PrefixModel(build("qwen3_5_text", **LAYOUT), name=None, tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="not exact here: .*linear-attention"):
        ContinuousEngine(model, tiny_tokenizer())
    engine = make_engine(model, tiny_tokenizer(), engine="auto")
    store = PrefixStore(model, tmp_path / "store", exclusive=engine.exclusive)
    assert isinstance(engine, BatchingEngine)
    jobs = [(row, name) for row in ROWS[:3] for name in (BASE_NAME, "mid", "short")]
    results = served(engine, store, jobs, 5)
    assert engine.stats().batches < len(jobs)  # really batched, prefixes mixed
    held = source.prefixes["mid"]  # the store's budget counts the states too
    assert store.loaded["mid"].nbytes == sum(held.state_dict()[key].nbytes for key in held.state_dict())
    for (row, name), result in zip(jobs, results, strict=True):
        want = generated_alone(source, row, name, 5)
        assert result.token_ids == want, (row, name)

    app, server_engine, _ = build_app(build("qwen3_5_text", **LAYOUT), tiny_tokenizer(), tmp_path / "store")
    try:
        with TestClient(app) as client:
            assert client.get("/health").json()["engine"] == "microbatch"
            body = {"model": "mid", "prompt": "cheap food", "max_tokens": 4, "temperature": 0}
            text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    finally:
        server_engine.close()
    ids = PromptFormatter(tiny_tokenizer()).prompt_ids("cheap food")
    want = source.generate(input_ids=torch.tensor([ids]), prefix="mid", max_new_tokens=4, do_sample=False)
    assert text and text == tiny_tokenizer().decode(want[0, len(ids) :], skip_special_tokens=True)


def test_chunked_prefill_is_exact_or_refused_when_a_first_chunk_is_all_padding():
    """Chunked prefill (``prefill_chunk_size``) keeps the states when every row has a real token in
    the first chunk; a row that is all padding there would lose its conv state and see its recurrent
    state decay over pads in the next chunk, so it is refused with the reason."""
    model = hybrid("qwen3_5_text")
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": SPECIAL["pad"], "eos_token_id": None}
    options |= {"output_logits": True, "return_dict_in_generate": True}
    names = ["mid", "long"]
    close = left_padded([[5, 9, 12, 30, 31, 33], [7, 8, 10, 11]])  # 2 pads, chunks of 4
    whole = model.generate(**close, prefix=names, **options).logits[0]
    chunked = model.generate(**close, prefix=names, prefill_chunk_size=4, **options).logits[0]
    assert relative_error(chunked, whole) <= TOLERANCE
    far = left_padded([[5, 9, 12, 30, 31, 33, 34, 35, 36, 37, 38], [7, 8]])  # 9 pads: two chunks of pads
    with pytest.raises(UnsupportedModelError, match="all padding in the first prefill chunk"):
        model.generate(**far, prefix=names, prefill_chunk_size=4, **options)


def test_a_model_whose_linear_attention_forward_is_already_wrapped_is_refused_not_silently_unprefixed():
    """accelerate's offloading hooks replace a layer's forward on the instance; wrapping them would
    leave the prefix states unused (or weights on `meta`), so the model is refused, naming the layer."""
    base = build("qwen3_5_text", **LAYOUT)
    layer = base.model.layers[0].linear_attn
    layer.forward = layer.forward  # what accelerate's add_hook_to_module does first: an instance forward
    with pytest.raises(UnsupportedModelError, match=r"Qwen3_5GatedDeltaNet \(layer 0\).*offloading"):
        PrefixModel(base, name=None, tokenizer=tiny_tokenizer())


def test_a_hybrid_whose_state_layer_discovery_raises_is_refused_with_the_original_error(monkeypatch):
    """If transformers cannot build the model's cache layout (the place that says which layers carry
    a state), the model is refused naming its type and the original error, not served with key/value
    prefixes only (which would silently differ from its text)."""
    base = build("qwen3_5_text", **LAYOUT)

    def broken(*args, **kwargs):
        raise KeyError("layer_types[7] is not a known cache layer")

    monkeypatch.setattr("prefixtune.injection.states.DynamicCache", broken)
    with pytest.raises(UnsupportedModelError) as refused:
        PrefixModel(base, name=None, tokenizer=tiny_tokenizer())
    message = str(refused.value)
    assert "model_type='qwen3_5_text'" in message
    assert "KeyError" in message and "layer_types[7] is not a known cache layer" in message
    assert isinstance(refused.value.__cause__, KeyError)
