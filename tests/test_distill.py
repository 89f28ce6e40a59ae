"""Context distillation (`prefixtune distill`) on a tiny model: exactness of a whole-context prefix,
the top-k KL, self-study data and its cache, training, the output folder, bad input, and serving."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import prefixtune
from prefixtune import PrefixConfig, PrefixModel, load_base_model
from prefixtune.cli import app
from prefixtune.config import ConfigError
from prefixtune.data import DataError, PromptFormatter, pad_batch
from prefixtune.distillation import DistillOptions, selfstudy
from prefixtune.distillation.context import load_context
from prefixtune.distillation.loss import context_weights, full_kl, teacher_topk, topk_kl, topk_kl_per_position
from prefixtune.distillation.prefixes import TEACHER, add_prefix_from_ids, add_teacher
from prefixtune.distillation.run import work_folder
from prefixtune.distillation.selfstudy import Sample, StudySettings, attach_topk, cached_samples
from prefixtune.distillation.trainer import add_context_weights, collate, distill_rows
from prefixtune.files import CONFIG_NAME
from prefixtune.training import RunExistsError
from tiny import VOCAB, tiny_model, tiny_tokenizer

CONTEXT = (
    "the restaurant near the river serves french food and the pub in the city centre serves cheap "
    "english food it has a high customer rating and is family friendly"
)
PROMPTS = ["the restaurant", "cheap food near the river", "a pub in the city centre", "family friendly", "rating"]
SMALL = {"max_prompt_tokens": 6, "max_answer_tokens": 10, "chunk_tokens": 12, "generation_batch_size": 4}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model folder, so `distill` loads it like any model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "context.txt").write_text(CONTEXT)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path


def options(tiny_folder, files, **overrides) -> DistillOptions:
    values = {
        "model": tiny_folder,
        "context": str(files / "context.txt"),
        "output": str(files / "out"),
        "prompts": str(files / "prompts.txt"),
        "prefix_length": 4,
        "steps": 30,
        "batch_size": 4,
        "lr": 5e-2,
        "warmup_steps": 0,
        "held_out": 0.2,
        "cache": str(files / "cache"),
        "device": "cpu",
        "dtype": "float32",  # the exactness checks compare float32 numbers (auto may pick bfloat16)
        **SMALL,
    }
    return DistillOptions(**(values | overrides))


def teacher_and_samples(tmp_path, top_k: int = 20):
    """A tiny model with the teacher prefix and samples answered by it; the context; the formatter."""
    tokenizer = tiny_tokenizer()
    formatter = PromptFormatter(tokenizer)
    (tmp_path / "context.txt").write_text(CONTEXT)
    context = load_context(tmp_path / "context.txt", formatter)
    model = PrefixModel(tiny_model("llama"), name=None, tokenizer=tokenizer)
    add_teacher(model, context.ids)
    samples = [
        Sample(p, ids, "given")
        for p, ids in zip(PROMPTS, ([5, 9, 11, 2], [7, 3], [8, 8, 20, 31, 2], [4], [40, 41]), strict=True)
    ]
    if top_k:
        attach_topk(model, formatter, samples, top_k, batch_size=3)
    return model, formatter, context, samples


def token_teacher_logits(model: PrefixModel, formatter, context, samples) -> torch.Tensor:
    """The teacher as a user makes it: the bare model on context + prompt + answer tokens, left-padded."""
    rows = [{"input_ids": context.teacher_ids(formatter.prompt_ids(s.prompt) + s.answer_ids)} for s in samples]
    batch = pad_batch(rows, 0)
    with torch.no_grad(), model.disable_prefix():
        return model(**batch).logits  # [B, C + W', V]; its last W columns line up with the student's rows


def greedy_with_context_in_prompt(model: PrefixModel, formatter, context, ids: list[int], tokens: int) -> list[int]:
    """The bare model's greedy answer to `ids` with the whole context in the prompt, up to EOS."""
    row = torch.tensor([context.teacher_ids(ids)])
    eos = formatter.tokenizer.eos_token_id
    with torch.no_grad(), model.disable_prefix():
        generated = model.generate(
            input_ids=row,
            attention_mask=torch.ones_like(row),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )[0, row.shape[1] :]
    return selfstudy.until_stop(generated.tolist(), formatter.tokenizer, None)


