"""A bounded load/soak run against a running server: mixed good and bad requests, memory watched.

    python -m triton_rerank.bench.soak --grpc-url 127.0.0.1:8001 --duration 600 --concurrency 8

Every good request must come back with one finite score per document, every bad one with
INVALID_ARG, overload with UNAVAILABLE; anything else counts as unexpected. Resident memory of
the server's process group (tritonserver and its backend stubs) is sampled after a warm-up
and at the end. Loopback use only: the loop is bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .report import run_context

WORDS = "panda bamboo forest china bear giant eats lives mountain search engine rank score query".split()


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in a process group (Linux /proc)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rss_after_warmup: int = 0
    rss_at_end: int = 0

    @property
    def unexpected(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in ("ok", "invalid_refused", "overload_refused"))

    def as_dict(self) -> dict:
        data = asdict(self)
        data["outcomes"] = dict(self.outcomes)
        data["unexpected"] = self.unexpected
        data["rss_growth_bytes"] = self.rss_at_end - self.rss_after_warmup
        return data


def _request(rng: random.Random) -> tuple[str, list[bytes], bool]:
    """(query, documents, is_valid): mostly real requests, some broken on purpose."""
    query = " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
    documents = [" ".join(rng.choices(WORDS, k=rng.randint(1, 120))).encode() for _ in range(rng.randint(1, 40))]
    kind = rng.random()
    if kind < 0.05:
        return query, [], False
    if kind < 0.10:
        return query, documents + [b"\xff\xfe broken utf-8"], False
    if kind < 0.12:
        return "   ", documents, False
    return query, documents, True


def _one(client, grpcclient, rng: random.Random) -> str:
    from tritonclient.utils import InferenceServerException

    query, documents, valid = _request(rng)
    # Raw inputs rather than triton_io.make_inputs: some documents are invalid UTF-8 on purpose.
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array(documents, dtype=object))
    try:
        scores = client.infer("reranker", [q, d], client_timeout=120).as_numpy("SCORES").reshape(-1)
    except InferenceServerException as error:
        status = str(error.status())
        if status.endswith("INVALID_ARGUMENT"):
            return "invalid_refused" if not valid else "valid_refused"
        if status.endswith("UNAVAILABLE"):
            return "overload_refused"
        return f"error:{status}"
    if not valid:
        return "invalid_accepted"
    return "ok" if scores.shape == (len(documents),) and np.isfinite(scores).all() else "wrong_result"


def run_soak(grpc_url: str, duration: float, concurrency: int, server_pgid: int | None = None,
             warmup: float = 5.0, seed: int = 0) -> SoakReport:
    import tritonclient.grpc as grpcclient

    report = SoakReport()
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + warmup + duration

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with grpcclient.InferenceServerClient(grpc_url) as client:
            while time.monotonic() < stop_at:
                outcome = _one(client, grpcclient, rng)
                with lock:
                    report.requests += 1
                    report.outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    if server_pgid is not None:
        time.sleep(warmup)
        report.rss_after_warmup = group_rss_bytes(server_pgid)
    for thread in threads:
        thread.join()
    if server_pgid is not None:
        report.rss_at_end = group_rss_bytes(server_pgid)
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_rerank.bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", default="127.0.0.1:8001")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load after the warm-up")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--server-pid", type=int, default=None,
                        help="tritonserver's pid (its process group's memory is sampled)")
    args = parser.parse_args(argv)
    pgid = os.getpgid(args.server_pid) if args.server_pid else None
    report = run_soak(args.grpc_url, args.duration, args.concurrency, pgid)
    # The load generator's machine (CPU model, cores, commit): what the numbers were measured on.
    print(json.dumps({**report.as_dict(), "context": asdict(run_context())}, indent=2))
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
