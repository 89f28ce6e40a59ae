"""The frozen base's precision: ``--dtype auto``, and one warning where a precision is emulated.

A bfloat16 base halves a train step only where the hardware multiplies bfloat16 itself: CUDA GPUs
with native bf16 (``torch.cuda.is_bf16_supported(including_emulation=False)``) and CPUs with
AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (ARM), as torch's own runtime query
``torch.cpu.get_capabilities()`` reports them. Elsewhere torch emulates it: on an AVX2-only CPU a
user measured ~35x slower train steps (issue 20). So `resolve_dtype` maps ``auto`` to bfloat16
only where it is native and to float32 elsewhere, and an explicit bfloat16/float16 where it is not
native still runs but warns once per process (`SlowPrecisionWarning`). `cpu_record` is what every
benchmark JSON stores about the CPU it ran on.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what --dtype accepts
AVX2_BF16_SLOWDOWN = "~35x slower train steps than float32 (a user's report on an AVX2-only EPYC, issue 20)"
RECORDED_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")  # in cpu_record
_warned: set[tuple[torch.dtype, str]] = set()  # (dtype, device type) already warned about
_printed: set[str] = set()  # auto's choices already printed


class SlowPrecisionWarning(UserWarning):
    """An explicit precision the device does not run natively (it runs, emulated and slower)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's runtime CPU feature flags (``avx512_bf16``, ``amx_bf16``, ... -> bool); the one place
    that asks, so tests patch it. ``torch.cpu.get_capabilities()`` is public from torch 2.11 on;
    older torch (still in our range) has no public query, so it reports nothing (never native)."""
    query = getattr(torch.cpu, "get_capabilities", None)
    return query() if query is not None else {}


def _cpu_native(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether this CPU multiplies `dtype` natively, and the capability that says so (for messages).

    x86 needs the instructions (AVX512-BF16/AMX-BF16; AVX512-FP16/AMX-FP16) and torch dispatching
    its AVX512 kernels (``ATEN_CPU_CAPABILITY=avx2`` makes even an AVX512-BF16 CPU emulate bfloat16)."""
    flags = cpu_capabilities()
    level = torch.backends.cpu.get_cpu_capability()  # the kernels torch dispatches to: AVX2, AVX512, ...
    if not flags:
        return False, f"this CPU ({level}): torch {torch.__version__} has no torch.cpu.get_capabilities() to ask"
    if "neon" in flags:  # ARM
        wanted = {"bf16": "the BF16 extension"} if dtype == torch.bfloat16 else {"fp16_arith": "FP16 arithmetic"}
    elif dtype == torch.bfloat16:
        wanted = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    else:
        wanted = {"avx512_fp16": "AVX512-FP16", "amx_fp16": "AMX-FP16"}
    present = [name for flag, name in wanted.items() if flags.get(flag)]
    if not present:
        return False, f"this CPU ({level}) has no {' or '.join(wanted.values())}"
    if "neon" not in flags and not level.startswith("AVX512"):
        return False, f"this CPU has {' and '.join(present)} but torch runs its {level} kernels"
    return True, f"this CPU ({level}) has {' and '.join(present)}"


def _cuda_native(dtype: torch.dtype) -> tuple[bool, str]:
    if dtype == torch.float16:
        return True, "CUDA runs float16 natively"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, "this GPU runs bfloat16 natively (torch.cuda.is_bf16_supported)"
    return False, "this GPU has no native bfloat16 (torch.cuda.is_bf16_supported(including_emulation=False) is False)"


def is_native(dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether `device` runs `dtype` natively, and why (float32 always is)."""
    if dtype == torch.float32:
        return True, "float32 runs natively everywhere"
    kind = torch.device(device).type
    if kind == "cuda":
        return _cuda_native(dtype)
    if kind == "cpu":
        return _cpu_native(dtype)
    return False, f"device {kind!r}: no native-precision check for it"


def resolve_dtype(
    requested: str | torch.dtype, device: str | torch.device = "cpu", *, autocast: bool = False
) -> tuple[torch.dtype, str]:
    """(dtype, reason) for the frozen base on `device` (``cpu``, ``cuda``, ``cuda:1``; already resolved).

    ``auto``: bfloat16 where `device` runs it natively, else float32; the choice is printed once
    (stderr). With `autocast` (``--bf16``/``--fp16``), ``auto`` keeps float32 weights, the ones
    autocast is for. An explicit name or torch dtype is kept; if `device` would emulate it, a
    `SlowPrecisionWarning` names the capability and the expected slowdown, once per process."""
    if requested == "auto":
        return _auto(device, autocast)
    if isinstance(requested, torch.dtype) and requested in DTYPES.values():
        dtype = requested
    elif requested in DTYPES:
        dtype = DTYPES[requested]
    else:
        raise ConfigError(f"dtype: expected one of {list(DTYPE_CHOICES)}, got {requested!r}")
    native, why = is_native(dtype, device)
    if native:
        return dtype, f"requested {dtype_name(dtype)}; {why}"
    _warn_once(dtype, device, why)
    return dtype, f"requested {dtype_name(dtype)}, though {why} (emulated, slower)"


def _auto(device: str | torch.device, autocast: bool) -> tuple[torch.dtype, str]:
    if autocast:
        dtype, reason = torch.float32, "auto with --bf16/--fp16: autocast runs over float32 weights"
    else:
        native, why = is_native(torch.bfloat16, device)
        dtype = torch.bfloat16 if native else torch.float32
        reason = f"auto: {why}, so {'bfloat16 runs natively' if native else 'bfloat16 would be emulated'}"
    line = f"precision: {dtype_name(dtype)} ({reason})"
    if line not in _printed:
        _printed.add(line)
        print(line, file=sys.stderr)
    return dtype, reason


def _warn_once(dtype: torch.dtype, device: str | torch.device, why: str) -> None:
    kind = torch.device(device).type
    if (dtype, kind) in _warned:
        return
    _warned.add((dtype, kind))
    avx2 = kind == "cpu" and dtype == torch.bfloat16 and torch.backends.cpu.get_cpu_capability() == "AVX2"
    slowdown = AVX2_BF16_SLOWDOWN if avx2 else "slower steps than float32 (how much: not measured on such a device)"
    fastest = "bfloat16" if is_native(torch.bfloat16, device)[0] else "float32"
    warnings.warn(
        f"{dtype_name(dtype)} is emulated here: {why}; expect {slowdown}. "
        f"--dtype auto picks the fastest native precision ({fastest} here).",
        SlowPrecisionWarning,
        stacklevel=3,
    )


def cpu_record() -> dict[str, Any]:
    """What a benchmark JSON records about the CPU it ran on: torch's kernel level
    (``get_cpu_capability()``), whether bfloat16 is native (the rule ``auto`` uses), the flags, and
    the load average when it was written (the machine may be shared)."""
    flags = cpu_capabilities()
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": is_native(torch.bfloat16, "cpu")[0],
        "flags": {key: bool(flags.get(key)) for key in RECORDED_FLAGS},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # when the JSON was written: others' load on a shared machine
    }