def student_logits(model: PrefixModel, formatter, samples, name: str):
    batch = collate([distill_rows(samples, formatter)[i] for i in range(len(samples))], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], prefix=name).logits
    return logits, batch


@pytest.mark.parametrize("parameterization", ["kv", "hidden"])
def test_a_prefix_of_the_whole_context_has_zero_kl_to_the_teacher_before_any_step(tmp_path, parameterization):
    model, formatter, context, samples = teacher_and_samples(tmp_path)
    config = PrefixConfig(
        prefix_length=len(context.ids), parameterization=parameterization, init="activations", init_text="-"
    )
    add_prefix_from_ids(model, "student", config, context.ids)
    logits, batch = student_logits(model, formatter, samples, "student")
    teacher = token_teacher_logits(model, formatter, context, samples)[:, -logits.shape[1] :]
    mask = batch["answer_mask"]
    assert full_kl(logits, teacher, mask).item() < 1e-5
    assert topk_kl(logits, batch["topk_indices"], batch["topk_logprobs"], mask).abs().item() < 1e-5
    # and the stored top-k (made with the teacher prefix) are the token teacher's
    indices, logprobs = teacher_topk(teacher, 20)
    assert torch.equal(indices[mask], batch["topk_indices"][mask])
    torch.testing.assert_close(logprobs[mask], batch["topk_logprobs"][mask], atol=1e-4, rtol=0)


def test_topk_kl_equals_full_vocabulary_kl_when_k_is_the_vocabulary_size(tmp_path):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, VOCAB) * 3, torch.randn(3, 7, VOCAB) * 3
    mask = torch.rand(3, 7) > 0.3
    indices, logprobs = teacher_topk(teacher, VOCAB)
    torch.testing.assert_close(topk_kl(student, indices, logprobs, mask), full_kl(student, teacher, mask))
    smaller = topk_kl(student, *teacher_topk(teacher, 5), mask)
    assert smaller < full_kl(student, teacher, mask)  # top-5 leaves mass out: it is not the full KL
    # and the stored-top-k path of the trainer (k = V) equals its online full-vocabulary path (k = 0)
    model, formatter, context, samples = teacher_and_samples(tmp_path, top_k=VOCAB)
    add_prefix_from_ids(model, "student", PrefixConfig(prefix_length=3, init="activations", init_text="-"), context.ids)
    logits, batch = student_logits(model, formatter, samples, "student")
    with torch.no_grad():
        online = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], prefix=TEACHER).logits
    stored = topk_kl(logits, batch["topk_indices"], batch["topk_logprobs"], batch["answer_mask"])
    torch.testing.assert_close(stored, full_kl(logits, online, batch["answer_mask"]), atol=1e-5, rtol=1e-5)
    assert stored > 0.01


