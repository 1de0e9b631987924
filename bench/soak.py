"""A bounded load/soak run against a running server: good, bad and hostile requests, memory watched.

    python -m triton_rerank.bench.soak --grpc-url 127.0.0.1:8001 --duration 600 --concurrency 8

Good requests come from a fixed pool whose scores are first measured one at a time, alone; under
load each answer must match its reference (scores batched with other requests may differ in the
last bits, hence a tolerance). Bad requests (empty, broken UTF-8, blank query, too many
documents) must get INVALID_ARG; hostile ones, calls straight to the internal `cross_encoder` step
with inputs the tokenizer never produced, INVALID_ARG too; a few requests carry documents of a
megabyte each and must still be answered. Overload may answer UNAVAILABLE; anything else counts
as unexpected. Resident memory of the server's process group (tritonserver and its backend stubs)
is sampled after a warm-up and at the end. Loopback use only: the loop stops by itself.
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
    return group_memory_bytes(pgid, "VmRSS")


def group_memory_bytes(pgid: int, field: str) -> int:
    """One /proc/<pid>/status memory field (VmRSS, RssAnon, RssShmem) summed over a process group."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith(f"{field}:"):
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
        return sum(n for k, n in self.outcomes.items() if k not in EXPECTED)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["outcomes"] = dict(self.outcomes)
        data["unexpected"] = self.unexpected
        data["rss_growth_bytes"] = self.rss_at_end - self.rss_after_warmup
        return data


# Scores under load against the same request alone: batching changes float summation order only.
SCORE_RTOL = SCORE_ATOL = 1e-4
EXPECTED = ("ok", "invalid_refused", "hostile_refused", "overload_refused")


def honest_pool(seed: int, size: int = 48) -> list[tuple[str, list[bytes]]]:
    """Fixed good requests (query, documents), measured alone first and checked under load."""
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
             [" ".join(rng.choices(WORDS, k=rng.randint(1, 120))).encode() for _ in range(rng.randint(1, 40))])
            for _ in range(size)]


def _bad_request(rng: random.Random, pool) -> tuple[str, list[bytes]]:
    query, documents = rng.choice(pool)
    return rng.choice([
        (query, []),
        (query, documents + [b"\xff\xfe broken utf-8"]),
        ("   ", documents),
        (query, [b"panda"] * 1001),
    ])


def _hostile_inputs(grpcclient, rng: random.Random) -> list:
    """Inputs for a direct call of the internal scoring step that its checks must refuse."""
    total = rng.randint(2, 400)
    lengths = rng.choice([[1], [total + 5], [total, -3], [1] * 2000, [total]])  # the last: unsigned
    arrays = {"INPUT_IDS": np.array([rng.randint(-5, 10**6) for _ in range(total)], dtype=np.int32),
              "TOKEN_TYPE_IDS": np.zeros(total, dtype=np.int32), "SEQ_LENGTHS": np.array(lengths, dtype=np.int32),
              "CHUNK_COUNTS": np.ones(len(lengths), dtype=np.int32), "SIGNATURE": np.zeros(32, dtype=np.uint8)}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, [1, array.size], "UINT8" if name == "SIGNATURE" else "INT32")
        tensor.set_data_from_numpy(array[None])
        inputs.append(tensor)
    return inputs


def _ensemble_inputs(grpcclient, query: str, documents: list[bytes]) -> list:
    # Raw inputs rather than triton_io.make_inputs: some documents are invalid UTF-8 on purpose.
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array(documents, dtype=object))
    return [q, d]


def reference_scores(client, grpcclient, pool) -> list[np.ndarray]:
    """Each pool request's scores, sent one at a time with nothing else in flight."""
    return [client.infer("reranker", _ensemble_inputs(grpcclient, q, docs)).as_numpy("SCORES").reshape(-1)
            for q, docs in pool]


def _one(client, grpcclient, rng: random.Random, pool, references) -> str:
    from tritonclient.utils import InferenceServerException

    kind = rng.random()
    model, refused, expected = "reranker", None, None
    if kind < 0.10:
        inputs, refused = _ensemble_inputs(grpcclient, *_bad_request(rng, pool)), "invalid_refused"
    elif kind < 0.15:
        model, inputs, refused = "cross_encoder", _hostile_inputs(grpcclient, rng), "hostile_refused"
    elif kind < 0.16:
        # Megabyte documents: the tokenizer cuts them to what the window keeps, so they are answered.
        query, documents = rng.choice(pool)
        big = documents[0] * (2**20 // len(documents[0]))
        inputs = _ensemble_inputs(grpcclient, query, [big, big])
    else:
        index = rng.randrange(len(pool))
        inputs, expected = _ensemble_inputs(grpcclient, *pool[index]), references[index]
    try:
        scores = client.infer(model, inputs, client_timeout=120).as_numpy("SCORES").reshape(-1)
    except InferenceServerException as error:
        status = str(error.status())
        if status.endswith("INVALID_ARGUMENT"):
            return refused or "valid_refused"
        if status.endswith("UNAVAILABLE"):
            return "overload_refused"
        return f"error:{status}"
    if refused:
        return "invalid_accepted" if refused == "invalid_refused" else "hostile_accepted"
    if not np.isfinite(scores).all() or (expected is not None and scores.shape != expected.shape):
        return "wrong_result"
    if expected is not None and not np.allclose(scores, expected, rtol=SCORE_RTOL, atol=SCORE_ATOL):
        return "wrong_score"
    return "ok"


def run_soak(grpc_url: str, duration: float, concurrency: int, server_pgid: int | None = None,
             warmup: float = 5.0, seed: int = 0) -> SoakReport:
    import tritonclient.grpc as grpcclient

    report = SoakReport()
    lock = threading.Lock()
    pool = honest_pool(seed)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        references = reference_scores(client, grpcclient, pool)
    started = time.monotonic()
    stop_at = started + warmup + duration

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with grpcclient.InferenceServerClient(grpc_url) as client:
            while time.monotonic() < stop_at:
                outcome = _one(client, grpcclient, rng, pool, references)
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
