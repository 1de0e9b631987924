"""Starting the real `tritonserver` bundled in the `nvidia-pytriton` wheel on our model repository.

Only the wheel's files are used: the server binary, the Python backend, and the backend stub
built for the running Python. The stub finds this environment's packages through `PATH` (the
environment's `bin` first) and the server's shared libraries through `LD_LIBRARY_PATH`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from .supervisor import StubSupervisor

# The repository's own model_repository/ (this file lives in client/).
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


class LauncherError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the installed nvidia-pytriton wheel."""

    root: Path

    @classmethod
    def find(cls) -> TritonInstall:
        try:
            import pytriton
        except ImportError:
            raise LauncherError(
                "nvidia-pytriton is not installed: `pip install nvidia-pytriton==0.7.0` (it carries tritonserver)"
            ) from None
        return cls(Path(pytriton.__file__).parent)

    @property
    def server(self) -> Path:
        return self.root / "tritonserver" / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "tritonserver" / "backends" / "python"

    @property
    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise LauncherError(f"the wheel has no Python backend stub for Python {version}; use Python 3.8-3.13")
        return stub

    @property
    def libs(self) -> Path:
        return self.root.parent / "nvidia_pytriton.libs"


def prepare_backends(install: TritonInstall, run_dir: Path) -> Path:
    """A backend directory holding the Python backend with the stub for this Python."""
    backends = run_dir / "backends"
    target = backends / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(install.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, target / "triton_python_backend_stub")
    return backends


