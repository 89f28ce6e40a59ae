"""``--dtype auto`` picks bfloat16 only where the device runs it natively (torch's capability
queries, patched here to stand for each kind of machine), float32 elsewhere; an explicit emulated
precision still runs but warns once; train_summary.json says what was chosen and why."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from prefixtune import cli, load_base_model, precision
from prefixtune.precision import SlowPrecisionWarning, cpu_record, resolve_dtype
from prefixtune.training import TrainOptions

AVX2_EPYC = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
SAPPHIRE_RAPIDS = {**AVX2_EPYC, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a new process would: nothing warned or printed yet."""
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "_printed", set())


def cpu(monkeypatch, flags: dict, level: str) -> None:
    """Make this machine's CPU look like `flags` (torch.cpu.get_capabilities) at kernel `level`."""
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)


def fake_cuda(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: pytest.fail("the CPU was asked about a GPU"))


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch):
    cpu(monkeypatch, AVX2_EPYC, "AVX2")
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32
    assert reason == "auto: this CPU (AVX2) has no AVX512-BF16 or AMX-BF16, so bfloat16 would be emulated"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bfloat16_on_a_cpu_with_avx512_bf16_or_amx_bf16(monkeypatch, flag):
    cpu(monkeypatch, {**AVX2_EPYC, "avx512_f": True, flag: True}, "AVX512")
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.bfloat16
    assert reason.startswith("auto: this CPU (AVX512) has ") and "runs natively" in reason


def test_auto_is_float32_when_torch_runs_avx2_kernels_on_a_bf16_cpu(monkeypatch):
    cpu(monkeypatch, SAPPHIRE_RAPIDS, "AVX2")  # e.g. ATEN_CPU_CAPABILITY=avx2
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32
    assert reason.startswith("auto: this CPU has AVX512-BF16 and AMX-BF16 but torch runs its AVX2 kernels")


@pytest.mark.parametrize(("bf16", "want"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_a_gpu_follows_cuda_bf16_support(monkeypatch, bf16, want):
    fake_cuda(monkeypatch, bf16)
    assert resolve_dtype("auto", "cuda")[0] == want
    assert resolve_dtype("auto", "cuda:1")[0] == want


def test_explicit_bfloat16_on_a_gpu_without_it_warns_naming_the_query(monkeypatch):
    fake_cuda(monkeypatch, bf16=False)
    with pytest.warns(SlowPrecisionWarning, match=r"is_bf16_supported\(including_emulation=False\) is False"):
        assert resolve_dtype("bfloat16", "cuda")[0] == torch.bfloat16
    assert resolve_dtype("float16", "cuda")[0] == torch.float16  # native on CUDA: no warning (would raise above)


def test_explicit_bfloat16_on_a_non_native_cpu_runs_and_warns_exactly_once(monkeypatch, tiny_folder):
    cpu(monkeypatch, AVX2_EPYC, "AVX2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count our own once-guard, not Python's default filter
        assert resolve_dtype("bfloat16", "cpu")[0] == torch.bfloat16
        assert resolve_dtype(torch.bfloat16, "cpu")[0] == torch.bfloat16
        base, _ = load_base_model(str(tiny_folder), dtype="bfloat16")
        assert base.dtype == torch.bfloat16  # it still runs as asked
        resolve_dtype("auto", "cpu")  # auto never warns
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert len(slow) == 1
    message = str(slow[0].message)
    assert message.startswith("bfloat16 is emulated here: this CPU (AVX2) has no AVX512-BF16 or AMX-BF16")
    assert "~35x slower train steps than float32" in message and "float32 here" in message


def test_auto_warns_never_and_prints_its_choice_once(monkeypatch, capsys):
    cpu(monkeypatch, SAPPHIRE_RAPIDS, "AVX512")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    printed = capsys.readouterr().err.splitlines()
    reason = "auto: this CPU (AVX512) has AVX512-BF16 and AMX-BF16, so bfloat16 runs natively"
    assert printed == [f"precision: bfloat16 ({reason})"]


def test_auto_under_autocast_keeps_float32_weights(monkeypatch):
    cpu(monkeypatch, SAPPHIRE_RAPIDS, "AVX512")
    assert resolve_dtype("auto", "cpu", autocast=True) == (
        torch.float32,
        "auto with --bf16/--fp16: autocast runs over float32 weights",
    )


def test_unknown_dtype_is_refused_by_name():
    expected = r"dtype: expected one of \['auto', 'float32', 'bfloat16', 'float16'\], got 'fp8'"
    with pytest.raises(ValueError, match=expected):
        resolve_dtype("fp8", "cpu")


def test_an_older_torch_without_the_capability_query_gets_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "has no torch.cpu.get_capabilities() to ask" in reason


def test_the_capability_query_is_torchs_own_and_the_benchmark_record_uses_it():
    flags = precision.cpu_capabilities()
    assert dict(flags) == dict(torch.cpu.get_capabilities())
    record = cpu_record()
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["bf16_native"] == (resolve_dtype("auto", "cpu")[0] == torch.bfloat16)
    if flags.get("architecture") == "x86_64":
        assert record["flags"]["avx512_bf16"] == bool(flags["avx512_bf16"])


def test_every_command_and_load_base_model_default_to_auto():
    for command in (cli.evaluate, cli.generate, cli.serve, cli.demo):
        assert inspect.signature(command).parameters["dtype"].default.default == "auto", command.__name__
    assert TrainOptions.from_flat(data="d.jsonl", output="out").dtype == "auto"
    assert inspect.signature(load_base_model).parameters["dtype"].default == "auto"


@pytest.mark.parametrize(("flags", "want"), [(AVX2_EPYC, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")])
def test_train_summary_records_the_dtype_auto_chose_and_why(monkeypatch, tiny_folder, tmp_path, flags, want):
    cpu(monkeypatch, flags, "AVX512" if flags["avx512_f"] else "AVX2")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {w}", "completion": " is good"}) + "\n" for w in "ab"))
    arguments = ["--model", str(tiny_folder), "--data", str(data), "--output", str(tmp_path / "run")]
    arguments += ["--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, ["train", *arguments])  # --dtype not given: auto
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["options"]["dtype"] == "auto"
    assert summary["dtype"] == want
    assert summary["dtype_reason"] == resolve_dtype("auto", "cpu")[1]
