"""`triton-rerank serve` as a user runs it: README examples and the gateway answered, clean stop, nothing left behind."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests

from triton_rerank.gateway.protocol import SEED_EXAMPLE
from triton_rerank.launcher.server import free_ports, process_group_alive


def test_readme_has_http_and_grpc_examples(readme):
    examples = readme.examples()
    assert any("tritonclient.http" in e for e in examples) and any("tritonclient.grpc" in e for e in examples)


def test_serve_answers_readme_examples_and_stops_cleanly(tiny_model_dirs, tmp_path, readme, serve_banner):
    http, grpc, metrics, api = free_ports(4)
    command = [
        sys.executable, "-m", "triton_rerank", "serve", "--model-path", str(tiny_model_dirs["bert"]),
        "--device", "cpu", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--api-port", str(api), "--run-dir", str(tmp_path / "run"), "--max-documents", "40",
    ]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        banner = serve_banner(serve)
        output = banner.splitlines(keepends=True)
        assert "is ready" in banner and f"rerank API  http://127.0.0.1:{api}" in banner, banner
        # The startup line says what --dtype auto means on this CPU, and why.
        from triton_rerank.models.dtypes import auto_dtype

        dtype, why = auto_dtype("cpu")
        assert f"encoder dtype {dtype} (auto: {why})" in banner, banner

        for example in readme.examples():
            code = readme.localize(example, http, grpc, api)
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert re.search(r"[-+]?\d+\.\d+", result.stdout), result.stdout

        # The gateway answers SGLang's example request (the shape the seed's code reads) ...
        response = requests.post(f"http://127.0.0.1:{api}/v1/rerank", json=SEED_EXAMPLE, timeout=60)
        assert response.status_code == 200, response.text
        assert {item["document"] for item in response.json()} == set(SEED_EXAMPLE["documents"])
        assert all(isinstance(item["score"], float) for item in response.json())
        # ... and the curl the banner prints works as printed.
        curl = next(line.strip() for line in output if line.strip().startswith("curl "))
        if shutil.which("curl"):
            result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and [i["index"] for i in json.loads(result.stdout)], result.stdout

        # --max-documents is one limit for every door: the gateway and both steps of the ensemble.
        for step in ("tokenizer", "cross_encoder"):
            config = (tmp_path / "run" / "model_repository" / step / "config.pbtxt").read_text()
            assert re.search(r'key: "max_documents"\s+value \{\s+string_value: "40"', config), config
        # Over HTTP (--http-port is the gateway's KServe front) the gateway refuses it ...
        too_many = {"QUERY": "q", "DOCUMENTS": ["d"] * 41}
        response = requests.post(f"http://127.0.0.1:{http}/v2/models/reranker/generate", json=too_many, timeout=60)
        assert response.status_code == 413 and "the limit is 40 (--max-documents)" in response.text, response.text
        # ... and over gRPC, straight to Triton, the ensemble's own steps do.
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as client:
            inputs = [grpcclient.InferInput("QUERY", [1], "BYTES"), grpcclient.InferInput("DOCUMENTS", [41], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([b"q"], dtype=object))
            inputs[1].set_data_from_numpy(np.array([b"d"] * 41, dtype=object))
            with pytest.raises(InferenceServerException) as refused:
                client.infer("reranker", inputs)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "at most 40" in refused.value.message()

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        assert "stopping the gateway and tritonserver" in serve.stdout.read()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    # The server ran in serve's process group's child session; none of its processes remain.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"processes left behind: {leftovers}"
    assert not process_group_alive(serve.pid)
    # The gateway ran in serve's process: its port is free again.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", api)) != 0, "the gateway still listens after serve stopped"


def test_serve_without_api_prints_the_generate_curl():
    from triton_rerank.launcher.serve import ready_banner
    from triton_rerank.launcher.server import ServerAddress

    banner = ready_banner(ServerAddress("0.0.0.0", 8000, 8001, 8002))
    assert "rerank API" not in banner and "curl -s http://127.0.0.1:8000/v2/models/reranker/generate" in banner


def test_serve_with_missing_model_says_how_to_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "triton_rerank", "serve", "--model-path", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "not a directory" in result.stderr


def test_serve_with_directory_without_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "triton_rerank", "serve", "--model-path", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "has no config.json" in result.stderr


@pytest.mark.parametrize("command", [["--help"], ["serve", "--help"], ["api", "--help"], ["rerank", "--help"],
                                     ["make-test-model", "--help"]])
def test_help_explains(command):
    result = subprocess.run([sys.executable, "-m", "triton_rerank", *command], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "usage: triton-rerank" in result.stdout


def test_make_test_model_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = subprocess.run([sys.executable, "-m", "triton_rerank", "make-test-model",
                             str(tmp_path / "m"), "--arch", "bert"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert model.config.num_labels == 1 and model.config.model_type == "bert"
