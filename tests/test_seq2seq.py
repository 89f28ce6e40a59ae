"""Encoder-decoder models (BART, T5): separate prefixes for encoder self-attention, decoder
self-attention and decoder cross-attention, with the decoder-only guarantees."""

from __future__ import annotations

import copy

import pytest
import torch

from prefixtune import PrefixConfig, PrefixFileError, PrefixModel
from prefixtune.config import PLACES
from prefixtune.initialization import init_token_ids, text_activations
from prefixtune.injection import PREFIX_KWARGS, Capture
from tiny import SEQ2SEQ, SPECIAL, tiny_seq2seq

SOURCE = [5, 9, 12, 30, 7]
TARGET = [2, 11, 40, 41]
INIT_TEXT = "the restaurant near the river serves cheap french food"


def forward_logits(model, source=SOURCE, target=TARGET, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([target]), **kwargs).logits


def attention_with_and_without_prefix(model: PrefixModel, place: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each attention module of `place` (in call order), during one prefixed forward: its output,
    and what the same module computes on the very same inputs without the prefix. So a difference is
    the prefix at that place, not a change upstream."""
    pairs = []

    def compare(module, args, kwargs, output) -> None:
        if kwargs.get("prefix_key_values") is None:  # a `hidden` prefix computing its keys/values
            return
        bare = module.forward(*args, **{key: value for key, value in kwargs.items() if key not in PREFIX_KWARGS})
        pairs.append((output[0], bare[0]))

    modules = [m for m in model.base_model.modules() if getattr(m, "prefixtune_place", None) == place]
    hooks = [module.register_forward_hook(compare, with_kwargs=True) for module in modules]
    try:
        forward_logits(model, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(pairs) == 2, f"{place}: expected the 2 attention layers of the tiny model, got {len(pairs)}"
    return pairs


@pytest.mark.parametrize("architecture", SEQ2SEQ)
def test_prefix_sizes_come_from_each_place(architecture):
    model = PrefixModel(tiny_seq2seq(architecture), PrefixConfig(prefix_length=4))
    assert model.geometry.places == {"encoder": (0, 1), "decoder": (2, 3), "cross": (4, 5)}
    assert model.trainable_parameters()[0].shape == (6, 2, 4, 4, 8)
    decoder_only = PrefixConfig(prefix_length=4, encoder=False, cross=False)
    model.add_prefix("decoder", decoder_only)
    assert model.prefixes["decoder"].prefix_key_values.shape == (2, 2, 4, 4, 8)


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_decoder_activation_prefix_equals_target_text_context_on_bart(parameterization, tokenizer):
    """T5 is left out on purpose: its prefix columns get no relative-position bias, so a prefix made of
    T's activations is not position-identical to T (see `test_t5_prefix_columns_get_no_position_bias`)."""
    model = tiny_seq2seq("bart")
    text = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    config = PrefixConfig(
        prefix_length=None,
        parameterization=parameterization,
        init="activations",
        init_text=INIT_TEXT,
        encoder=False,
        cross=False,
    )
    prefixed = PrefixModel(model, config, tokenizer=tokenizer)
    # The init read T on both sides, so the "same encoder input" is T.
    expected = forward_logits(model, source=text, target=text + TARGET)[:, len(text) :]
    got = forward_logits(prefixed, source=text)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (forward_logits(model, source=text) - expected).abs().max() > 1e-2


def vanishing_keys(model: PrefixModel, name: str, reference, sign: float = 1.0) -> None:
    """Give each covered layer prefix keys k with q.k = -1e4 for every query the reference model makes
    on this input (queries are fewer than head_dim, so k = -pinv(Q) @ 1 solves it exactly): softmax
    weight exp(-1e4) = 0."""
    capture = Capture()
    with torch.no_grad():
        reference(
            input_ids=torch.tensor([SOURCE]), decoder_input_ids=torch.tensor([TARGET]), prefixtune_capture=capture
        )
    queries = {call.module.prefixtune_layer: call.query[0] for call in capture.calls}
    prefix = model.prefixes[name]
    with torch.no_grad():
        for index, layer in enumerate(prefix.layers):
            for head, q in enumerate(queries[layer]):
                direction = -torch.linalg.pinv(q) @ torch.ones(q.shape[0])
                assert torch.allclose(q @ direction, -torch.ones(q.shape[0]), atol=1e-4)
                prefix.prefix_key_values[index, 0, head] = sign * 1e4 * direction


def bare_with_decoder_text_at(model, offset: int):
    """The bare model with decoder text at positions offset.. (BART's learned positions), as a decoder
    prefix of that length puts it; T5 has no absolute positions."""
    shifted = copy.deepcopy(model)
    embedding = getattr(shifted.get_decoder(), "embed_positions", None)
    if embedding is not None:
        with torch.no_grad():
            embedding.weight[:-offset] = embedding.weight[offset:].clone()
    return shifted


@pytest.mark.parametrize("architecture", SEQ2SEQ)
@pytest.mark.parametrize("place", PLACES)
def test_prefix_with_vanishing_attention_leaves_each_place_unchanged(architecture, place):
    model = tiny_seq2seq(architecture)
    only = {p: p == place for p in PLACES}
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=3, init_std=1.0, **only))
    reference = bare_with_decoder_text_at(model, 3) if place == "decoder" else model
    vanishing_keys(prefixed, "default", reference)
    # every attention layer of that place computes what it computes without the prefix ...
    for layer, (output, bare) in enumerate(attention_with_and_without_prefix(prefixed, place)):
        # T5's unscaled attention on a random model: sdpa's AVX512 kernels reorder the float32 sums once
        # prefix columns are added (2e-5 seen here, an AVX512-BF16/AMX CPU); the prefix's own effect is > 1e-3
        torch.testing.assert_close(output, bare, atol=1e-4, rtol=1e-5, msg=lambda m, layer=layer: f"layer {layer}: {m}")
    # ... and so does the whole model (decoder place: with its text at the positions after the prefix)
    # (1.4e-4 seen on T5 here, for the reason above; the prefix's own effect is > 1e-3)
    torch.testing.assert_close(forward_logits(prefixed), forward_logits(reference), atol=3e-4, rtol=1e-5)
    # the same prefix with attracting keys changes every layer of that place: the prefix is really there
    vanishing_keys(prefixed, "default", reference, sign=-1.0)
    for output, bare in attention_with_and_without_prefix(prefixed, place):
        assert (output - bare).abs().max() > 1e-3
    assert (forward_logits(prefixed) - forward_logits(model)).abs().max() > 1e-3


