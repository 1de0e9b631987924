"""`pip install .` (not editable) and then `triton-rerank serve` from any directory, as a user does.

The wheel is built from the checkout and installed into a fresh virtual environment; the other
dependencies come from the test environment through a path entry (installing torch and the
Triton wheel again would take minutes and bring nothing new to check). What this proves: the
package, its console script and the model repository (package data, found by importlib.resources)
work from site-packages with the checkout out of reach.
"""

import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from triton_rerank.launcher.server import free_ports, process_group_alive

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this checkout; returns its bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build leaves build/ and *.egg-info behind in the source tree.
    source = shutil.copytree(CHECKOUT, root / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "results", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("triton_rerank-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies: this environment's site-packages as a plain path entry. Its .pth files (the
    # editable install's finder among them) are not run from there, so triton_rerank comes from the wheel.
    Path(purelib, "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin"


def test_package_comes_from_the_wheel(installed, tmp_path):
    probe = ("import importlib.resources, triton_rerank; "
             "print(triton_rerank.__file__); "
             "print((importlib.resources.files('triton_rerank') / 'model_repository' / 'reranker' / 'config.pbtxt').is_file())")
    out = subprocess.run([str(installed / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         check=True, timeout=60).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(installed.parent.resolve()) and out[1] == "True", out


def test_make_test_model_and_serve_from_any_directory(installed, tmp_path):
    import tritonclient.http as httpclient

    env = {**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(installed / "triton-rerank"), "make-test-model", "model"], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=300)
    http, grpc, metrics, api = free_ports(4)
    serve = subprocess.Popen(
        [str(installed / "triton-rerank"), "serve", "--model-path", "model", "--device", "cpu",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--api-port", str(api)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    output = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "Ctrl-C stops" not in "".join(output):
            line = serve.stdout.readline()
            if not line:
                break
            output.append(line)
        assert "is ready" in "".join(output), "".join(output)
        documents = ["hi", "The giant panda is a bear native to China.", ""]
        inputs = [httpclient.InferInput("QUERY", [1], "BYTES"), httpclient.InferInput("DOCUMENTS", [3], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"what is panda?"], dtype=object))
        inputs[1].set_data_from_numpy(np.array([d.encode() for d in documents], dtype=object))
        with httpclient.InferenceServerClient(f"127.0.0.1:{http}") as client:
            scores = client.infer("reranker", inputs).as_numpy("SCORES")[0]
        assert scores.shape == (3,) and np.isfinite(scores).all()
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        finally:
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGKILL)
    assert serve.returncode == 0, "".join(output) + serve.stdout.read()
    assert not process_group_alive(serve.pid)
