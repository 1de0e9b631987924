"""A running tritonserver: its one hardened command line, start, readiness, supervision, restart and stop.

`server_command` is the only place that builds a tritonserver command line: `triton-rerank serve`,
the docker entry point, the benchmarks and the tests all run what it returns.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from ..serving.step_signature import KEY_ENV
from .errors import LauncherError
from .supervisor import StubSupervisor
from .triton_install import TritonInstall, check_stub_environment, prepare_backends, server_environment


@dataclass
class ServerAddress:
    """Where tritonserver listens: every listener on `host`, except HTTP on `http_host` when given.

    `triton-rerank serve` keeps Triton's own HTTP frontend on loopback (http_host="127.0.0.1") and
    puts the gateway's KServe front on the public HTTP port instead: tritonserver 2.51's HTTP
    frontend can be crashed by one chunked request, which the gateway refuses.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    http_host: str | None = None

    @property
    def http_bind(self) -> str:
        return self.host if self.http_host is None else self.http_host

    @property
    def http_url(self) -> str:
        return f"{self.http_bind}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def local_http_url(self) -> str:
        """The HTTP endpoint as this machine reaches it (a wildcard bind through loopback)."""
        return f"{loopback(self.http_bind)}:{self.http_port}"


def loopback(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)


# APIs that answer only to the launcher's secret header: closed to clients.
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
ADMIN_HEADER = "triton-rerank-admin"
REDACTED_KEY = "<admin-key>"
# The Python backend names its shared-memory regions (/dev/shm) with this prefix and a UUID; each
# server gets a prefix of its own, so that what a killed server left there can be found and removed.
SHM_PREFIX_CONFIG = "python,shm-region-prefix-name"
SHM_DIRECTORY = Path("/dev/shm")
# Flags server_command sets that extra arguments may not set again (the last one would win).
OWNED_FLAGS = frozenset({
    "--model-repository", "--model-store", "--backend-directory", "--model-control-mode", "--load-model",
    "--http-restricted-api", "--grpc-restricted-protocol", "--exit-on-error", "--strict-readiness",
    "--http-address", "--http-port", "--grpc-address", "--grpc-port", "--metrics-address", "--metrics-port",
    "--grpc-infer-allocation-pool-size",
})


