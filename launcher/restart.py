"""Keeping tritonserver running: restart it when it exits on its own, within bounds.

tritonserver 2.51 can be made to crash from outside (one chunked HTTP request of about a million
one-byte chunks ends it with SIGSEGV), and a crash takes every model down with it. `ServerKeeper`
is the main loop of `triton-rerank serve` and of the docker entry point once the server is ready:
it waits for the server process and, when it ends, reports how (exit code or signal, the last
lines of the log) and starts the same command again: same ports, same run directory and log,
same secrets (TritonServer.restart). Restarts are bounded by a `RestartPolicy`: an exponential
backoff, and at most `max_restarts` within `window` seconds; one more exit in that window and the
loop gives up, so that a server that cannot stay up ends the process with an error instead of
restarting forever (a process manager or the container's restart policy takes over from there).

The loop only ever sees exits it did not cause: stopping (Ctrl-C, SIGTERM) raises in the thread
running it, and the caller stops the server after the loop has been left. A loop run in a thread of
its own is told with `stop()` before the server is stopped, and then returns instead of restarting.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Protocol

from .errors import LauncherError


@dataclass(frozen=True)
class RestartPolicy:
    """At most `max_restarts` restarts within any `window` seconds (0: never restart); before each,
    a pause of `backoff` seconds doubled for every restart already in the window, at most `max_backoff`."""

    max_restarts: int = 5
    window: float = 600.0
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"the number of restarts must be 0 or more, got {self.max_restarts}")
        if self.window <= 0:
            raise ValueError(f"the restart window must be more than 0 seconds, got {self.window:g}")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError(f"the restart backoff must be 0 to {self.max_backoff:g} seconds, got {self.backoff:g}")

    def describe(self) -> str:
        return f"at most {self.max_restarts} restarts in {self.window:g} s"


class RestartBudget:
    """The restarts a policy still allows, counted over a sliding window."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self._recent: deque[float] = deque()

    @property
    def used(self) -> int:
        """Restarts within the window that ends now."""
        self._forget_old(self.clock())
        return len(self._recent)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next restart, counting it as done; None when the policy allows no more."""
        now = self.clock()
        self._forget_old(now)
        if len(self._recent) >= self.policy.max_restarts:
            return None
        delay = min(self.policy.max_backoff, self.policy.backoff * 2 ** len(self._recent))
        self._recent.append(now)
        return delay

    def _forget_old(self, now: float) -> None:
        while self._recent and now - self._recent[0] >= self.policy.window:
            self._recent.popleft()


class Restartable(Protocol):
    """What the loop needs of a server (launcher.server.TritonServer)."""

    process: Popen | None
    log_file: Path | None

    def restart(self) -> object: ...

    def wait_ready(self, timeout: float = ...) -> None: ...

    def log_tail(self, lines: int = ...) -> str: ...


def describe_exit(returncode: int) -> str:
    """'exited with code 1', or 'was killed by SIGSEGV (signal 11)' for Popen's negative codes."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "an unknown signal"
    return f"was killed by {name} (signal {-returncode})"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ServerKeeper:
    """Waits on a ready server and restarts it when its process ends, as the policy allows.

    `run()` returns only when it gives up (its return value is the exit status for the caller);
    `restarts` counts the restarts that brought the server back to ready. Messages go to `report`
    (standard error by default).
    """

    def __init__(self, server: Restartable, policy: RestartPolicy, ready_timeout: float,
                 report: Callable[[str], None] = _stderr, sleep: Callable[[float], None] = time.sleep):
        self.server = server
        self.policy = policy
        self.ready_timeout = ready_timeout
        self.budget = RestartBudget(policy)
        self.report = report
        self.sleep = sleep
        self.restarts = 0
        self._stopped = threading.Event()

    def stop(self) -> None:
        """The next exit of the server is one asked for: run() returns 0 instead of restarting it."""
        self._stopped.set()

    def run(self) -> int:
        while True:
            process = self.server.process
            if process is None:
                raise LauncherError("tritonserver is not running")
            returncode = process.wait()
            if self._stopped.is_set():
                return 0
            message = f"tritonserver (pid {process.pid}) {describe_exit(returncode)}"
            if self.server.log_file is not None:
                message += f"; last lines of {self.server.log_file}:\n{self.server.log_tail()}"
            self.report(message)
            if not self._bring_back():
                return 0 if self._stopped.is_set() else 1

    def _bring_back(self) -> bool:
        """Restarts the server until it is ready (True) or the policy allows no more tries (False)."""
        while True:
            delay = self.budget.next_delay()
            if delay is None:
                if self.policy.max_restarts == 0:
                    self.report("tritonserver is not restarted (--max-restarts 0)")
                else:
                    self.report(f"giving up on tritonserver: it needed more than {self.policy.max_restarts} restarts "
                                f"within {self.policy.window:g} s (--max-restarts, --restart-window)")
                return False
            self.report(f"restarting tritonserver in {delay:g} s (restart {self.budget.used} of "
                        f"{self.policy.describe()})")
            self.sleep(delay)
            if self._stopped.is_set():  # stopped during the pause: start nothing more
                return False
            try:
                self.server.restart()
                self.server.wait_ready(self.ready_timeout)
            except LauncherError as error:
                self.report(f"the restart failed: {error}")
                continue
            self.restarts += 1
            pid = self.server.process.pid if self.server.process is not None else "?"
            self.report(f"tritonserver is ready again (pid {pid}, {self.restarts} restart(s) so far)")
            return True


def add_restart_options(p, *, max_restarts: int | str = RestartPolicy.max_restarts,
                        window: float | str = RestartPolicy.window, backoff: float | str = RestartPolicy.backoff) -> None:
    """--max-restarts, --restart-window and --restart-backoff, with the given defaults."""
    p.add_argument("--max-restarts", type=int, default=max_restarts,
                   help="restarts of tritonserver after it exits on its own (a crash) within --restart-window; "
                   "one more exit in the window ends this command with an error; 0 = never restart")
    p.add_argument("--restart-window", type=float, default=window,
                   help="seconds over which restarts are counted")
    p.add_argument("--restart-backoff", type=float, default=backoff,
                   help=f"seconds before a restart; doubled for each restart already in the window, "
                   f"at most {RestartPolicy.max_backoff:g}")


def restart_policy(args) -> RestartPolicy:
    """The policy of the options add_restart_options added (ValueError when they are out of range)."""
    return RestartPolicy(args.max_restarts, args.restart_window, args.restart_backoff)
