"""Bringing a Python-backend model back when its stub process dies.

Triton 2.51 does not restart a dead stub: the model stays "ready" while every request to it
fails with "Stub process '<instance>' is not healthy". The supervisor watches the server's stub
processes and, when one disappears, reloads that model through the repository API (closed to
clients, open to the launcher's secret header), which starts fresh stubs. Requests in flight
on the dead stub fail; the ones after the reload succeed.

Triton loads a loaded model again only when its files are newer than when it was loaded: a load
request for an unchanged model answers 200 and does nothing, leaving the dead stub in place (seen
on the second death of the same model's stub; the first reload happened only because Python had
written __pycache__ into the version directory since). Nor is a newer config.pbtxt alone enough:
an unchanged configuration is then "updated", which keeps the instances. So before each reload
the supervisor marks the model's version directory as modified, and Triton replaces every
instance of the model. The replaced model's other instances end when Triton has unloaded it
(seen to take a long while under load); they are not watched any more.

A supervisor watches one server process. When that process itself ends, its stubs go with it:
that is not a stub to reload but a server to restart (restart.py), and the supervisor reloads
nothing more; the restart stops it and the restarted server gets a supervisor of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

log = logging.getLogger("triton_rerank.supervisor")

STUB_NAME = "triton_python_backend_stub"
# A model whose reload failed is tried again after this many seconds, doubled per failure.
RETRY_SECONDS, MAX_RETRY_SECONDS = 2.0, 60.0


def process_running(pid: int) -> bool:
    """True while pid is a process that has not ended (a zombie, ended but not yet waited for, has)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stub_processes(server_pid: int) -> dict[int, Path]:
    """{pid: <repository>/<model>/<version>/model.py} of the stub processes whose parent is server_pid."""
    stubs = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name may hold spaces or parentheses: the fields we need follow the last ')'.
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if argv and argv[0].endswith(STUB_NAME.encode()) and len(argv) > 1:
            stubs[int(proc.name)] = Path(argv[1].decode())
    return stubs


def model_of(model_file: Path) -> str:
    return model_file.parent.parent.name


def stub_models(server_pid: int) -> dict[int, str]:
    """{pid: model name} of the stub processes whose parent is server_pid (read from /proc)."""
    return {pid: model_of(path) for pid, path in stub_processes(server_pid).items()}


class StubSupervisor(threading.Thread):
    """Reloads a model whose stub died; `reloads` counts reloads per model."""

    def __init__(self, server_pid: int, http_url: str, admin_header: tuple[str, str], interval: float = 1.0,
                 on_reload: Callable[[str], None] | None = None):
        super().__init__(name="stub-supervisor", daemon=True)
        self.server_pid = server_pid
        self.http_url = http_url
        self.admin_header = admin_header
        self.interval = interval
        self.on_reload = on_reload
        self.reloads: dict[str, int] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # model: (failed reloads in a row, next try)
        self._stop_event = threading.Event()
        # Read now rather than when the thread gets to run: a stub dying in between is a death too.
        self._watched = stub_processes(server_pid)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        watched = self._watched
        # Stubs of a model that was reloaded, left to end with the replaced model: not deaths to repair.
        retired: set[int] = set()
        while not self._stop_event.wait(self.interval):
            try:
                self._look(watched, retired)
            except Exception:
                # A supervisor that stopped would leave the next dead stub unrepaired for good.
                log.exception("watching the backend processes failed; watching on")

    def _look(self, watched: dict[int, Path], retired: set[int]) -> None:
        """One look at the stubs: reloads the models whose stubs died; updates watched and retired in place."""
        alive = stub_processes(self.server_pid)
        dead = {model_of(path): path.parent for pid, path in watched.items() if pid not in alive}
        for model, version_dir in sorted(dead.items()):
            # Checked after the stubs were read: stubs of an ended server are gone too, and its
            # repository API with it. Nothing to reload then; whoever restarts the server stops this
            # supervisor and starts one for the new process.
            if self._stop_event.is_set() or not process_running(self.server_pid):
                return
            if self._due(model) and self._reload(model, version_dir):
                retired.update(pid for pid, path in watched.items() if model_of(path) == model)
        # Watch the stubs alive now, and keep watching those whose death is not dealt with yet
        # (a failed reload, tried again later; one that died while another model was reloading).
        current = stub_processes(self.server_pid)
        for pid in list(watched):
            if pid in retired:
                del watched[pid]
        watched.update({pid: path for pid, path in current.items() if pid not in retired})
        retired.intersection_update(current)

    def _due(self, model: str) -> bool:
        failures = self._failures.get(model)
        return failures is None or time.monotonic() >= failures[1]

    def _reload(self, model: str, version_dir: Path) -> bool:
        log.warning("the backend process of model %r died; reloading the model", model)
        try:
            # Newer files make the load a full reload (see the module's docstring).
            os.utime(version_dir)
        except OSError as error:
            log.warning("cannot mark %s as modified (%s): Triton may keep the dead process", version_dir, error)
        request = Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST",
                          headers={self.admin_header[0]: self.admin_header[1]})
        try:
            with urlopen(request, timeout=600) as response:
                ok = response.status == 200
                reason = f"HTTP {response.status}"
        except HTTPError as error:
            ok, reason = False, f"{error}: {error.read().decode(errors='replace')[:500]}"
        except (OSError, HTTPException) as error:
            if not process_running(self.server_pid):
                return False  # the server ended: restarting it is not this supervisor's work
            ok, reason = False, f"{type(error).__name__}: {error}"
        if not ok:
            count = self._failures.get(model, (0, 0.0))[0] + 1
            delay = min(MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** (count - 1))
            self._failures[model] = (count, time.monotonic() + delay)
            log.error("reloading %r failed (%s); trying again in %g s", model, reason, delay)
            return False
        self._failures.pop(model, None)
        self.reloads[model] = self.reloads.get(model, 0) + 1
        log.warning("model %r reloaded", model)
        if self.on_reload:
            self.on_reload(model)
        return True