def test_self_study_writes_prompts_and_answers_caches_them_and_a_second_run_reuses_the_cache(tmp_path, monkeypatch):
    model, formatter, context, _ = teacher_and_samples(tmp_path, top_k=0)
    settings = StudySettings(
        samples=6, held_out=0.34, top_k=5, max_prompt_tokens=5, max_answer_tokens=6, chunk_tokens=8, batch_size=4
    )
    calls = []
    generate = selfstudy._generate
    monkeypatch.setattr(selfstudy, "_generate", lambda *a: calls.append(a[2]) or generate(*a))
    folder = tmp_path / "cache" / selfstudy.cache_key(model, "float32", context, formatter, settings)
    samples, from_cache = cached_samples(model, formatter, context, settings, folder)
    assert not from_cache and len(calls) >= 2  # the teacher wrote the prompts, then answered them
    assert len(samples) == 6 and {s.kind for s in samples} <= set(selfstudy.SEEDS)
    assert all(s.prompt and s.answer_ids for s in samples)
    assert all(s.topk_indices.shape == (len(s.answer_ids), 5) for s in samples)
    assert sum(s.held_out for s in samples) == 2
    first = [json.loads(line) for line in (folder / selfstudy.SAMPLES_FILE).read_text().splitlines()]
    assert [row["prompt"] for row in first] == [s.prompt for s in samples]

    calls.clear()
    again, from_cache = cached_samples(model, formatter, context, settings, folder)
    assert from_cache and calls == []  # nothing generated the second time
    assert [(s.prompt, s.answer_ids, s.held_out) for s in again] == [
        (s.prompt, s.answer_ids, s.held_out) for s in samples
    ]
    for old, new in zip(samples, again, strict=True):
        assert torch.equal(old.topk_indices, new.topk_indices) and torch.equal(old.topk_logprobs, new.topk_logprobs)
    other = StudySettings(**{**settings.__dict__, "samples": 5})
    assert selfstudy.cache_key(model, "float32", context, formatter, other) != folder.name


def test_answer_with_chunk_teacher_answers_and_scores_with_the_chunk_quoted_while_the_student_reads_the_prompt(
    tmp_path,
):
    model, formatter, context, _ = teacher_and_samples(tmp_path, top_k=0)
    settings = StudySettings(
        samples=4, held_out=0.25, top_k=VOCAB, max_prompt_tokens=5, max_answer_tokens=4, chunk_tokens=8, batch_size=4
    )
    quoted = StudySettings(**{**settings.__dict__, "answer_with_chunk": True})
    assert selfstudy.cache_key(model, "float32", context, formatter, quoted) != selfstudy.cache_key(
        model, "float32", context, formatter, settings
    )
    folder = tmp_path / "cache" / selfstudy.cache_key(model, "float32", context, formatter, quoted)
    samples, _ = cached_samples(model, formatter, context, quoted, folder)
    pieces = selfstudy.chunks(context, formatter.tokenizer, 8)
    assert samples and all(s.chunk in pieces for s in samples)
    for sample in samples:  # as a user would: the bare model, context + quote + prompt in the prompt
        asked = formatter.prompt_ids(selfstudy.REMINDER.format(chunk=sample.chunk, prompt=sample.prompt))
        assert sample.chunk in formatter.tokenizer.decode(asked)
        assert sample.answer_ids == greedy_with_context_in_prompt(model, formatter, context, asked, 4)
        with torch.no_grad(), model.disable_prefix():
            logits = model(input_ids=torch.tensor([context.teacher_ids(asked + sample.answer_ids)])).logits[0]
        answer = len(sample.answer_ids)
        expected = torch.log_softmax(logits[-answer - 1 : -1], -1)  # [A, V] the teacher with the quote
        torch.testing.assert_close(sample.topk_logprobs, expected.gather(-1, sample.topk_indices.long()))
    row = distill_rows(samples[:1], formatter)[0]  # the student: the bare prompt, then the answer
    assert row["input_ids"] == formatter.prompt_ids(samples[0].prompt) + samples[0].answer_ids
    again, from_cache = cached_samples(model, formatter, context, quoted, folder)
    assert from_cache and [s.chunk for s in again] == [s.chunk for s in samples]
    with pytest.raises(ConfigError, match="--answer-with-chunk: a --prompts file"):
        DistillOptions(context="c.txt", output="out", prompts="p.txt", answer_with_chunk=True)


def test_self_study_asks_every_chunk_every_kind_in_turn():
    pieces = [f"chunk {i}" for i in range(8)]
    kinds = list(selfstudy.SEEDS)  # 4 kinds, 8 chunks: plain round-robin would ask each chunk one kind only
    plan = selfstudy.seed_plan(32, kinds, pieces)
    assert set(plan) == {(kind, piece) for kind in kinds for piece in pieces}
    assert [piece for _, piece in plan[:8]] == pieces  # a round covers every chunk before any repeats
    assert {kind for kind, _ in selfstudy.seed_plan(8, ["question"], pieces)} == {"question"}


