"""benchmarks/serve_bench.py in --quick mode (tiny model): it finishes, both engines answer every
request, and greedy outputs agree across engines and phases. Timings are not asserted here."""

from __future__ import annotations

import json

import pytest

from test_benchmarks_smoke import assert_cpu_recorded, run

pytestmark = pytest.mark.slow  # the benchmark's quick run, in a subprocess


def test_serve_bench_quick_has_no_errors_or_mismatches(tmp_path):
    out = tmp_path / "serve.json"
    args = ["--requests", "6", "--many", "20", "--prompt-tokens", "8", "32", "--max-tokens", "4", "8"]
    result = run("serve_bench.py", *args, "--json", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert_cpu_recorded(report)
    assert report["outcome"] == "ok" and report["ratios"]  # the last write: the whole run, with its ratios
    phases = report["phases"]
    measured = [p for p in phases.values() if "requests" in p]
    assert len(measured) == 6 and all(p["errors"] == 0 and p["mismatches"] == 0 for p in measured)
    # the server's usage reached the client: work done counts prompts as well as outputs
    assert all(p["processed_tok_per_s"] > p["output_tok_per_s"] > 0 for p in measured)
    assert {
        "saturation, 1 prefix, old engine",
        "saturation, 1 prefix, new engine",
        "saturation, 8 prefixes, new engine",  # N = 100 is left out: the store holds 20
        "saturation, 20 prefixes, new engine",
    } <= set(phases)