def three_prefixes(architecture: str) -> PrefixModel:
    model = PrefixModel(tiny_seq2seq(architecture), PrefixConfig(prefix_length=3, init_std=1.0), name="all")
    model.add_prefix(
        "decoder-side", PrefixConfig(prefix_length=6, parameterization="hidden", init_std=1.0, encoder=False)
    )
    model.add_prefix(
        "encoder-mlp",
        PrefixConfig(
            prefix_length=2, parameterization="mlp", init_std=1.0, mlp_hidden_size=16, decoder=False, cross=False
        ),
    )
    return model


SOURCES = [[5, 9, 12, 30, 7], [8, 13], [14, 15, 16, 17]]
NAMES = ["all", "decoder-side", "encoder-mlp"]


def right_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([row + [SPECIAL["pad"]] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
    }


@pytest.mark.parametrize("architecture", SEQ2SEQ)
def test_mixed_prefix_batch_equals_single_rows(architecture):
    model = three_prefixes(architecture)
    batch = right_padded(SOURCES)
    targets = torch.tensor([TARGET] * 3)
    for names in (NAMES, ["all", "", "decoder-side"]):
        with torch.no_grad():
            together = model(**batch, decoder_input_ids=targets, prefix=names).logits
        for i, (row, name) in enumerate(zip(SOURCES, names, strict=True)):
            alone = forward_logits(model, source=row, prefix=[name])
            torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-5)

    options = {
        "max_new_tokens": 6,
        "num_beams": 3,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": SPECIAL["pad"],
    }
    generated = model.generate(**batch, prefix=NAMES, **options)
    for i, (row, name) in enumerate(zip(SOURCES, NAMES, strict=True)):
        alone = model.generate(input_ids=torch.tensor([row]), prefix=name, **options)
        assert generated[i].tolist() == alone[0].tolist(), f"row {i} ({name})"
    bare = model.base_model.generate(**batch, **options)
    assert generated.tolist() != bare.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", SEQ2SEQ)