def test_an_unknown_seed_kind_is_refused_by_name():
    expected = r"--seed-kinds: expected comma-separated kinds of \['question'.*'question,poem'"
    with pytest.raises(ConfigError, match=expected):
        DistillOptions(context="c.txt", output="out", seed_kinds="question,poem")


def test_self_study_answers_from_the_teacher_prefix_equal_generation_with_the_context_in_the_prompt(tmp_path):
    """The teacher's keys/values on the context are computed once (the teacher prefix) and every batch
    of self-study generation (left-padded, mixed lengths) reuses them: the answers are the bare
    model's greedy answers with the whole context in each prompt, one prompt at a time."""
    model, formatter, context, _ = teacher_and_samples(tmp_path, top_k=0)
    inputs = [formatter.prompt_ids(prompt) for prompt in PROMPTS]
    assert len({len(ids) for ids in inputs}) > 1  # mixed lengths: the batches are padded
    answers = selfstudy._generate(model, formatter, inputs, 6, False, 3)  # noqa: SLF001
    for ids, answer in zip(inputs, answers, strict=True):
        assert answer == greedy_with_context_in_prompt(model, formatter, context, ids, 6)


def test_a_teacher_answer_ends_with_the_token_that_completes_the_stop_text(tmp_path):
    model, formatter, context, _ = teacher_and_samples(tmp_path, top_k=0)
    tokenizer = formatter.tokenizer
    inputs = [formatter.prompt_ids(prompt) for prompt in PROMPTS]
    whole = selfstudy._generate(model, formatter, inputs, 8, False, 3)  # noqa: SLF001
    stop = tokenizer.decode(whole[0][1:3])  # the first row's second and third tokens
    stopped = selfstudy._generate(model, formatter, inputs, 8, False, 3, stop)  # noqa: SLF001
    assert stopped[0] == whole[0][:3]
    assert stopped == [selfstudy.until_stop(ids, tokenizer, stop) for ids in whole]
    eos = tokenizer.eos_token_id
    ids = tokenizer("the pub serves food", add_special_tokens=False)["input_ids"]
    assert selfstudy.until_stop([*ids, eos, *ids], tokenizer, "food") == ids  # the first stop wins
    assert selfstudy.until_stop([ids[0], eos, *ids], tokenizer, "food") == [ids[0], eos]
    settings = DistillOptions(context="c.txt", output="out", answer_stop="\n\n").study
    assert settings.answer_stop == "\n\n"  # and the samples' cache key depends on it
    plain = StudySettings(**{**settings.__dict__, "answer_stop": None})
    assert selfstudy.cache_key(model, "float32", context, formatter, settings) != selfstudy.cache_key(
        model, "float32", context, formatter, plain
    )


def test_context_weights_average_one_and_strength_zero_is_the_plain_mean():
    bare_kl = [torch.tensor([0.0, 2.0]), torch.tensor([1.0])]  # mean 1 over the three answer tokens
    assert [w.tolist() for w in context_weights(bare_kl, 1.0)] == [[0.0, 2.0], [1.0]]
    assert [w.tolist() for w in context_weights(bare_kl, 0.5)] == [[0.5, 1.5], [1.0]]
    assert [w.tolist() for w in context_weights(bare_kl, 0.0)] == [[1.0, 1.0], [1.0]]
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB)
    mask = torch.ones(2, 5, dtype=torch.bool)
    indices, logprobs = teacher_topk(teacher, 5)
    plain = topk_kl(student, indices, logprobs, mask)
    torch.testing.assert_close(topk_kl(student, indices, logprobs, mask, torch.ones(2, 5)), plain)
    only_first = torch.zeros(2, 5)
    only_first[0, 0] = 10.0
    per_position = topk_kl_per_position(student, indices, logprobs)
    torch.testing.assert_close(topk_kl(student, indices, logprobs, mask, only_first), per_position[0, 0])


