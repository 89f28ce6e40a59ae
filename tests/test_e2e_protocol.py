"""benchmarks/e2e_cv.py, the E2E cross-validation protocol: MR-disjoint folds that cover train.csv, a
row with mean/std over seeds for every method, resume, and selection that never sees validation.csv."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e_cv  # noqa: E402
from e2e_grid import BASELINES, METHODS, Setting, lever_settings  # noqa: E402
from prefixtune.data import read_examples  # noqa: E402
from tiny import needs_smollm2, tiny_model  # noqa: E402

E2E_DATA = next(
    (
        path
        for path in (Path(os.environ.get("E2E_DATA", "/nonexistent")), ROOT.parent / "shared" / "data" / "e2e")
        if (path / "train.csv").is_file()
    ),
    Path("/work/shared/data/e2e"),
)
needs_e2e = pytest.mark.skipif(not (E2E_DATA / "train.csv").is_file(), reason="needs the E2E data (E2E_DATA=folder)")


@needs_e2e
def test_folds_are_mr_disjoint_cover_train_csv_and_do_not_depend_on_row_order():
    examples = read_examples(E2E_DATA / "train.csv")
    folds = e2e_cv.mr_folds(examples, 5)
    assert set(folds) == {e.prompt for e in examples}  # every MR of train.csv is in a fold ...
    assert set(folds.values()) == set(range(5))  # ... each MR in exactly one (a dict), every fold used
    sizes = [list(folds.values()).count(k) for k in range(5)]
    assert max(sizes) - min(sizes) <= 1  # round robin over the hash order: balanced in MRs
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    assert e2e_cv.mr_folds(shuffled, 5) == folds  # deterministic: the MR's text alone decides


@needs_e2e
def test_a_fold_split_trains_on_no_held_out_or_inner_mr():
    examples = read_examples(E2E_DATA / "train.csv")
    held_out = {mr for mr, fold in e2e_cv.mr_folds(examples, 5).items() if fold == 0}
    rest = {e.prompt for e in examples} - held_out
    inner = e2e_cv.inner_mrs(rest, 0.1)
    assert inner <= rest and len(inner) == -(-len(rest) // 10)
    assert e2e_cv.inner_mrs(set(sorted(rest, reverse=True)), 0.1) == inner


def test_a_lever_that_does_not_fit_the_method_is_refused_not_ignored():
    with pytest.raises(ValueError, match="mlp_hidden_size"):
        BASELINES["ours hidden"].changed(mlp_hidden_size=128)
    with pytest.raises(ValueError, match="init"):
        BASELINES["PEFT prefix tuning"].changed(init="random")
    with pytest.raises(ValueError, match="dropout"):
        BASELINES["full fine-tuning"].changed(dropout=0.1)
    tried, skipped = lever_settings(BASELINES["ours hidden"], {"mlp_hidden_size": [{"mlp_hidden_size": 128}]})
    assert not tried and "not applicable" in skipped["mlp_hidden_size"]


def row(setting: Setting, mean: float, se: float) -> dict:
    return {"setting": e2e_cv.asdict(setting), "sacrebleu": {"mean": mean, "se": se}}


def test_select_recipe_keeps_a_lever_only_when_its_gain_exceeds_the_standard_error():
    base = BASELINES["ours hidden"]
    levers = {
        "lr": [row(base.changed(lr=1e-2), 61.0, 0.5), row(base.changed(lr=1e-3), 58.0, 0.5)],  # +1.0 > 0.71: kept
        "dropout": [row(base.changed(dropout=0.1), 60.5, 0.5)],  # +0.5 < 0.71: dropped
    }
    recipe, decisions = e2e_cv.select_recipe(base, row(base, 60.0, 0.5), levers)
    assert recipe == base.changed(lr=1e-2)
    assert decisions["lr"]["kept"] and not decisions["dropout"]["kept"]
    assert decisions["dropout"]["best"] == {"dropout": 0.1}


def small_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The first 300 rows of train.csv and validation.csv, and validation with other references."""
    paths = [tmp_path / name for name in ("train.csv", "validation.csv", "validation-other.csv")]
    for source, target, rows in ((E2E_DATA / "train.csv", paths[0], 300), (E2E_DATA / "validation.csv", paths[1], 60)):
        with open(source, newline="") as read, open(target, "w", newline="") as write:
            csv.writer(write).writerows(itertools.islice(csv.reader(read), rows + 1))
    with open(paths[1], newline="") as read, open(paths[2], "w", newline="") as write:
        table = list(csv.reader(read))
        csv.writer(write).writerows([table[0]] + [[mr, "a different reference"] for mr, _ in table[1:]])
    return tuple(paths)