@pytest.mark.parametrize("parameterization", ["kv", "mlp", "hidden"])
@pytest.mark.parametrize("init", ["random", "vocab", "activations"])
def test_every_parameterization_and_init_works_on_all_three_places(architecture, parameterization, init, tokenizer):
    config = PrefixConfig(
        prefix_length=4,
        parameterization=parameterization,
        init=init,
        mlp_hidden_size=16,
        init_text=None if init == "random" else INIT_TEXT,
        init_std=0.5,
    )
    model = PrefixModel(tiny_seq2seq(architecture), config, tokenizer=tokenizer)
    prefix = model.prefixes["default"]
    assert prefix.layers == tuple(range(6))  # encoder (0, 1), decoder (2, 3), cross (4, 5)
    for place in ("encoder", "decoder", "cross"):
        for layer, (output, bare) in enumerate(attention_with_and_without_prefix(model, place)):
            assert torch.isfinite(output).all()
            assert (output - bare).abs().max() > 1e-4, f"{place} layer {layer}: the prefix changes nothing"
    if init == "activations":  # every place starts from the frozen model's own keys/values on the text
        token_ids = init_token_ids(tokenizer, INIT_TEXT, 4)
        sizes = model.geometry.kv_heads, model.geometry.head_dim
        target = text_activations(model.base_model, model.kv_path.attention_modules, token_ids, *sizes).key_values
        with torch.no_grad():
            got = prefix.key_values(model.kv_path)
        if parameterization == "mlp":  # fitted by regression, and reports how well (T5's big activations: poorly)
            error = ((got - target).norm() / target.norm()).item()
            assert error == pytest.approx(prefix.fit_report["relative_error"], rel=1e-4) and error < 1.0
        else:
            torch.testing.assert_close(got, target, atol=1e-4, rtol=1e-4)


