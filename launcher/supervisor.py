"""Bringing a Python-backend model back when its stub process dies.

Triton 2.51 does not restart a dead stub: the model stays "ready" while every request to it
fails with "Stub process '<instance>' is not healthy". The supervisor watches the server's stub
processes and, when one disappears, reloads that model through the repository API (closed to
clients, open to the launcher's secret header), which starts fresh stubs. Requests in flight
on the dead stub fail; the ones after the reload succeed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.request import Request, urlopen

log = logging.getLogger("triton_rerank.supervisor")

STUB_NAME = "triton_python_backend_stub"


def stub_models(server_pid: int) -> dict[int, str]:
    """{pid: model name} of the stub processes whose parent is server_pid (read from /proc)."""
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
            # argv[1] is <repository>/<model>/<version>/model.py
            stubs[int(proc.name)] = Path(argv[1].decode()).parent.parent.name
    return stubs


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
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        expected = stub_models(self.server_pid)
        while not self._stop_event.wait(self.interval):
            alive = stub_models(self.server_pid)
            dead = {model for pid, model in expected.items() if pid not in alive}
            for model in sorted(dead):
                if self._stop_event.is_set():
                    return
                self._reload(model)
            # Watch the stubs alive now: a reload's new ones, or any started since the last look.
            expected = stub_models(self.server_pid) if dead else alive

    def _reload(self, model: str) -> None:
        log.warning("the backend process of model %r died; reloading the model", model)
        request = Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST",
                          headers={self.admin_header[0]: self.admin_header[1]})
        try:
            with urlopen(request, timeout=600) as response:
                ok = response.status == 200
        except OSError as error:
            log.error("reloading %r failed: %s", model, error)
            return
        if ok:
            self.reloads[model] = self.reloads.get(model, 0) + 1
            log.warning("model %r reloaded", model)
            if self.on_reload:
                self.on_reload(model)
