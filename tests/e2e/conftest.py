"""A real tritonserver per tiny model, started once per session on free ports."""

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from triton_rerank.launcher.repository import RepositorySettings, render_model_repository
from triton_rerank.launcher.server import ServerAddress, TritonServer, free_ports, process_group_alive


@dataclass
class RunningServer:
    arch: str
    model_dir: Path
    address: ServerAddress
    server: TritonServer

    @property
    def http_url(self) -> str:
        return self.address.http_url

    @property
    def grpc_url(self) -> str:
        return self.address.grpc_url


def start_server(model_dir: Path, run_dir: Path, arch: str, **settings) -> RunningServer:
    http, grpc, metrics = free_ports(3)
    address = ServerAddress("127.0.0.1", http, grpc, metrics)
    # float32 unless a test says otherwise: scores are compared with transformers' float32 (dtype=auto
    # would be bfloat16 on CPUs with AMX or AVX512-BF16).
    settings.setdefault("dtype", "float32")
    repository = render_model_repository(
        RepositorySettings(model_path=str(model_dir), device="cpu", **settings), run_dir / "model_repository"
    )
    # Short exit timeout: a test client's idle keep-alive connection must not hold the shutdown.
    server = TritonServer(repository, run_dir, address, extra_args=["--exit-timeout-secs=3"]).start()
    try:
        server.wait_ready(180)
    except Exception:
        server.stop()
        raise
    return RunningServer(arch, model_dir, address, server)


def stop_server(running: RunningServer) -> None:
    pgid = running.server.process.pid
    running.server.stop()
    assert not process_group_alive(pgid), "tritonserver or a backend stub outlived the server fixture"


class ServerPool:
    """Starts at most one server per architecture, on first use, and stops them all at the end."""

    def __init__(self, model_dirs: dict, tmp_path_factory):
        self.model_dirs = model_dirs
        self.tmp_path_factory = tmp_path_factory
        self.servers: dict[str, RunningServer] = {}

    def get(self, arch: str) -> RunningServer:
        if arch not in self.servers:
            run_dir = self.tmp_path_factory.mktemp(f"run-{arch}")
            self.servers[arch] = start_server(self.model_dirs[arch], run_dir, arch)
        return self.servers[arch]

    def stop_all(self) -> None:
        for running in self.servers.values():
            stop_server(running)


@pytest.fixture(scope="session")
def server_pool(tiny_model_dirs, tmp_path_factory):
    pool = ServerPool(tiny_model_dirs, tmp_path_factory)
    yield pool
    pool.stop_all()


@pytest.fixture(params=["xlm-roberta", "bert"])
def triton_server(request, server_pool) -> RunningServer:
    """tritonserver serving the `reranker` ensemble on a tiny random model of each architecture."""
    return server_pool.get(request.param)


@pytest.fixture
def xlmr_server(server_pool) -> RunningServer:
    """The XLM-R server, for tests that need one server rather than each architecture."""
    return server_pool.get("xlm-roberta")


@pytest.fixture
def start_extra_server(tmp_path):
    """Starts a server with other settings for one test; stops it (and checks for leftovers) after."""
    started = []

    def start(model_dir: Path, arch: str, **settings) -> RunningServer:
        running = start_server(model_dir, tmp_path / f"run{len(started)}", arch, **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        stop_server(running)


class ReadmeExamples:
    """The README's Python examples, and how to point them at a test's server."""

    path = Path(__file__).resolve().parents[2] / "README.md"

    def examples(self, decoder: bool = False) -> list[str]:
        """Examples for a cross-encoder server, or (decoder) those for a decoder reranker (they pass an instruction)."""
        examples = re.findall(r"```python\n(.*?)```", self.path.read_text(), flags=re.S)
        return [e for e in examples if ("instruction=" in e) == decoder]

    @staticmethod
    def localize(code: str, http: int, grpc: int, api: int) -> str:
        """README examples name the default ports; point them at this test's server."""
        for default, port in (("8000", http), ("8001", grpc), ("30000", api)):
            for host in ("localhost", "127.0.0.1"):
                code = code.replace(f"{host}:{default}", f"127.0.0.1:{port}")
        return code


@pytest.fixture(scope="session")
def readme() -> ReadmeExamples:
    return ReadmeExamples()


def read_banner(serve, timeout: float = 180.0) -> str:
    """What `triton-rerank serve` (a Popen with text stdout) prints until it says it is ready, exits, or
    `timeout` seconds pass."""
    output = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = serve.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Ctrl-C stops" in line:
            break
    return "".join(output)


@pytest.fixture(scope="session")
def serve_banner():
    """`read_banner`, for tests that start `triton-rerank serve` themselves."""
    return read_banner