def server_command(server: str | Path, model_repository: Path, backend_directory: Path, address: ServerAddress,
                   admin_key: str, *, gpu_metrics: bool = False, shm_prefix: str | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The tritonserver command line.

    Every model is loaded at start (explicit model control, `--load-model=*`); the repository,
    shared-memory, trace and logging APIs answer only to the header `triton-rerank-admin:
    <admin_key>` (the supervisor uses it to reload a model whose backend process died); a model
    that fails to load stops the server, and it is ready only when every model is. Every listener
    binds `address.host`, HTTP `address.http_bind`. With `shm_prefix`, the Python backend's
    shared-memory regions are named with it. `extra_args` come last and may not set the flags above.
    """
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise LauncherError(f"{flag} is set by triton-rerank and cannot be passed to tritonserver")
        if shm_prefix is not None and arg.startswith(f"--backend-config={SHM_PREFIX_CONFIG}="):
            raise LauncherError(f"--backend-config={SHM_PREFIX_CONFIG} is set by triton-rerank and cannot be "
                                "passed to tritonserver")
    a = address
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}"
    return [
        str(server),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory}",
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=15",
        # Triton keeps up to 8 finished gRPC request objects per handler for reuse, each still holding
        # its whole request: a refused 256 MiB request stayed resident (+256-290 MiB each). No pool.
        "--grpc-infer-allocation-pool-size=0",
        f"--http-address={a.http_bind}", f"--http-port={a.http_port}",
        f"--grpc-address={a.host}", f"--grpc-port={a.grpc_port}",
        f"--metrics-address={a.host}", f"--metrics-port={a.metrics_port}",
        f"--allow-gpu-metrics={'true' if gpu_metrics else 'false'}",
        *([f"--backend-config={SHM_PREFIX_CONFIG}={shm_prefix}"] if shm_prefix is not None else []),
        *extra_args,
    ]


class TritonServer:
    """A running tritonserver process (and its backend stubs), stopped as a group.

    `install` defaults to the server bundled in the nvidia-pytriton wheel. The log goes to
    `log_file` (default run_dir/tritonserver.log), or to this process's stdout with `log_file="-"`.
    The secrets (admin key, step key) and the shared-memory prefix are this object's: every start,
    restarts included, runs the same command with the same environment.
    """

    def __init__(self, model_repository: Path, run_dir: Path, address: ServerAddress,
                 log_file: Path | str | None = None, extra_args: Sequence[str] | None = None, supervise: bool = True,
                 install: TritonInstall | None = None, gpu_metrics: bool = False):
        self.install = install or TritonInstall.find()
        self.model_repository = model_repository
        self.run_dir = run_dir
        self.address = address
        self.log_file = None if log_file == "-" else Path(log_file) if log_file else run_dir / "tritonserver.log"
        self.extra_args = list(extra_args or [])
        self.gpu_metrics = gpu_metrics
        self.process: subprocess.Popen | None = None
        self._admin_key = secrets.token_hex(16)
        # Signs what the tokenizer step hands the scoring step (serving/step_signature.py); known
        # only to this server's processes.
        self._step_key = secrets.token_hex(32)
        self.shm_prefix = f"triton_rerank_{secrets.token_hex(8)}_"
        self._log = None
        self.supervise = supervise
        self.supervisor: StubSupervisor | None = None

    @property
    def admin_header(self) -> tuple[str, str]:
        return ADMIN_HEADER, self._admin_key

    @property
    def step_key(self) -> bytes:
        """The key of this server's step signatures (for tests that play an internal step)."""
        return bytes.fromhex(self._step_key)

    def command(self, redact: bool = False) -> list[str]:
        """The command line start() runs; with `redact`, the admin key replaced (to print or log it)."""
        return server_command(self.install.server, self.model_repository, self.install.backend_path(self.run_dir),
                              self.address, REDACTED_KEY if redact else self._admin_key,
                              gpu_metrics=self.gpu_metrics, shm_prefix=self.shm_prefix, extra_args=self.extra_args)

    def start(self) -> TritonServer:
        command = self.command()
        # Found here, not by exec: under setpriv a missing binary would only show as an early exit.
        if shutil.which(command[0]) is None:
            raise LauncherError(f"cannot start {command[0]}: no such executable (install tritonserver, or "
                                "nvidia-pytriton==0.7.0 for the bundled one)")
        if self.install.bundled:
            check_stub_environment()
        prepare_backends(self.install, self.run_dir)
        output = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        env = server_environment(self.install)
        env[KEY_ENV] = self._step_key
        # A session of its own, so stopping signals the server and every stub it spawned.
        try:
            self.process = subprocess.Popen(
                [*parent_death_prefix(), *command], env=env, stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as error:
            self._close_log()
            raise LauncherError(f"cannot start {self.install.server}: {error}") from None
        return self

    def restart(self) -> TritonServer:
        """Starts the server again after its process ended (or stops it first): the same command line,
        ports, run directory, log file (appended to) and secrets, so that clients and the stub
        supervisor find it where it was. wait_ready() then supervises the new process's stubs."""
        self.stop()
        return self.start()

    def is_ready(self) -> bool:
        try:
            with urlopen(f"http://{self.address.local_http_url}/v2/health/ready", timeout=2) as response:
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
                    self.supervisor = StubSupervisor(self.process.pid, self.address.local_http_url, self.admin_header)
                    self.supervisor.start()
                return
            time.sleep(0.25)
        raise LauncherError(f"tritonserver not ready after {timeout:.0f} s; see {self.log_file}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None:
            return "(the log went to the console)"
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
        # A server that exited cleanly removed its shared-memory regions; a killed one (a crash, or the
        # SIGKILL above) could not, and each restart would leave more in /dev/shm (64 MB in a default
        # Docker container) until a start fails for lack of it.
        remove_shared_memory(self.shm_prefix)
        self._close_log()
        self.process = None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class StopRequested(Exception):
    """Raised in the main thread by SIGTERM (docker stop, systemd) once `stop_on_signals` is called."""


def _raise_stop(signum, frame):
    raise StopRequested


def stop_on_signals() -> None:
    """SIGTERM takes the same clean path as Ctrl-C: the caller's `finally` stops the server group.

    Ctrl-C (SIGINT) is made to raise KeyboardInterrupt even where this process was started with it
    ignored, as a shell does for a command started with `&`: Python then keeps it ignored, and
    `serve` could only be stopped by a signal that skips the clean-up."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def parent_death_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM --` where util-linux's setpriv is installed, else nothing.

    The server runs in a session of its own (so that stopping it reaches every backend process),
    which also means that nothing stops it when the process that started it dies without doing so
    (SIGKILL, the OOM killer): it would live on, orphaned, holding its ports and GPU memory, and the
    next `serve` could not start. setpriv asks the kernel to send it SIGTERM when its parent goes,
    then runs tritonserver in its place (same pid). The signal follows the thread that started the
    server: start servers from a thread that lives as long as they should (the main thread does).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def remove_shared_memory(prefix: str) -> list[str]:
    """Removes the shared-memory regions whose names start with prefix; returns their names."""
    removed = []
    for region in SHM_DIRECTORY.glob(f"{prefix}*"):
        try:
            region.unlink()
        except OSError:
            continue  # removed meanwhile, or not ours to remove
        removed.append(region.name)
    return removed


# Where the kernel picks the local ports of outgoing connections (Linux's default when it cannot be read).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_FREE_PORT = 10000


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free on host right now (for tests and benchmarks that start their own servers).

    Taken below the ephemeral range: a port the kernel handed out (bind to port 0) is one it may
    hand out again, as the local port of any outgoing connection, before the server binds it.
    """
    low, high = LOWEST_FREE_PORT, ephemeral_port_range()[0] - 1
    if high - low < 1000:  # an unusual ephemeral range leaves no room below it: take from above
        low, high = ephemeral_port_range()[1] + 1, 65535
    if high - low < 1000:  # none outside it either: let the kernel pick (ports it may hand out again)
        return _kernel_ports(n, host)
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(100 * n):
        port = rng.randint(low, high)
        if port not in ports and _bindable(host, port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise LauncherError(f"found only {len(ports)} of {n} free ports on {host} in {low}-{high}")


def _kernel_ports(n: int, host: str) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
