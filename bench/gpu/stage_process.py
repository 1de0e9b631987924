"""How the GPU check runs its stages as processes: streamed, deadlined, killed as a group.

A hung compile or a wedged CUDA context must cost one stage, not the run, and no child may
outlive the parent while holding the GPU: every stage command runs in its own process group,
its output is echoed and its tail kept, and the group is killed at the stage deadline. A child
stage (``python -m triton_rerank.bench.gpu.check --stage NAME``) records its progress in
``OUT/stage-NAME.json``, which the parent reads while it runs and after it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..workload import REPO_ROOT

TICK_SECONDS = 10  # how often on_tick runs while the child is alive


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def run_streaming(
    cmd: list[str],
    timeout: float,
    prefix: str,
    cwd: str | Path | None = None,
    env: dict | None = None,
    on_tick: Callable[[], None] | None = None,
    tail_lines: int = 80,
    echo: bool = True,
) -> tuple[int | None, list[str], bool]:
    """Run cmd in its own process group, echoing its output; kill it after `timeout` seconds.

    Returns (returncode or None when killed, last output lines, timed_out).
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(
        cmd,
        cwd=None if cwd is None else str(cwd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )

    def reader():
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if echo:
                print(f"{prefix}{line}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    end = time.time() + timeout
    timed_out = False
    last_tick = time.time()
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_tick is not None and time.time() - last_tick > TICK_SECONDS:
                last_tick = time.time()
                with contextlib.suppress(Exception):
                    on_tick()
            if time.time() > end:
                timed_out = True
                kill_group(proc)
                break
    finally:  # also on SIGTERM/Ctrl-C of the parent: never leave a child holding the GPU
        kill_group(proc)
    th.join(timeout=5)
    return (None if timed_out else proc.returncode), list(tail), timed_out


def child_cmd(args: argparse.Namespace, stage: str, stage_out: Path, deadline: float) -> list[str]:
    """The command line of one child stage: the parent's settings plus the internal --stage flags."""
    cmd = [sys.executable, "-m", "triton_rerank.bench.gpu.check", "--out", str(args.out)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    cmd += [
        "--dtype", args.dtype, "--device", args.device, "--max-minutes", str(args.max_minutes),
        "--token-budget", str(args.token_budget), "--hf-batch-size", str(args.hf_batch_size),
        "--max-length", str(args.max_length),
        "--stage", stage, "--stage-out", str(stage_out), "--deadline", f"{deadline:.3f}",
    ]  # fmt: skip
    if args.pairs:
        cmd += ["--pairs", str(args.pairs)]
    if args.quick:
        cmd.append("--quick")
    return cmd


def child_env(args: argparse.Namespace) -> dict:
    """Environment of stage processes (children and pytest); the shim's PYTHONPATH is inherited."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    # No network on the GPU machine: never wait on the Hub; keep logs readable.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    else:
        env["TRITON_INTERPRET"] = "1"
    return env


def read_stage_file(stage_out: Path) -> dict:
    """What a child stage has recorded so far ({} before its first write)."""
    try:
        return json.loads(stage_out.read_text())
    except Exception:
        return {}


def run_child_stage(args: argparse.Namespace, name: str, st: dict, limit: float, flush: Callable[[], None]) -> None:
    """Run stage `name` in a child process and fill its record `st` (status, data, error summary)."""
    stage_out = Path(args.out) / f"stage-{name}.json"
    with contextlib.suppress(FileNotFoundError):
        stage_out.unlink()
    t0 = time.time()

    def tick() -> None:
        st["data"] = read_stage_file(stage_out)
        st["seconds"] = round(time.time() - t0, 1)
        flush()

    rc, tail, timed_out = run_streaming(
        child_cmd(args, name, stage_out, time.time() + limit),
        limit + 15,  # the child stops itself at its deadline; the kill is a backstop
        f"  [{name}] ",
        cwd=REPO_ROOT,
        env=child_env(args),
        on_tick=tick,
    )
    data = read_stage_file(stage_out)
    st["data"] = data
    st["returncode"] = rc
    if timed_out:
        st["status"] = "timeout"
    elif rc != 0 or data.get("status") != "ok":
        st["status"] = "error"
        st["log_tail"] = tail[-40:]
    elif data.get("errors"):
        st["status"] = "ok (with errors)"
    else:
        st["status"] = "ok"
    if data.get("fatal"):
        st["error_summary"] = data["fatal"].strip().splitlines()[-1]
    elif st["status"] != "ok" and data.get("errors"):
        st["error_summary"] = f"{len(data['errors'])} error(s); first: {data['errors'][0]['error'][:200]}"
    elif st["status"] in ("error", "timeout") and tail:
        st["error_summary"] = tail[-1][:200]
