"""`triton-rerank serve` as a user runs it: README examples answered, clean stop, nothing left behind."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triton_rerank.client.launcher import free_ports, process_group_alive

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_http_and_grpc_examples():
    examples = readme_python_examples()
    assert any("tritonclient.http" in e for e in examples) and any("tritonclient.grpc" in e for e in examples)


def test_serve_answers_readme_examples_and_stops_cleanly(tiny_model_dirs, tmp_path):
    http, grpc, metrics = free_ports(3)
    command = [
        sys.executable, "-m", "triton_rerank.client.cli", "serve", "--model-path", str(tiny_model_dirs["bert"]),
        "--device", "cpu", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--run-dir", str(tmp_path / "run"),
    ]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    output = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            output.append(line)
            if "is ready" in line:
                break
        assert "is ready" in "".join(output), "".join(output)

        for example in readme_python_examples():
            code = example.replace("localhost:8000", f"127.0.0.1:{http}").replace("localhost:8001", f"127.0.0.1:{grpc}")
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert re.search(r"[-+]?\d+\.\d+", result.stdout), result.stdout

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    # The server ran in serve's process group's child session; none of its processes remain.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"processes left behind: {leftovers}"
    assert not process_group_alive(serve.pid)


def test_serve_with_missing_model_says_how_to_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "triton_rerank.client.cli", "serve", "--model-path", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "not a directory" in result.stderr


def test_serve_with_directory_without_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "triton_rerank.client.cli", "serve", "--model-path", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "has no config.json" in result.stderr


@pytest.mark.parametrize("command", [["--help"], ["serve", "--help"], ["make-test-model", "--help"]])
def test_help_explains(command):
    result = subprocess.run([sys.executable, "-m", "triton_rerank.client.cli", *command], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "usage: triton-rerank" in result.stdout


def test_make_test_model_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = subprocess.run([sys.executable, "-m", "triton_rerank.client.cli", "make-test-model",
                             str(tmp_path / "m"), "--arch", "bert"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert model.config.num_labels == 1 and model.config.model_type == "bert"
