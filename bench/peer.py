"""The peer server (Infinity, `infinity-emb` from PyPI) and an HTTP load generator for it.

Infinity lives in a virtual environment of its own (its pins clash with ours); the benchmark
starts it from that environment's Python on the same model directory, drives its POST /rerank
with the same requests as Triton at each concurrency level, and stops it.

Create that environment once (CPU torch, the same torch release as ours):

    python3 -m venv /tmp/infvenv
    /tmp/infvenv/bin/pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    /tmp/infvenv/bin/pip install "infinity-emb[server,torch]==0.0.78"

then pass `--infinity-python /tmp/infvenv/bin/python` to `triton-rerank bench`.

Its ONNX Runtime engine (`--infinity-engine optimum`) needs a venv of its own with older pins
(see INFINITY_OPTIMUM_SETUP) and an ONNX export of the model, which `prepare_model` writes into
a copy of the model directory (same weights, config and tokenizer) with that venv's torch.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INFINITY_VERSION = "0.0.78"
INFINITY_SETUP = (
    "python3 -m venv /tmp/infvenv\n"
    '/tmp/infvenv/bin/pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu\n'
    f'/tmp/infvenv/bin/pip install "infinity-emb[server,torch]=={INFINITY_VERSION}"'
)
# infinity-emb 0.0.78's optimum engine passes an absolute ONNX path, which optimum >= 2 refuses;
# optimum 1.24 pulls transformers 4.48, and the rest is what that resolves to without numpy 2.
INFINITY_OPTIMUM_SETUP = (
    "python3 -m venv /tmp/infvenv-ort\n"
    '/tmp/infvenv-ort/bin/pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu\n'
    f'/tmp/infvenv-ort/bin/pip install "infinity-emb[server,torch,optimum]=={INFINITY_VERSION}" '
    '"optimum[onnxruntime]==1.24.0" "numpy<2" "pandas<2.3" "pyarrow<19" "datasets<3.3"'
)
SERVED_NAME = "bench-reranker"


@dataclass
class InfinitySettings:
    python: str | None = None  # the Infinity venv's python
    command: str | None = None  # or a full command prefix, e.g. "/opt/inf/bin/infinity_emb"
    engine: str = "torch"
    batch_size: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    extra_args: tuple[str, ...] = ()


def infinity_prefix(settings: InfinitySettings) -> list[str]:
    """The command that starts Infinity's CLI: --infinity-cmd as given, else the venv's script."""
    if settings.command:
        return shlex.split(settings.command)
    if not settings.python:
        raise FileNotFoundError("no Infinity given: pass --infinity-python or --infinity-cmd")
    python = Path(settings.python)
    if not python.is_file():
        raise FileNotFoundError(f"{python} does not exist")
    script = python.parent / "infinity_emb"
    return [str(script)] if script.is_file() else [str(python), "-m", "infinity_emb.cli"]


def infinity_command(settings: InfinitySettings, model_dir: Path, port: int) -> list[str]:
    return [
        *infinity_prefix(settings), "v2",
        "--model-id", str(model_dir), "--served-model-name", SERVED_NAME,
        "--engine", settings.engine, "--device", settings.device, "--dtype", settings.dtype,
        "--batch-size", str(settings.batch_size),
        "--host", "127.0.0.1", "--port", str(port),
        # Our own warm-up follows; its built-in one spends ~20 s on 512-token batches.
        "--no-model-warmup", "--no-vector-disk-cache", "--log-level", "warning",
        *settings.extra_args,
    ]


# Runs in the Infinity venv (its torch and onnx): the legacy TorchScript exporter, which needs
# neither optimum's exporter (broken with optimum 1.24 on torch 2.13: it wants onnxscript) nor onnxscript.
_EXPORT_ONNX = """
import sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
ids = torch.ones(2, 16, dtype=torch.long)
axes = {0: "batch", 1: "sequence"}
names = ["input_ids", "attention_mask", "token_type_ids"]
torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), sys.argv[2], input_names=names,
                  output_names=["logits"], dynamic_axes={**{n: axes for n in names}, "logits": {0: "batch"}},
                  opset_version=17, dynamo=False)
"""


def prepare_model(settings: InfinitySettings, model_dir: Path, work: Path) -> Path:
    """The directory Infinity serves: `model_dir` itself, or for the optimum engine a copy of it
    with `model.onnx` (the same weights) exported in the Infinity venv (made once, then reused)."""
    import shutil

    if settings.engine != "optimum":
        return model_dir
    target = work / f"infinity-onnx-{model_dir.name}"
    if (target / "model.onnx").is_file():
        return target
    if not settings.python:
        raise FileNotFoundError("the optimum engine needs --infinity-python (to export the ONNX model)")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target)
    result = subprocess.run([settings.python, "-c", _EXPORT_ONNX, str(model_dir), str(target / "model.onnx.tmp")],
                            capture_output=True, text=True, timeout=900, env=infinity_environment(settings))
    if result.returncode != 0:
        raise RuntimeError(f"ONNX export failed: {result.stderr[-1500:]}")
    (target / "model.onnx.tmp").rename(target / "model.onnx")
    return target


def infinity_environment(settings: InfinitySettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # The same torch thread count as every other contender; nothing reaches the network.
        "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
        "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "TOKENIZERS_PARALLELISM": "true",
    })
    return env


def infinity_version(settings: InfinitySettings) -> str:
    """Installed infinity-emb version (for the report), or 'unknown'."""
    python = settings.python or sys.executable
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('infinity_emb'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


@contextmanager
def running_infinity(settings: InfinitySettings, model_dir: Path, log_file: Path, port: int,
                     ready_timeout: float = 300.0) -> Iterator[str]:
    """Infinity serving `model_dir` on 127.0.0.1:port; yields its base URL; stopped on exit."""
    import httpx

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(infinity_command(settings, model_dir, port), env=infinity_environment(settings),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Infinity exited with code {process.returncode}; see {log_file}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Infinity not ready after {ready_timeout:.0f} s; see {log_file}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    latencies_s: list[float]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def rerank_body(query: str, documents: Sequence[str]) -> dict:
    """Infinity's (and Cohere's) POST /rerank body."""
    return {"model": SERVED_NAME, "query": query, "documents": list(documents), "return_documents": False}


async def _drive(url: str, bodies: list[dict], concurrency: int, count: int, timeout: float) -> LoadResult:
    import httpx

    latencies: list[float] = []
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < count:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            started = time.perf_counter()
            response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), seconds, latencies)


def drive_http(url: str, bodies: list[dict], concurrency: int, count: int, timeout: float = 300.0) -> LoadResult:
    """Sends `count` requests (cycling through `bodies`), `concurrency` in flight at any time.

    Like perf_analyzer's --request-count: the same number of requests per level for every
    server, each worker sending its next request as soon as its previous answer arrived.
    """
    if concurrency < 1 or count < 1:
        raise ValueError("concurrency and count must be >= 1")
    return asyncio.run(_drive(url, bodies, concurrency, count, timeout))
