"""CPU tests of the benchmarks' one report writer: run context, atomic files, markdown tables, bench output."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from triton_rerank.bench import report


def test_run_context_names_the_machine_cpu_gpu_versions_and_commit():
    ctx = report.run_context()
    assert ctx.cpu == report.cpu_model() and ctx.cores == report.usable_cores() >= 1
    assert ctx.gpu and ctx.python.count(".") == 2 and ctx.commit == report.git_commit()
    assert ctx.versions["torch"] != "-" and set(report.CONTEXT_PACKAGES) <= set(ctx.versions)
    line = ctx.describe()
    assert ctx.cpu in line and f"GPU {ctx.gpu}" in line and f"torch {ctx.versions['torch']}" in line
    assert report.context_of(ctx.__dict__) == ctx and report.context_of(None) is None
    assert report.package_versions(["no-such-package-here"]) == {"no-such-package-here": "-"}


def test_gpu_check_parent_imports_no_torch():
    """The GPU check's parent (and the modules it shares) must never import torch, even for the context."""
    code = ("import sys, json, dataclasses\n"
            "from triton_rerank.bench.gpu import check, results\n"
            "from triton_rerank.bench import random_model, report, workload\n"
            "ctx = report.run_context()\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
            "print(json.dumps(dataclasses.asdict(ctx)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"cpu"' in result.stdout


def test_atomic_writes(tmp_path):
    path = tmp_path / "out.md"
    assert report.atomic_write(path, "one\n") == path and path.read_text() == "one\n"
    report.atomic_write(path, b"two\n")
    assert path.read_bytes() == b"two\n"
    with pytest.raises(RuntimeError), report.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "two\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.md"]


def test_markdown_table_and_cells():
    text = report.markdown_table(["a", "b", "c"], [[1234567, 0.5, None], ["x|y", True, 1e-6], ["two\nlines", 150.0, 2]])
    assert text.splitlines() == [
        "| a | b | c |", "|---|---|---|",
        "| 1,234,567 | 0.500 | - |", "| x/y | yes | 1e-06 |", "| two lines | 150.0 | 2 |",
    ]
    assert report.fmt(float("nan")) == "nan" and report.fmt(123456.0) == "1.23e+05"


def test_bench_report_files_name_the_cpu(tmp_path):
    ctx = report.RunContext("vm (Linux x86_64)", "AMD EPYC 9654 (family 25 model 17, avx512)", 4, "none", "3.11.2",
                            {"torch": "2.13.0"}, "abc1234", "t")
    info = report.run_info("minilm (bert, 6 layers)", "float32", "cpu", "dl19 (1 queries x top 2)", 2,
                           command="bench", context=ctx)
    assert (info.cpu, info.cores, info.torch, info.commit, info.gpu) == (ctx.cpu, 4, "2.13.0", "abc1234", "none")
    rows = [report.Row("packed", "in-process", "offline", 0, "thr=2", "PackedEngine", 1, 2.0, 4.0),
            report.Row("triton-grpc", "server", "sweep", 1, "delay=0us", "ensemble", 4, 1.5, 3.0, 10.0, 12.0, 11.0)]
    written = report.write_bench_report(tmp_path, rows, rows, info, ["a note"])
    assert [p.name for p in written] == ["bench.csv", "bench_runs.csv", "bench.md", "bench.png"]
    with open(tmp_path / "bench.csv") as f:
        assert {r["cpu"] for r in csv.DictReader(f)} == {ctx.cpu}
    md = (tmp_path / "bench.md").read_text()
    assert ctx.cpu in md and "GPU" not in md.split("## Summary")[0] and "![throughput" in md
    assert not list(tmp_path.glob("*.tmp"))
    on_gpu = report.run_info("m", "bfloat16", "cuda", "w", 2,
                             context=report.RunContext("h", "cpu", 1, "NVIDIA H200 x 1", "3"))
    assert "; GPU NVIDIA H200 x 1;" in report.markdown(rows, on_gpu, None) and "GPU NVIDIA H200" in on_gpu.title()


def test_empty_bench_report_has_no_plot(tmp_path):
    info = report.run_info("m", "float32", "cpu", "w", 2, context=report.RunContext("h", "cpu", 1, "none", "3"))
    written = report.write_bench_report(tmp_path, [], [], info, [])
    assert [p.name for p in written] == ["bench.csv", "bench_runs.csv", "bench.md"]