def test_context_weights_are_the_teachers_kl_to_the_bare_model_on_each_answer_position(tmp_path):
    model, formatter, context, samples = teacher_and_samples(tmp_path, top_k=VOCAB)
    rows = distill_rows(samples, formatter)
    add_context_weights(model, rows, formatter.tokenizer.pad_token_id, 1.0, batch_size=2)
    bare_kl = []
    for sample in samples:  # one row at a time, no padding: the bare model against the stored teacher top-k
        ids = formatter.prompt_ids(sample.prompt) + sample.answer_ids
        with torch.no_grad(), model.disable_prefix():
            logits = model(input_ids=torch.tensor([ids])).logits[:, -len(sample.answer_ids) - 1 : -1]  # [1, A, V]
        indices, logprobs = sample.topk_indices.long()[None], sample.topk_logprobs[None]
        bare_kl.append(topk_kl_per_position(logits, indices, logprobs)[0])
    expected = context_weights(bare_kl, 1.0)
    assert torch.cat(expected).std() > 0.1  # the positions differ: a constant weight would prove nothing
    for row, weights in zip(rows, expected, strict=True):
        torch.testing.assert_close(row["kl_weight"], weights, atol=1e-4, rtol=1e-4)
    batch = collate(rows, formatter.tokenizer.pad_token_id)
    assert not batch["kl_weight"][~batch["answer_mask"]].any()  # weights sit on the answer positions only
    torch.testing.assert_close(batch["kl_weight"][batch["answer_mask"]].mean(), torch.tensor(1.0))
    with pytest.raises(ConfigError, match="--context-weight: needs the teacher's stored top-k"):
        DistillOptions(context="c.txt", output="out", context_weight=0.5, top_k=0)
    with pytest.raises(ConfigError, match="--context-weight: expected 0 <= weight <= 1, got 1.5"):
        DistillOptions(context="c.txt", output="out", context_weight=1.5)