@pytest.mark.slow  # ~60 tiny training runs, twice through the protocol (a minute or more on a shared CPU)
@needs_e2e
def test_quick_protocol_rows_for_every_method_resume_and_validation_only_in_the_final_check(tmp_path):
    train, validation, other = small_data(tmp_path)
    common = ["--quick", "--train", str(train), "--output", str(tmp_path / "out"), "--levers", "lr"]
    first = e2e_cv.main([*common, "--validation", str(validation)])
    assert {row["setting"]["method"] for row in first["baselines"].values()} == set(METHODS)
    for name, result in first["baselines"].items():
        assert result["sacrebleu"]["n"] == 3 and result["sacrebleu"]["std"] >= 0, name
        assert result["trainable_parameters"] > 0 and result["seconds_per_step"] > 0
        assert result["cpu_capabilities"] == [torch.backends.cpu.get_cpu_capability()], name  # s/step's machine
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["stages_done"] == list(e2e_cv.STAGES)
    assert first["record"]["cpu"]["cpu_capability"]
    assert (tmp_path / "out" / "bleu_vs_train_seconds.png").is_file()  # time to quality

    # Again with other validation references: every cross-validation run is resumed (none trained),
    # the selection is the same, and only the final check reran, on the new references.
    second = e2e_cv.main([*common, "--validation", str(other)])
    assert second["trained_now"] == 3  # the final check's three seeds, nothing else
    assert second["baselines"] == first["baselines"] and second["levers"] == first["levers"]
    assert second["recipe"] == first["recipe"] and second["decisions"] == first["decisions"]
    runs = (tmp_path / "out" / "runs-0of1.jsonl").read_text().splitlines()
    finals = [r for r in map(json.loads, runs) if r["stage"] == "final"]
    assert {refs[0] for r in finals[3:] for refs in r["references"]} == {"a different reference"}


@pytest.mark.slow  # 6 tiny training runs
@needs_e2e
def test_shards_split_a_stage_and_one_process_then_finds_every_run_done(tmp_path):
    train, validation, _ = small_data(tmp_path)
    common = ["--quick", "--train", str(train), "--validation", str(validation), "--output", str(tmp_path / "out")]
    common += ["--baselines", "ours kv", "--stages", "baselines"]
    first = e2e_cv.main([*common, "--shard", "0/2"])
    assert first == {"trained_now": 3}  # runs 0, 2, 4 of the 6 (2 folds x 3 seeds); the others' are missing
    assert e2e_cv.main([*common, "--shard", "1/2"])["trained_now"] == 3  # the last shard completes the stage
    merged = e2e_cv.main(common)
    assert merged["trained_now"] == 0 and merged["runs"] == 6
    assert merged["baselines"]["ours kv"]["sacrebleu"]["n"] == 3
    with pytest.raises(SystemExit, match="--baselines"):
        e2e_cv.main([*common[:-2], "--stages", "levers"])  # a slice of the baselines cannot select


@pytest.mark.slow  # 15 tiny training runs
@needs_e2e
def test_a_slice_with_no_levers_leaves_the_base_as_recipe_and_a_lever_added_later_trains_only_its_runs(tmp_path):
    train, validation, _ = small_data(tmp_path)
    sliced = ["ours hidden", "PEFT LoRA r=8"]
    common = ["--quick", "--train", str(train), "--validation", str(validation), "--output", str(tmp_path / "out")]
    summary = e2e_cv.main([*common, "--baselines", ",".join(sliced), "--levers", "none"])
    assert summary["stages_done"] == list(e2e_cv.STAGES) and summary["baselines_slice"] == sliced
    assert list(summary["baselines"]) == sliced and summary["levers"] == {}
    assert summary["recipe"] == summary["baselines"]["ours hidden"]["setting"]
    assert summary["trained_now"] == 2 * 2 * 3 + 3  # the recipe's cross-validation runs are the base's
    assert "recipe_beats_lora_by_more_than_se" in summary["goals"]

    # The same folder, a lever added (another session's work): only its 2 folds x 3 seeds train.
    added = e2e_cv.main([*common, "--baselines", ",".join(sliced), "--levers", "num_beams", "--stages", "levers"])
    assert added["trained_now"] == 2 * 3 and added["levers_tried"] == ["num_beams"]
    assert added["baselines"] == summary["baselines"]
    assert added["levers"]["num_beams"][0]["setting"]["num_beams"] == 4

    # A recipe that kept beam search is compared with LoRA decoded the same way, not the greedy baseline.
    greedy, lora = BASELINES["ours hidden"], BASELINES["PEFT LoRA r=8"]
    assert e2e_cv.lora_decoded_like(greedy.changed(num_beams=4)) == lora.changed(num_beams=4)
    assert e2e_cv.lora_decoded_like(greedy) == lora


