"""What a GPU-check stage has measured so far, kept on disk as it goes.

A stage runs in a child process that may crash (a CUDA fault ends the context) or be killed
at its deadline, so every update rewrites the stage's JSON file: the parent reads it while the
stage runs and after it ends, and keeps whatever was gathered before a failure. `log` and
`error_text` are how the check's processes (parent and stages) print progress and name errors.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from ..report import atomic_write


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class StageRecorder:
    """Accumulates one stage's data and rewrites its JSON file on every update."""

    def __init__(self, path: str | Path | None, deadline: float | None):
        self.path = Path(path) if path else None
        self.deadline = deadline
        self.data: dict[str, Any] = {"status": "running", "errors": []}
        self.flush()

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        self.data["errors"].append(
            {"where": where, "error": error_text(exc), "traceback": traceback.format_exc()[-3000:]}
        )
        log(f"ERROR {where}: {error_text(exc)}")
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


@contextlib.contextmanager
def guarded(rec: StageRecorder, where: str):
    """Record an exception under `where` and go on: one failed measurement must not end the stage."""
    try:
        yield
    except Exception as exc:
        rec.error(where, exc)