def loss_and_gradients(model: PrefixModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    batch = right_padded(SOURCES)
    labels = torch.tensor([[11, 40, 41, SPECIAL["eos"]], [12, 13, -100, -100], [20, 21, 22, SPECIAL["eos"]]])
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.prefixes.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", SEQ2SEQ)
@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_training_changes_only_the_prefix_and_checkpointing_gives_the_same_gradients(architecture, parameterization):
    def make() -> PrefixModel:
        torch.manual_seed(3)
        config = PrefixConfig(prefix_length=3, parameterization=parameterization, init_std=0.5)
        return PrefixModel(tiny_seq2seq(architecture), config).train()

    plain, checkpointed = make(), make()
    checkpointed.gradient_checkpointing_enable()
    expected_loss, expected = loss_and_gradients(plain)
    loss, grads = loss_and_gradients(checkpointed)
    # T5's tiny config has large activations (loss ~20, gradients ~10): compare relative to scale.
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, grad in expected.items():
        scale = grad.abs().max()
        assert scale > 0
        torch.testing.assert_close(grads[name], grad, atol=2e-5 * scale.item(), rtol=1e-5)

    base_before = {name: p.detach().clone() for name, p in plain.base_model.named_parameters()}
    optimizer = torch.optim.AdamW(plain.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss_and_gradients(plain)
        assert all(p.grad is None for p in plain.base_model.parameters())
        optimizer.step()
    assert all(torch.equal(p, base_before[name]) for name, p in plain.base_model.named_parameters())


@pytest.mark.parametrize("architecture", SEQ2SEQ)
def test_save_load_keeps_logits_and_checks_the_base(architecture, tmp_path):
    model = three_prefixes(architecture)
    expected = {name: forward_logits(model, prefix=name) for name in NAMES}
    for name in NAMES:
        model.save_prefix(tmp_path / name, name)
    loaded = PrefixModel(tiny_seq2seq(architecture), name=None)
    for name in NAMES:
        loaded.load_prefix(tmp_path / name)
        torch.testing.assert_close(forward_logits(loaded, prefix=name), expected[name], atol=0, rtol=0)
    other = "t5" if architecture == "bart" else "bart"
    with pytest.raises(PrefixFileError, match="different base model"):
        PrefixModel.from_pretrained(tiny_seq2seq(other), tmp_path / "all")


def test_t5_prefix_columns_get_no_position_bias():
    """A T5 prefix is position-free: shifting where the text sits does not matter to it, and with
    prefix keys equal to zero vectors and values equal to zero it only rescales attention."""
    model = tiny_seq2seq("t5")
    prefixed = PrefixModel(model, PrefixConfig(prefix_length=2, encoder=True, decoder=False, cross=False))
    with torch.no_grad():
        prefixed.prefixes["default"].prefix_key_values.zero_()
    # Zero key -> score 0 + no bias; zero value -> adds nothing but weight exp(0) to the normaliser.
    # Compare with a manual computation on layer 0 of the encoder.
    capture = Capture()
    with torch.no_grad():
        model.get_encoder()(input_ids=torch.tensor([SOURCE]), prefixtune_capture=capture)
    call = capture.calls[0]
    attention = call.module
    bias = attention.compute_bias(len(SOURCE), len(SOURCE))
    scores = call.query @ call.key.transpose(-1, -2) + bias  # T5 does not scale scores
    top = scores.amax(-1, keepdim=True).clamp_min(0)
    # two prefix slots with score 0 (zero key, no bias) join the softmax's normaliser
    weights = (scores - top).exp() / ((scores - top).exp().sum(-1, keepdim=True) + 2 * (-top).exp())
    expected = weights @ call.value

    outputs = {}

    def keep(module, args, kwargs, output):
        outputs["attention"] = output[0]

    hook = attention.register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model.get_encoder()(input_ids=torch.tensor([SOURCE]), **prefixed.prefix_inputs(None, 1))
    hook.remove()
    expected = attention.o(expected.transpose(1, 2).reshape(1, len(SOURCE), -1))
    torch.testing.assert_close(outputs["attention"], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_seq2seq_prefix(tmp_path, tokenizer):
    import json

    from typer.testing import CliRunner

    from prefixtune.cli import app

    tiny_seq2seq("bart").save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    rows = [
        {"prompt": f"the {w} restaurant near the river", "completion": f"{w} restaurant"}
        for w in ("cheap", "expensive", "french", "italian", "chinese", "english", "indian", "good")
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tmp_path / "bart"),
            "--data",
            str(data),
            "--validation",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--eval-every",
            "4",
            "--lr",
            "3e-2",
            "--prefix-length",
            "4",
            "--no-encoder",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["trainable_parameters"] == 4 * 2 * 4 * 4 * 8  # decoder + cross layers only
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert losses[-1] < losses[0]
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "bart"),
            "--prefix",
            str(tmp_path / "run" / "prefix"),
            "--data",
            str(data),
            "--metrics",
            "rouge",
            "--max-new-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    generations = [json.loads(line) for line in (tmp_path / "run" / "eval-data" / "generations.jsonl").open()]
    # encoder-decoder outputs are all new tokens: nothing of the prompt is cut off or echoed
    assert all(g["generation"] and not g["generation"].startswith(g["prompt"]) for g in generations)
    metrics = json.loads((tmp_path / "run" / "eval-data" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"rouge1", "rouge2", "rougeL"}
