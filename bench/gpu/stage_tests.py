"""GPU-check stage 2, ``tests``: the kernel test suite on the card (compiled, not interpreted).

Runs ``pytest tests/kernels -q -x`` as a streamed child process and reads the outcome from its
output: the final summary line, or, when the deadline cut the run short, the progress dots.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .stage_process import run_streaming

PER_TEST_TIMEOUT_S = 120  # with pytest-timeout: one hung kernel test fails alone

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")
_PYTEST_PROGRESS = re.compile(r"^([.sFExX]+)(\s+\[\s*\d+%\])?$")
_PROGRESS_NAMES = {".": "passed", "s": "skipped", "F": "failed", "E": "errors", "x": "xfailed", "X": "xpassed"}


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("3 passed, 1 failed, 2 skipped in 1.2s")."""
    counts: dict[str, int] = {}
    for line in reversed(text.strip().splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for num, word in found:
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(num)
            break
    return counts


def parse_pytest_progress(lines: Sequence[str]) -> dict[str, int]:
    """Outcome counts from pytest -q progress lines ("..s.F [ 27%]"), for a run cut short."""
    counts: dict[str, int] = {}
    for line in lines:
        m = _PYTEST_PROGRESS.match(line.strip())
        if m:
            for ch in m.group(1):
                counts[_PROGRESS_NAMES[ch]] = counts.get(_PROGRESS_NAMES[ch], 0) + 1
    return counts


def _status(returncode: int | None, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode == 5:  # pytest: no tests collected
        return "no tests"
    return "failed"


def run_kernel_tests(repo_root: Path, timeout: float, env: dict, on_tick: Callable[[], None]) -> dict:
    """The tests stage's record: {"status", "data"} (or {"status": "error", "error"} without tests)."""
    tests_dir = repo_root / "tests" / "kernels"
    if not tests_dir.is_dir():
        return {"status": "error", "error": f"{tests_dir} does not exist"}
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p", "no:cacheprovider", "-rfE"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", str(PER_TEST_TIMEOUT_S)]
    data: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": round(timeout, 1)}
    rc, tail, timed_out = run_streaming(
        cmd, timeout, "  [pytest] ", cwd=repo_root, env=env, on_tick=on_tick, echo=False, tail_lines=400
    )
    counts = parse_pytest_summary("\n".join(tail))
    data.update({"returncode": rc, "timed_out": timed_out, "counts": counts, "tail": tail[-60:]})
    if not data["counts"]:  # cut short: count the progress characters instead
        data["progress_counts"] = parse_pytest_progress(tail)
    for line in tail[-15:]:
        print(f"  [pytest] {line}", flush=True)
    return {"status": _status(rc, timed_out), "data": data}
