"""A miniature `triton-rerank bench` run end to end: tiny model, real tritonserver and perf_analyzer."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest


@pytest.mark.server
def test_bench_mini_run(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "triton_rerank", "bench", "--quick",
        "--model-dir", str(tiny_model_dirs["bert"]), "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--workload", "synthetic", "--synthetic", "q=4,d=12,r=4", "--docs-per-request", "5",
        "--concurrency", "1,2", "--protocols", "grpc", "--repeat", "2", "--requests-per-level", "4", "--latency-repeats", "2",
        "--warmup", "2", "--contenders", "hf,packed,triton",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["contender"], r["measure"], r["concurrency"]) for r in rows}
    assert {("triton-grpc", "sweep", "1"), ("triton-grpc", "sweep", "2"), ("hf-padded", "offline", "0"),
            ("packed", "offline", "0"), ("packed", "latency", "1"), ("triton-grpc", "paired", "1"),
            ("packed", "paired", "1")} <= by
    assert all(float(r["pairs_per_s"]) > 0 and r["runs"] == "2" for r in rows)
    with open(out / "bench_runs.csv") as f:
        assert {r["run"] for r in csv.DictReader(f)} == {"1", "2"}
    assert all(r["workload"].startswith("synthetic") and r["docs_per_request"] == "5" for r in rows)
    c1 = next(r for r in rows if r["contender"] == "triton-grpc" and r["measure"] == "sweep" and r["concurrency"] == "1")
    assert float(c1["encoder_ms"]) > 0 and float(c1["tokenizer_ms"]) > 0 and c1["overhead_ms"] != ""
    packed = next(r for r in rows if r["contender"] == "packed" and r["measure"] == "latency")
    assert float(packed["tokenizer_ms"]) > 0 and float(packed["encoder_ms"]) > 0
    text = (out / "bench.md").read_text()
    assert "triton-grpc" in text and "failed" not in text and (out / "bench.png").stat().st_size > 0
    # No --dtype: every contender in the precision `serve` picks on this CPU, said in the report.
    from triton_rerank.models.dtypes import auto_dtype

    assert f"dtype auto: {auto_dtype('cpu')[0]} for every contender" in text
    assert {r["dtype"] for r in rows} == {auto_dtype("cpu")[0]}
