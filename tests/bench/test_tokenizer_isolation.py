"""A few seconds of bench/tokenizer_isolation.py against a real tritonserver on the tiny XLM-R model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from triton_rerank.bench.tokenizer_isolation import big_document, describe
from triton_rerank.launcher.repository import RepositorySettings, render_model_repository
from triton_rerank.launcher.server import ServerAddress, TritonServer, free_ports

SCRIPT = [sys.executable, "-m", "triton_rerank.bench.tokenizer_isolation"]


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("isolation")
    address = ServerAddress("127.0.0.1", *free_ports(3))
    repository = render_model_repository(
        RepositorySettings(model_path=str(tiny_model_dirs["xlm-roberta"]), device="cpu"), run_dir / "model_repository")
    running = TritonServer(repository, run_dir, address, extra_args=["--exit-timeout-secs=3"]).start()
    try:
        running.wait_ready(180)
        yield address, running.process.pid
    finally:
        running.stop()


def test_help_says_what_it_measures():
    result = subprocess.run([*SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--big-doc-bytes" in result.stdout and "p99" in result.stdout and "nospace" in result.stdout


def test_big_documents_are_the_size_asked():
    assert len(big_document(10_000, "words")) in range(9_990, 10_001)
    text = big_document(9_000, "nospace")
    assert len(text) == 9_000 and b" " not in text and text.decode()


@pytest.mark.server
def test_short_run_reports_latency_and_tokenizer_memory(server):
    address, pid = server
    command = [*SCRIPT, "--grpc-url", address.grpc_url, "--duration", "2", "--warmup", "0.5",
               "--big-docs", "4", "--big-doc-bytes", "200000", "--server-pid", str(pid), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    for phase in ("small_alone", "small_loaded"):
        assert report[phase]["requests"] > 0 and report[phase]["outcomes"] == {"ok": report[phase]["requests"]}
        assert 0 < report[phase]["p50_ms"] <= report[phase]["p99_ms"] <= report[phase]["max_ms"]
    assert report["big"]["outcomes"].get("ok", 0) >= 1 and set(report["big"]["outcomes"]) == {"ok"}
    assert report["p99_increase_ms"] == report["small_loaded"]["p99_ms"] - report["small_alone"]["p99_ms"]
    # One backend stub per tokenizer instance (config.pbtxt's instance_group), each measured.
    memory = report["memory_before"]
    assert memory["tokenizer_instances"] >= 1
    assert len(memory["tokenizer_rss_per_instance_bytes"]) == memory["tokenizer_instances"]
    assert all(rss > 10 << 20 for rss in memory["tokenizer_rss_per_instance_bytes"])
    assert memory["group_rss_bytes"] > memory["tokenizer_rss_bytes"]
    assert report["memory_peak"]["tokenizer_rss_bytes"] >= memory["tokenizer_rss_bytes"] // 2
    assert report["context"]["cpu"] and report["context"]["cores"] >= 1
    assert "p99 increase" in describe(report)