@pytest.mark.parametrize("method", ["peft-prefix", "peft-cartridge"])
def test_a_peft_prompt_learning_model_decodes_through_prefixtune_to_its_own_greedy_tokens(method):
    """The protocol decodes PEFT's prefix with a cached `PrefixModel`; the tokens are those of PEFT's
    own forward pass, one full forward per token (unpadded rows: PEFT's forward has no row offsets)."""
    import torch

    from e2e_run import build, greedy_through_forward

    setting = BASELINES["PEFT prefix tuning"].changed(method=method, prefix_length=3)
    model, generate = build(setting, tiny_model("llama"), None)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 14, 3], [11, 4, 30, 8]])
    options = {"max_new_tokens": 6, "eos_token_id": 2, "pad_token_id": 0}
    expected = greedy_through_forward(model, ids, torch.ones_like(ids), **options)
    bare = tiny_model("llama").generate(input_ids=ids, do_sample=False, **options)
    ours = generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **options)
    assert torch.equal(ours, expected)
    assert not torch.equal(bare, expected)  # the prefix changes the tokens


TRAINABLE = {  # SmolLM2-135M: 30 layers, 3 kv heads x 64, P=10
    "PEFT prefix tuning": 115_200,
    "PEFT CartridgeConfig": 103_680,  # its first virtual token stays frozen (PEFT's default)
    "PEFT LoRA r=8": 460_800,
    "full fine-tuning": 134_515_008,
    "ours kv": 115_200,
    "ours mlp": 6_210_944,
    "ours hidden": 172_800,
}


@pytest.mark.slow  # the real SmolLM2, 8 runs of 2 steps (minutes on a shared CPU)
@needs_smollm2
@needs_e2e
def test_every_method_trains_and_decodes_on_the_real_smollm2(tmp_path):
    from e2e_grid import EARLY_STOPPING
    from e2e_run import Budget, train_and_decode
    from prefixtune import load_base_model
    from prefixtune.data import PromptFormatter
    from prefixtune.precision import dtype_name, resolve_dtype

    examples = read_examples(E2E_DATA / "train.csv")
    dtype = dtype_name(resolve_dtype("auto")[0])  # bfloat16 where native; emulated (AVX2) it is ~35x slower
    base, tokenizer = load_base_model("smollm2-135m", dtype=dtype)
    formatter = PromptFormatter(tokenizer)
    protocol = e2e_cv.Protocol(5, [0, 1], 2, 2, 8, 2, 0.1, 4, "-", dtype, "cpu", False)
    held_out = {mr for mr, fold in e2e_cv.mr_folds(examples, 5).items() if fold == 0}
    data = e2e_cv.split(examples, held_out, protocol, formatter)
    settings = dict(BASELINES)
    stopping = {**EARLY_STOPPING, "evaluations": 2, "patience": 1}
    settings["ours hidden, best-of-N, beam 4"] = BASELINES["ours hidden"].changed(**stopping, num_beams=4)
    for name, setting in settings.items():
        row = train_and_decode(
            setting, base, formatter, data.train, data.inner, data.prompts, Budget(2, 2, 8), 0, str(tmp_path)
        )
        assert row["trainable_parameters"] == TRAINABLE.get(name, TRAINABLE["ours hidden"]), name
        assert row["steps_done"] == 2 and row["seconds_per_step"] > 0, name
        assert len(row["hypotheses"]) == 2 and all(isinstance(h, str) for h in row["hypotheses"]), name
    assert [step for step, _ in row["inner_losses"]] == [1, 2] and row["best_step"] in (1, 2)