def _losses(report_folder) -> list[float]:
    history = json.loads((report_folder / "log_history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize(
    ("parameterization", "init", "extra"),
    [
        ("kv", "activations", {}),
        ("hidden", "vocab", {}),
        ("mlp", "random", {}),
        ("mlp", "activations", {}),
        ("kv", "activations", {"context_weight": 0.9}),
    ],
)
def test_distilling_lowers_kl_for_a_prefix_shorter_than_the_context(tiny_folder, files, parameterization, init, extra):
    report = prefixtune.distill(options(tiny_folder, files, parameterization=parameterization, init=init, **extra))
    out = files / "out"
    losses = _losses(out)
    assert losses[-1] < 0.85 * losses[0], losses
    assert report["compression_ratio"] == report["context_tokens"] / 4
    assert set(report["held_out"]) == {"student", "bare", "truncated"}
    assert report["samples"] == {"train": 4, "held_out": 1, "cache": report["samples"]["cache"], "from_cache": False}
    assert {"loss.png", "distill_report.json", CONFIG_NAME}.issubset(p.name for p in out.iterdir())
    assert not work_folder(out).exists()


def test_distill_output_is_an_ordinary_prefix_folder_and_a_rerun_reuses_the_samples(tiny_folder, files, tmp_path):
    first = prefixtune.distill(options(tiny_folder, files, top_k=0))  # full-vocabulary KL, teacher online
    base, tokenizer = load_base_model(tiny_folder)
    model = PrefixModel.from_pretrained(base, files / "out", tokenizer=tokenizer)
    assert model.prefixes["default"].length == 4
    meta = json.loads((files / "out" / CONFIG_NAME).read_text())
    assert meta["prompt_format"] == {"template": "{prompt}\n", "chat_template": False}
    assert meta["distilled_from"]["context_tokens"] == first["context_tokens"]
    model.save_prefix(tmp_path / "peft", format="peft")  # exports like any prefix
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    second = prefixtune.distill(options(tiny_folder, files, top_k=0, output=str(files / "again"), steps=2))
    assert second["samples"]["from_cache"] and not first["samples"]["from_cache"]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_data_seed_changes_the_training_order_and_not_the_samples(tiny_folder, files, group_by_length):
    def trained(output: str, **seed) -> tuple[dict, torch.Tensor]:
        changes = {"output": str(files / output), "batch_size": 2, "group_by_length": group_by_length}
        report = prefixtune.distill(options(tiny_folder, files, **changes, **seed))
        base, tokenizer = load_base_model(tiny_folder)
        model = PrefixModel.from_pretrained(base, files / output, tokenizer=tokenizer)
        return report, model.prefixes["default"].prefix_key_values.detach()

    _, default = trained("default")
    same_report, same = trained("same", data_seed=0)  # --seed's value: the default order
    other_report, other = trained("other", data_seed=1)
    assert same_report["samples"]["from_cache"] and other_report["samples"]["from_cache"]  # the same samples
    assert torch.equal(same, default)
    assert not torch.allclose(other, default)


def test_freeze_first_keeps_the_first_position_as_initialised(tiny_folder, files):
    prefixtune.distill(
        options(tiny_folder, files, freeze_first=True, gradient_checkpointing=True, group_by_length=True)
    )
    base, tokenizer = load_base_model(tiny_folder)
    trained = PrefixModel.from_pretrained(base, files / "out", tokenizer=tokenizer).prefixes["default"]
    reference = PrefixModel(tiny_model("llama"), name=None, tokenizer=tokenizer)
    context = load_context(files / "context.txt", PromptFormatter(tokenizer))
    add_prefix_from_ids(
        reference, "start", PrefixConfig(prefix_length=4, init="activations", init_text="-"), context.ids
    )
    start = reference.prefixes["start"].prefix_key_values
    assert torch.equal(trained.prefix_key_values[:, :, :, 0], start[:, :, :, 0])
    assert not torch.allclose(trained.prefix_key_values[:, :, :, 1:], start[:, :, :, 1:])


def test_resume_after_an_interruption_gives_the_uninterrupted_prefix(tiny_folder, files, monkeypatch):
    from prefixtune.distillation.trainer import DistillTrainer

    prefixtune.distill(options(tiny_folder, files, steps=8, save_every=4, output=str(files / "whole")))
    step = DistillTrainer.training_step

    def crash_at_six(self, *args, **kwargs):
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "training_step", crash_at_six)
    with pytest.raises(KeyboardInterrupt):
        prefixtune.distill(options(tiny_folder, files, steps=8, save_every=4))
    assert not (files / "out").exists() and (work_folder(files / "out") / "checkpoint-4").is_dir()
    with pytest.raises(RunExistsError, match="--resume"):
        prefixtune.distill(options(tiny_folder, files, steps=8, save_every=4))
    monkeypatch.setattr(DistillTrainer, "training_step", step)
    prefixtune.distill(options(tiny_folder, files, steps=8, save_every=4, resume=True))
    base, tokenizer = load_base_model(tiny_folder)
    resumed = PrefixModel.from_pretrained(base, files / "out", tokenizer=tokenizer).prefixes["default"]
    whole = PrefixModel.from_pretrained(load_base_model(tiny_folder)[0], files / "whole").prefixes["default"]
    torch.testing.assert_close(resumed.prefix_key_values, whole.prefix_key_values)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"context": "missing.txt"}, "missing.txt: no such context file"),
        ({"context": "empty.txt"}, "empty.txt: context file is empty"),
        (
            {"context": "long.txt"},
            "context is 128 tokens; with up to 16 prompt and answer tokens after it the teacher needs 144 > "
            "the model's window of 128 tokens",
        ),
        ({"prefix_length": 40}, "--prefix-length 40 is longer than the context it replaces .*: 29 tokens"),
        ({"prompts": "broken.jsonl"}, r"broken.jsonl:2: invalid JSON"),
        ({"prompts": "noprompt.jsonl"}, r"noprompt.jsonl:1: field 'prompt' must be a non-empty string"),
        ({"prompts": "latin1.txt"}, r"latin1.txt:2: not UTF-8"),
    ],
)
def test_bad_input_is_refused_by_name_and_writes_nothing(tiny_folder, files, change, message):
    (files / "empty.txt").write_text(" \n\n")
    (files / "long.txt").write_text(" ".join(["food"] * 128))
    (files / "broken.jsonl").write_text('{"prompt": "cheap food"}\n{"prompt": \n')
    (files / "noprompt.jsonl").write_text('{"text": "cheap food"}\n')
    (files / "latin1.txt").write_bytes(b"cheap food\ncaf\xe9\n")
    change = {key: str(files / value) if isinstance(value, str) else value for key, value in change.items()}
    with pytest.raises((DataError, ValueError), match=message):
        prefixtune.distill(options(tiny_folder, files, **change))
    assert sorted(p.name for p in files.iterdir() if p.name in ("out", "cache") or p.name.startswith(".")) == []


