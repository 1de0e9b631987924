"""Running the gateway under uvicorn: in the foreground (`triton-rerank api`) or beside Triton (`serve`)."""

from __future__ import annotations

import functools
import socket
import sys
import threading
import time

import uvicorn

from .app import create_app
from .ensemble import Scorer
from .limits import LimitedH11Protocol
from .settings import GatewaySettings, GatewayStartError


def uvicorn_server(settings: GatewaySettings, scorer: Scorer | None = None) -> uvicorn.Server:
    """uvicorn serving the gateway app (create_app's `scorer`: a gRPC client of settings.triton_url by default)."""
    config = uvicorn.Config(
        create_app(settings, scorer), host=settings.host, port=settings.port, log_level=settings.log_level,
        # Idle keep-alive connections must not hold a shutdown for long.
        timeout_graceful_shutdown=10,
        # h11 even where httptools is installed: LimitedH11Protocol counts body chunks and times request
        # heads, which uvicorn has no option for (limits.py).
        http=functools.partial(LimitedH11Protocol, max_body_chunks=settings.max_body_chunks,
                               header_timeout=settings.header_timeout),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout,
        # Beyond this many connections (idle ones too) or requests, uvicorn answers 503 at once.
        limit_concurrency=settings.max_connections,
    )
    return uvicorn.Server(config)


def listening_sockets(settings: GatewaySettings) -> list[socket.socket]:
    """The gateway's sockets: settings.port, and settings.kserve_port when set, both on settings.host.

    Bound here rather than by uvicorn, which binds one port: both serve the one app (one connection
    to Triton, one set of limits and metrics). GatewayStartError names a port that is taken.
    """
    ports = [("--api-port (serve) or --port (api)", settings.port)]
    if settings.kserve_port is not None:
        ports.append(("--http-port", settings.kserve_port))
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sockets = []
    try:
        for option, port in ports:
            try:
                sockets.append(socket.create_server((settings.host, port), family=family, backlog=2048))
            except OSError as error:
                raise GatewayStartError(f"the gateway cannot listen on {settings.host}:{port} ({error.strerror}): "
                                        f"is the port in use? pick another with {option}") from None
    except GatewayStartError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def run_gateway(settings: GatewaySettings) -> int:
    """Serves until Ctrl-C / SIGTERM (uvicorn handles both in the main thread)."""
    try:
        sockets = listening_sockets(settings)
    except GatewayStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    server = uvicorn_server(settings)
    try:
        server.run(sockets=sockets)
    except SystemExit as exit_:
        return int(exit_.code or 1)
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


class GatewayThread:
    """The gateway in a thread of the calling process, so that stopping that process stops it too.

    uvicorn installs no signal handlers outside the main thread; the owner stops it with stop().
    """

    def __init__(self, settings: GatewaySettings, scorer: Scorer | None = None):
        self.settings = settings
        self.server = uvicorn_server(settings, scorer)
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="triton-rerank-gateway", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=self._sockets)
        except SystemExit:
            pass  # start() notices the thread ended without starting

    def start(self, timeout: float = 30.0) -> GatewayThread:
        self._sockets = listening_sockets(self.settings)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GatewayStartError(f"the gateway did not start on {self.settings.host}:{self.settings.port}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        for sock in self._sockets:
            sock.close()
