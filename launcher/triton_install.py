"""Where a tritonserver binary and its backends are, and the environment it runs in.

Two installs: the real `tritonserver` bundled in the `nvidia-pytriton` wheel (what `triton-rerank
serve`, the tests and the benchmarks run; only the wheel's files are used: the server binary, the
Python backend, and the backend stub built for the running Python), and a server installed on the
system (the NGC image: `tritonserver` on PATH, backends in /opt/tritonserver/backends). The stub
finds this environment's packages through `PATH` (the environment's `bin` first) and the wheel's
shared libraries through `LD_LIBRARY_PATH`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .errors import LauncherError

# Where the NGC tritonserver images keep their backends.
SYSTEM_BACKEND_DIRECTORY = Path("/opt/tritonserver/backends")


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and its backend directory.

    `wheel` is the `pytriton` package directory when the server is the one bundled in the
    nvidia-pytriton wheel: its Python backend is then copied into a run directory with the stub
    for this Python. Otherwise `backend_directory` is used as it is.
    """

    server: Path
    backend_directory: Path | None = None
    wheel: Path | None = None

    @classmethod
    def find(cls) -> TritonInstall:
        """The tritonserver bundled in the nvidia-pytriton wheel.

        Found, not imported: only the wheel's files are used, and importing pytriton would pull in its
        whole client stack (pyzmq, sh, tritonclient's dependencies), which the server does not need.
        """
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise LauncherError(
                "nvidia-pytriton is not installed: `pip install nvidia-pytriton==0.7.0` (it carries tritonserver)"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        return cls(server=root / "tritonserver" / "bin" / "tritonserver", wheel=root)

    @classmethod
    def system(cls, server: str | Path = "tritonserver",
               backend_directory: str | Path = SYSTEM_BACKEND_DIRECTORY) -> TritonInstall:
        """An installed server (a bare name is looked up on PATH when the server starts)."""
        return cls(server=Path(server), backend_directory=Path(backend_directory))

    @property
    def bundled(self) -> bool:
        return self.wheel is not None

    def _wheel(self) -> Path:
        if self.wheel is None:
            raise LauncherError(f"{self.server} is not the tritonserver of the nvidia-pytriton wheel")
        return self.wheel

    @property
    def python_backend(self) -> Path:
        return self._wheel() / "tritonserver" / "backends" / "python"

    @property
    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self._wheel() / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise LauncherError(f"the wheel has no Python backend stub for Python {version}; use Python 3.8-3.13")
        return stub

    @property
    def libs(self) -> Path:
        return self._wheel().parent / "nvidia_pytriton.libs"

    def backend_path(self, run_dir: Path) -> Path:
        """The --backend-directory of a server whose run directory is run_dir (nothing is created)."""
        if self.backend_directory is not None:
            return self.backend_directory
        return run_dir / "backends"


def prepare_backends(install: TritonInstall, run_dir: Path) -> Path:
    """The backend directory to pass to the server.

    For the wheel: a directory in run_dir holding the Python backend with the stub for this Python.
    For an installed server: its own backend directory, untouched.
    """
    backends = install.backend_path(run_dir)
    if not install.bundled:
        return backends
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


# What every backend stub imports first, asked of this Python the way the stub runs it.
STUB_PROBE = "import numpy, triton_rerank; print(numpy.__version__)"


@functools.cache  # one probe per Python and process: a passing environment stays so; a refusal is not cached
def check_stub_environment(python: str = sys.executable) -> None:
    """Refuses, before the server starts, an environment the wheel's backend stubs cannot run in.

    The stub embeds Python isolated (`PyConfig_InitIsolatedConfig`: no PYTHONPATH, no user site)
    and imports from the environment whose `bin` is first on PATH, this Python's; `python -I` sees
    the same. Without this check either fault shows only as stubs failing to load or dying on the
    first request. The stub of tritonserver 2.51 (nvidia-pytriton 0.7.0) also misreads BYTES
    tensors under numpy 2 (each string's length prefix comes out garbled, seen with numpy 2.5.2:
    "unpack_from requires a buffer of at least 505290274 bytes"), and every request carries text.
    """
    try:
        probe = subprocess.run([python, "-I", "-c", STUB_PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LauncherError(f"cannot run {python} to check the backend stubs' environment: {error}") from None
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
        raise LauncherError(
            f"the Python backend stubs cannot import what they need from {python} ({reason}): they run Python "
            "isolated, without PYTHONPATH, so triton-rerank and numpy must be installed in that environment "
            "(`pip install -e .` in a checkout, or the wheel)")
    version = probe.stdout.strip()
    if int(version.split(".")[0]) >= 2:
        raise LauncherError(
            f"numpy {version} in {python}: the Python backend stub of tritonserver 2.51 (nvidia-pytriton 0.7.0) "
            "misreads text tensors under numpy 2 and dies on the first request; install numpy<2 "
            "(`pip install 'numpy<2'`)")


def server_environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    # The stub process imports our packages from the environment whose bin/ comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if install.bundled:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [python_library_dir(), str(install.libs), env.get("LD_LIBRARY_PATH")])
        )
    # torch on CPU caches a oneDNN primitive per distinct matmul shape (1024 by default). Packed
    # batches have a new token count almost every time, so the cache rarely hits and only grows
    # the encoder's memory (measured: +200 MiB in a 2-minute soak); a small one keeps it flat.
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    # tritonserver 2.51 reads a whole request body before our per-string limit refuses it (it has
    # no size flag; gRPC takes up to 2 GiB). The buffers of a refused 256 MiB request are freed,
    # but glibc hands an arena's free pages back only from its top, and by default gives threads
    # arenas of their own: after refused 256 MiB gRPC requests, tritonserver kept a median 80 MiB
    # (10-175 MiB over 9 runs) of freed pieces resident for good; with one arena, a median 10 MiB
    # (2-107 MiB over 22 runs). Measured with --grpc-infer-allocation-pool-size=0: a pooled
    # request object keeps its whole request. MALLOC_ARENA_MAX=2 and fixed 128 KiB
    # MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ did no better than the default; tcmalloc and
    # mimalloc by LD_PRELOAD kept 0.8-1.5 GiB more. Small allocations are served from glibc's
    # per-thread cache without the arena lock, and no throughput difference showed: the model,
    # not malloc, bounds this server.
    env.setdefault("MALLOC_ARENA_MAX", "1")
    # jemalloc, when a deployment preloads it as Triton's documentation suggests (the NGC image
    # has it), otherwise purges freed pages only when it next allocates: 170 MiB was still
    # resident 15 s after the same requests. Purged by a background thread after a second, the
    # server came back to within 3 MiB of its baseline in each run. glibc ignores this variable.
    env.setdefault("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0")
    return env