def test_distill_command_prints_the_report_table_and_refuses_bad_input_in_one_line(tiny_folder, files):
    args = ["distill", "--model", tiny_folder, "--context", str(files / "context.txt"), "--output", str(files / "out")]
    args += ["--dtype", "float32"]
    small = ["--prompts", str(files / "prompts.txt"), "--prefix-length", "4", "--steps", "3", "--device", "cpu"]
    small += ["--cache", str(files / "cache"), "--max-answer-tokens", "10", "--held-out", "0.2"]
    result = CliRunner().invoke(app, args + small)
    assert result.exit_code == 0, result.output
    for words in ("student (prefix)", "bare model", "truncated context", "KL to teacher", "ROUGE-L"):
        assert words in result.output
    report = json.loads((files / "out" / "distill_report.json").read_text())
    assert report["global_step"] == 3 and report["held_out"]["student"]["kl"] >= 0
    failed = CliRunner().invoke(app, args + small)  # the output exists now
    said = " ".join(failed.output.split())  # rich wraps long lines
    assert failed.exit_code == 2 and "out exists already; choose another --output" in said and "Traceback" not in said


def test_a_distilled_prefix_serves_beside_trained_ones_token_identical_to_generate(tiny_folder, files):
    """The distill output copied into a store with trained prefixes, served by the continuous engine
    with mixed prefixes in one batch (chunked prefill): each request equals `PrefixModel.generate` alone."""
    import shutil

    from prefixtune.serving import BASE_NAME, ContinuousEngine, PrefixStore, Request
    from test_serving import PROMPTS as SERVED
    from test_serving import alone, prompt_ids, reference_model, write_store

    prefixtune.distill(options(tiny_folder, files, parameterization="hidden"))
    store_folder = files / "store"
    write_store(store_folder)
    shutil.copytree(files / "out", store_folder / "handbook")
    reference = reference_model(store_folder)
    reference.load_prefix(store_folder / "handbook", name="handbook")
    served = reference_model(store_folder)
    engine = ContinuousEngine(served, served.tokenizer, max_batch_size=6, max_batch_tokens=8).start()
    store = PrefixStore(served, store_folder, exclusive=engine.exclusive)
    jobs = [
        (p, n, 6 + 3 * i % 11)
        for i, (p, n) in enumerate((p, n) for p in SERVED for n in ("handbook", "formal-blog", BASE_NAME))
    ]
    futures = [engine.submit(Request(prompt_ids(p), n, m, prefix_inputs=store.snapshot(n))) for p, n, m in jobs]
    results = [future.result(timeout=120).token_ids for future in futures]
    engine.close()
    for (prompt, name, max_tokens), got in zip(jobs, results, strict=True):
        assert got == alone(reference, prompt, name, max_tokens), (prompt, name)
    changed = [alone(reference, p, "handbook", 10) != alone(reference, p, BASE_NAME, 10) for p in SERVED]
    assert any(changed)  # the distilled prefix changes what is generated
