"""The E2E challenge's official five metrics: the check file's scores reproduced through
`prefixtune score`, BLEU cross-checked against sacreBLEU, METEOR & co. unavailable without Java,
and bad prediction files refused with the file and the problem named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import sacrebleu
from typer.testing import CliRunner

from prefixtune import e2e_metrics
from prefixtune.cli import app
from prefixtune.data import group_references, read_examples
from prefixtune.evaluation import check_metrics, read_predictions, score

E2E = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "e2e"
CHECK = E2E / "official_metrics_check.json"
needs_e2e = pytest.mark.skipif(not CHECK.is_file(), reason=f"E2E data folder absent ({E2E})")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java missing (scripts/setup.sh installs it)")
TOLERANCE = {"BLEU": 0.0005, "METEOR": 0.0005, "ROUGE_L": 0.0005, "NIST": 0.005, "CIDEr": 0.005}
OUR_KEY = {"BLEU": "bleu", "NIST": "nist", "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider"}
PERCENT = {"BLEU", "METEOR", "ROUGE_L"}  # we report these x100, as the papers do


def check_input() -> tuple[list[str], list[str], list[list[str]]]:
    """The check file's input: per distinct MR its first ref is the output, the others the references."""
    groups = group_references(read_examples(E2E / "validation.csv"))
    return [g.prompt for g in groups], [g.references[0] for g in groups], [g.references[1:] for g in groups]


def official(name: str, value: float) -> float:
    return value / 100 if name in PERCENT else value


@pytest.mark.slow
@needs_e2e
@needs_java
def test_prefixtune_score_reproduces_the_official_scripts_five_scores(tmp_path):
    expected = json.loads(CHECK.read_text())
    prompts, outputs, references = check_input()
    assert len(prompts) == expected["instances"]
    with (tmp_path / "refs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mr", "ref"])
        writer.writerows([prompt, ref] for prompt, refs in zip(prompts, references, strict=True) for ref in refs)
    (tmp_path / "outputs.txt").write_text("".join(f"{output}\n" for output in outputs))
    result = CliRunner().invoke(
        app,
        ["score", "--data", str(tmp_path / "refs.csv"), "--predictions", str(tmp_path / "outputs.txt")]
        + ["--metrics", "e2e", "--output", str(tmp_path / "metrics.json")],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "metrics.json").read_text())
    assert "unavailable" not in scores
    for name, value in expected["scores"].items():
        ours = official(name, scores[OUR_KEY[name]])
        assert abs(ours - value) <= TOLERANCE[name], f"{name}: ours {ours:.5f}, official {value}"


@needs_e2e
def test_bleu_and_nist_reproduce_the_check_file_without_java():
    expected = json.loads(CHECK.read_text())["scores"]
    _, outputs, references = check_input()
    assert abs(e2e_metrics.bleu(outputs, references) / 100 - expected["BLEU"]) <= TOLERANCE["BLEU"]
    assert abs(e2e_metrics.nist(outputs, references) - expected["NIST"]) <= TOLERANCE["NIST"]


@needs_e2e
def test_official_bleu_equals_lowercased_13a_sacrebleu():
    """Same tokenizer (mteval-v13a), same closest-length brevity penalty: an independent implementation agrees."""
    _, outputs, references = check_input()
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(max(map(len, references)))]
    theirs = sacrebleu.corpus_bleu(outputs, streams, lowercase=True, tokenize="13a").score
    assert e2e_metrics.bleu(outputs, references) == pytest.approx(theirs, abs=1e-9)


def test_mteval_tokenization_splits_symbols_but_keeps_numbers_whole():
    assert e2e_metrics.mteval_tokens("Aromi's 3.5 stars, £20-25. (cheap)&quot;") == (
        ["aromi's", "3.5", "stars", ",", "£20", "-", "25", ".", "(", "cheap", ")", '"']
    )


