"""Running the gateway under uvicorn: in the foreground (`triton-rerank api`) or beside Triton (`serve`)."""

from __future__ import annotations

import functools
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


def run_gateway(settings: GatewaySettings) -> int:
    """Serves until Ctrl-C / SIGTERM (uvicorn handles both in the main thread)."""
    server = uvicorn_server(settings)
    try:
        server.run()
    except SystemExit as exit_:  # uvicorn exits when it cannot bind the port; it has logged why
        return int(exit_.code or 1)
    return 0 if server.started else 1


class GatewayThread:
    """The gateway in a thread of the calling process, so that stopping that process stops it too.

    uvicorn installs no signal handlers outside the main thread; the owner stops it with stop().
    """

    def __init__(self, settings: GatewaySettings, scorer: Scorer | None = None):
        self.settings = settings
        self.server = uvicorn_server(settings, scorer)
        self._thread = threading.Thread(target=self._run, name="triton-rerank-gateway", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:
            pass  # bind failure: start() notices the thread ended without starting

    def start(self, timeout: float = 30.0) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GatewayStartError(f"the gateway did not start on {self.settings.host}:{self.settings.port} "
                                    "(is the port in use? pick another with --api-port, or --no-api)")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
