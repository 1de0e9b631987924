"""Timing of GPU work: per-call milliseconds of a kernel, seconds per pass over a workload.

Both measure after a first, untimed call (Triton compilation and autotuning, cuBLAS heuristics,
allocator growth) and shrink their work when the stage deadline is near rather than overrun it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device) -> None:
    """Wait for queued CUDA work, so wall-clock time covers it (no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 10, max_seconds: float = 10.0) -> float:
    """Mean milliseconds per call: CUDA events around `iters` back-to-back calls (perf_counter on CPU).

    Iterations are reduced when one call is slow so a measurement stays within ~max_seconds.
    """
    t0 = time.perf_counter()
    fn()  # first call: compilation, autotuning, allocator warmup
    sync(device)
    per_call = time.perf_counter() - t0
    t1, done = time.perf_counter(), 0
    for _ in range(max(0, warmup - 1)):
        fn()
        done += 1
        if time.perf_counter() - t1 > max_seconds / 4:
            break
    sync(device)
    if done:
        per_call = (time.perf_counter() - t1) / done
    iters = max(1, min(iters, int(max_seconds / 2 / max(per_call, 1e-6))))
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t1 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t1) * 1e3 / iters


def time_passes(
    fwd: Callable[[Any], Any],
    batches: Sequence[Any],
    device,
    passes: int,
    time_left: Callable[[], float],
    entry: dict,
) -> list[float]:
    """Seconds of each timed pass of `fwd` over all `batches`, after one untimed warmup pass.

    Records entry["warmup_s"]; a pass is started only while the deadline leaves room for it (the
    last pass's time, or the warmup's, plus 5 s), and entry["note"] says when passes were cut.
    With no timed pass left, the warmup pass (compilation included) is the one reported.
    Raises TimeoutError when the deadline comes within the warmup pass.
    """
    with torch.inference_mode():
        t0 = time.perf_counter()
        done = 0
        for b in batches:
            fwd(b)
            done += 1
            if time_left() < 10:
                break
        sync(device)
        entry["warmup_s"] = time.perf_counter() - t0
        if done < len(batches):
            raise TimeoutError(f"stage deadline reached in the warmup pass ({done}/{len(batches)} batches)")
        times: list[float] = []
        for _ in range(passes):
            if time_left() < (times[-1] if times else entry["warmup_s"]) + 5:
                entry["note"] = "fewer passes: stage deadline near"
                break
            t0 = time.perf_counter()
            for b in batches:
                fwd(b)
            sync(device)
            times.append(time.perf_counter() - t0)
    if not times:
        times = [entry["warmup_s"]]
        entry["note"] = "timed from the warmup pass only (includes compilation)"
    return times