def test_bleu_and_nist_are_perfect_or_zero_at_the_extremes():
    references = [["the pub near the river is cheap", "a cheap pub by the river"]]
    assert e2e_metrics.bleu(["the pub near the river is cheap"], references) == pytest.approx(100)
    assert e2e_metrics.bleu(["zebra quantum"], references) < 1e-6
    assert e2e_metrics.nist(["zebra quantum"], references) == 0
    assert e2e_metrics.nist(["the pub near the river is cheap"], references) > e2e_metrics.nist(["the pub"], references)


def test_without_java_the_java_metrics_are_unavailable_not_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    rows = [("a", "x y z"), ("a", "x y"), ("b", "w")]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    (tmp_path / "gen.jsonl").write_text(
        json.dumps({"prompt": "b", "generation": "w"}) + "\n" + json.dumps({"prompt": "a", "generation": "x y"}) + "\n"
    )
    result = CliRunner().invoke(
        app,
        ["score", "--data", str(tmp_path / "refs.jsonl"), "--predictions", str(tmp_path / "gen.jsonl")]
        + ["--output", str(tmp_path / "m.json")],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["meteor"] is None and scores["rouge_l"] is None and scores["cider"] is None
    assert set(scores["unavailable"]) == {"meteor", "rouge_l", "cider"}
    assert "Java" in scores["unavailable"]["meteor"] and "unavailable" in result.output
    assert scores["bleu"] == pytest.approx(e2e_metrics.bleu(["x y", "w"], [["x y z", "x y"], ["w"]]))
    assert scores["nist"] > 0


def test_sacrebleu_and_official_bleu_cannot_share_the_key_bleu():
    with pytest.raises(ValueError, match="'sacrebleu'"):
        check_metrics(["bleu", "e2e"])
    results = score(["the pub"], [["the pub", "a pub"]], ["sacrebleu", "chrf"])
    assert set(results) == {"sacrebleu", "chrf"}


def test_prediction_files_that_do_not_match_the_prompts_are_refused(tmp_path):
    prompts = ["a", "b", "c"]
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"short\.txt: 2 lines, expected 3"):
        read_predictions(tmp_path / "short.txt", prompts)
    (tmp_path / "ok.txt").write_text("one\n\nthree\n")  # an empty output is still an output
    assert read_predictions(tmp_path / "ok.txt", prompts) == ["one", "", "three"]
    rows = [{"prompt": "a", "generation": "1"}, {"prompt": "z", "generation": "2"}]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"2 prompt\(s\) without a prediction \['b', 'c'\], 1 prediction\(s\).*'z'"):
        read_predictions(tmp_path / "gen.jsonl", prompts)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:1: expected string fields 'prompt' and 'generation', got \['a', None\]"
    ):
        read_predictions(tmp_path / "bad.jsonl", prompts)


def test_eval_reports_the_e2e_metrics_and_score_recomputes_them_from_its_generations(tmp_path, monkeypatch):
    """Java hidden to keep this fast (the JVM metrics go through the same path in the check-file test)."""
    from tiny import tiny_model, tiny_tokenizer

    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    rows = [
        ("name pub area city", "the pub is in the city"),
        ("name pub area city", "a city pub"),
        ("food cheap", "cheap food"),
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    runner = CliRunner()
    common = ["--data", str(tmp_path / "data.jsonl"), "--metrics", "sacrebleu,e2e"]
    result = runner.invoke(
        app,
        [
            "eval",
            *common,
            "--model",
            str(tmp_path / "tiny"),
            "--max-new-tokens",
            "6",
            "--output",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    evaluated = report["metrics"]
    assert set(report["unavailable"]) == {"meteor", "rouge_l", "cider"}
    assert set(evaluated) == {"sacrebleu", "bleu", "nist", "meteor", "rouge_l", "cider"}
    assert (
        all(isinstance(evaluated[key], float) for key in ("sacrebleu", "bleu", "nist")) and evaluated["meteor"] is None
    )
    result = runner.invoke(
        app,
        [
            "score",
            *common,
            "--predictions",
            str(tmp_path / "eval" / "generations.jsonl"),
            "--output",
            str(tmp_path / "scored.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "scored.json").read_text())
    assert {key: scored[key] for key in evaluated} == evaluated