def python_library_dir() -> str | None:
    """The directory of this Python's shared libpython, if it has one.

    The stub links `libpython3.X.so.1.0` by name. Found in the system directory, it may be a
    different patch release than the interpreter whose standard library the stub then
    imports (e.g. Debian's 3.11.2 library with a pyenv 3.11.7 stdlib fails on `_ssl`), so
    this Python's own library goes first.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    return libdir if libdir and (Path(libdir) / name).exists() else None


def server_environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    # The stub process imports our packages from the environment whose bin/ comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [python_library_dir(), str(install.libs), env.get("LD_LIBRARY_PATH")])
    )
    # torch on CPU caches a oneDNN primitive per distinct matmul shape (1024 by default). Packed
    # batches have a new token count almost every time, so the cache rarely hits and only grows
    # the encoder's memory (measured: +200 MiB in a 2-minute soak); a small one keeps it flat.
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    return env


_PARAMETER = r'(\{{\s*key:\s*"{key}",\s*value:\s*\{{\s*string_value:\s*)"[^"]*"'


def set_parameter(config: str, key: str, value: str) -> str:
    """Sets a string parameter in config.pbtxt text, keeping the file's layout and comments."""
    pattern = re.compile(_PARAMETER.format(key=re.escape(key)))
    if not pattern.search(config):
        raise LauncherError(f"config.pbtxt has no parameter {key!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return pattern.sub(lambda m: f'{m.group(1)}"{escaped}"', config, count=1)


def set_instance_group(config: str, count: int, kind: str | None) -> str:
    """Replaces the single-line `instance_group [ ... ]` of a config.pbtxt."""
    body = f"count: {count}" + (f", kind: {kind}" if kind else "")
    new, n = re.subn(r"instance_group \[.*\]", f"instance_group [ {{ {body} }} ]", config, count=1)
    if n != 1:
        raise LauncherError("config.pbtxt has no single-line instance_group to set")
    return new


def set_max_queue_size(config: str, size: int) -> str:
    new, n = re.subn(r"max_queue_size: \d+", f"max_queue_size: {size}", config, count=1)
    if n != 1:
        raise LauncherError("config.pbtxt has no max_queue_size to set")
    return new


@dataclass
class RepositorySettings:
    model_path: str
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"
    engine: str = "packed"
    attention_backend: str = ""
    max_length: int = 0
    max_batch_tokens: int = 0  # 0 = the device default (4096 on CPU, 16384 on GPU)
    instances: int = 1
    num_threads: int = 0
    # Waiting requests per model before new ones are refused (0 = as in config.pbtxt).
    max_queue_size: int = 0
    extra: dict[str, dict[str, str]] = field(default_factory=dict)


def render_model_repository(settings: RepositorySettings, target: Path,
                            source: Path = DEFAULT_MODEL_REPOSITORY) -> Path:
    """Copies the model repository to `target` with the parameters filled in."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    values = {
        "tokenizer": {"model_path": settings.model_path, "max_length": str(settings.max_length)},
        "cross_encoder": {
            "model_path": settings.model_path,
            "engine": settings.engine,
            "attention_backend": settings.attention_backend,
            "dtype": settings.dtype,
            # GPU instances keep "auto": each then runs on the GPU Triton placed it on, where
            # "cuda" would put every instance of a multi-GPU host on cuda:0.
            "device": "auto" if settings.device.startswith("cuda") else settings.device,
            "max_batch_tokens": str(settings.max_batch_tokens),
            "num_threads": str(settings.num_threads),
        },
    }
    for model, extra in settings.extra.items():
        values.setdefault(model, {}).update(extra)
    kind = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}.get(settings.device.split(":")[0])
    for model, params in values.items():
        path = target / model / "config.pbtxt"
        text = path.read_text()
        for key, value in params.items():
            text = set_parameter(text, key, value)
        if model == "cross_encoder":
            text = set_instance_group(text, settings.instances, kind)
        if settings.max_queue_size:
            text = set_max_queue_size(text, settings.max_queue_size)
        path.write_text(text)
    return target


@dataclass
class ServerAddress:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


RESTRICTED_APIS = "shared-memory,model-repository,trace,logging"


class TritonServer:
    """A running tritonserver process (and its backend stubs), stopped as a group."""

    def __init__(self, model_repository: Path, run_dir: Path, address: ServerAddress,
                 log_file: Path | None = None, extra_args: list[str] | None = None, supervise: bool = True):
        self.install = TritonInstall.find()
        self.model_repository = model_repository
        self.run_dir = run_dir
        self.address = address
        self.log_file = log_file or run_dir / "tritonserver.log"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self._admin_header = f"triton-rerank-admin={secrets.token_hex(16)}"
        self.supervise = supervise
        self.supervisor: StubSupervisor | None = None

    def command(self, backends: Path) -> list[str]:
        a = self.address
        return [
            str(self.install.server),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            # Every model is loaded at start. The load/unload API exists only so the supervisor
            # can reload a model whose backend process died; clients cannot reach it (below).
            "--model-control-mode=explicit",
            "--load-model=*",
            # Shared-memory registration, repository, trace and logging APIs answer only to a
            # header whose value nobody outside this process knows: closed to clients.
            f"--http-restricted-api={RESTRICTED_APIS}:{self._admin_header}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{self._admin_header}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=15",
            f"--http-address={a.host}", f"--http-port={a.http_port}",
            f"--grpc-address={a.host}", f"--grpc-port={a.grpc_port}",
            f"--metrics-address={a.host}", f"--metrics-port={a.metrics_port}",
            "--allow-gpu-metrics=false",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        backends = prepare_backends(self.install, self.run_dir)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        # A session of its own, so stopping signals the server and every stub it spawned.
        self.process = subprocess.Popen(
            self.command(backends), env=server_environment(self.install), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def is_ready(self) -> bool:
        try:
            with urlopen(f"http://{self.address.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LauncherError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self.is_ready():
                if self.supervise and self.supervisor is None:
                    name, value = self._admin_header.split("=", 1)
                    self.supervisor = StubSupervisor(self.process.pid, self.address.http_url, (name, value))
                    self.supervisor.start()
                return
            time.sleep(0.25)
        raise LauncherError(f"tritonserver not ready after {timeout:.0f} s; see {self.log_file}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor.join(timeout=5)
            self.supervisor = None
        pgid = self.process.pid
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.process.wait()
        # Stubs whose server is gone exit by themselves, but not instantly: make sure, and wait
        # until the group is gone (killed stubs are reaped by init, not at once).
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._log.close()
        self.process = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n ports free on host right now (for tests and benchmarks that start their own servers)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
