"""Does one big request hold up everybody else? Small-request latency alone and beside big ones.

    python -m triton_rerank.bench.tokenizer_isolation --grpc-url 127.0.0.1:8001 --duration 30

Against a running server (e.g. `triton-rerank serve --model-path DIR`), in two phases:

1. alone: one client sends small requests (a short query, --small-docs passages of about 60
   words) back to back for --duration seconds;
2. loaded: the same, while --big-clients other clients keep sending big requests
   (--big-docs documents of --big-doc-bytes each, truncate=true) without pause.

It reports the small requests' latency p50/p99/max in both phases (and the p99 difference, the
figure to watch: how long a small request waits behind big ones), the big requests' latency
and outcomes, and the resident memory of the tokenizer step's backend processes (each model
instance is one `triton_python_backend_stub`) and of the server's whole process group, before
the run and at its peak. --big-text nospace sends documents without spaces, which the
tokenizer cannot cut short (see serving/tokenization.py) and so tokenizes whole: the worst case.

Loopback use only: every loop is bounded in time and stops by itself. The JSON report names the
machine it ran on (CPU model, cores, commit).
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
from .soak import WORDS, group_rss_bytes

QUERY = "where do giant pandas live"
STUB = "triton_python_backend_stub"


def tokenizer_stub_rss(pgid: int | None = None) -> dict[int, int]:
    """{pid: resident bytes} of the tokenizer model's backend stubs (one per instance), Linux /proc.

    A stub's command line names its model's file (.../tokenizer/1/model.py); with `pgid`, only
    the stubs of that process group (one server) count.
    """
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not argv or STUB not in argv[0].decode(errors="replace"):
                continue
            if not any(b"/tokenizer/" in arg for arg in argv[1:]):
                continue
            if pgid is not None and os.getpgid(int(proc.name)) != pgid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[int(proc.name)] = int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return found


def small_documents(rng: random.Random, count: int) -> list[bytes]:
    return [" ".join(rng.choices(WORDS, k=60)).encode() for _ in range(count)]


def big_document(size: int, text: str, seed: int = 0) -> bytes:
    """`size` bytes of text: English-like words, or CJK characters with no space at all."""
    rng = random.Random(seed)
    if text == "nospace":
        alphabet = "熊猫竹子森林中国山大吃住搜索引擎排名"  # 3 bytes each in UTF-8
        chars = "".join(rng.choices(alphabet, k=size // 3 + 1))
        return chars.encode()[: size - size % 3]
    words = " ".join(rng.choices(WORDS, k=size // 5 + 1)).encode()
    return words[:size].rstrip(b" ")


def _inputs(grpcclient, query: str, documents: list[bytes]):
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array(documents, dtype=object))
    return [q, d]


def _outcome(error) -> str:
    status = str(error.status())
    return status.rsplit(".", 1)[-1].lower()


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        ms = np.asarray(self.seconds) * 1000.0
        stats = ({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                  "max_ms": float(ms.max())} if ms.size else {"p50_ms": None, "p99_ms": None, "max_ms": None})
        return {"requests": int(ms.size), **stats, "outcomes": dict(self.outcomes)}


def _send_until(grpc_url: str, stop: threading.Event, until: float, query: str, documents: list[bytes],
                into: Latencies, timeout: float) -> None:
    """Sends one request after the other until `until` (monotonic) or `stop`; records each."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(grpc_url) as client:
        inputs = _inputs(grpcclient, query, documents)
        while not stop.is_set() and time.monotonic() < until:
            started = time.perf_counter()
            try:
                scores = client.infer("reranker", inputs, client_timeout=timeout).as_numpy("SCORES")
                outcome = "ok" if scores.size == len(documents) and np.isfinite(scores).all() else "wrong_result"
            except InferenceServerException as error:
                outcome = _outcome(error)
            into.seconds.append(time.perf_counter() - started)
            into.outcomes[outcome] += 1


@dataclass
class MemoryWatch:
    """Peak resident memory of the tokenizer stubs and of the server's group, sampled in a thread."""

    pgid: int | None
    interval: float = 0.25
    tokenizer_peak: int = 0
    group_peak: int = 0
    per_instance_peak: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        stubs = tokenizer_stub_rss(self.pgid)
        self.tokenizer_peak = max(self.tokenizer_peak, sum(stubs.values()))
        for pid, rss in stubs.items():
            self.per_instance_peak[pid] = max(self.per_instance_peak.get(pid, 0), rss)
        if self.pgid is not None:
            self.group_peak = max(self.group_peak, group_rss_bytes(self.pgid))

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.sample()


def memory_now(pgid: int | None) -> dict:
    stubs = tokenizer_stub_rss(pgid)
    return {"tokenizer_instances": len(stubs), "tokenizer_rss_bytes": sum(stubs.values()),
            "tokenizer_rss_per_instance_bytes": sorted(stubs.values()),
            "group_rss_bytes": group_rss_bytes(pgid) if pgid is not None else None}


def run_isolation(grpc_url: str, duration: float, *, small_docs: int = 10, big_docs: int = 8,
                  big_doc_bytes: int = 1_000_000, big_clients: int = 1, big_text: str = "words",
                  server_pgid: int | None = None, warmup: float = 2.0, timeout: float = 300.0,
                  seed: int = 0) -> dict:
    rng = random.Random(seed)
    small = small_documents(rng, small_docs)
    big = [big_document(big_doc_bytes, big_text, seed + i) for i in range(big_docs)]
    never = threading.Event()

    # Warm-up: first requests pay for connections and lazy initialisation.
    _send_until(grpc_url, never, time.monotonic() + warmup, QUERY, small, Latencies(), timeout)
    memory_before = memory_now(server_pgid)

    alone = Latencies()
    _send_until(grpc_url, never, time.monotonic() + duration, QUERY, small, alone, timeout)

    watch = MemoryWatch(server_pgid)
    watch.sample()
    stop = threading.Event()
    big_latencies = Latencies()
    loaded = Latencies()
    watcher = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    big_threads = [threading.Thread(target=_send_until, daemon=True,
                                    args=(grpc_url, stop, time.monotonic() + duration + timeout, QUERY, big,
                                          big_latencies, timeout))
                   for _ in range(big_clients)]
    watcher.start()
    for thread in big_threads:
        thread.start()
    # Let the big requests get going, so that the small ones meet them from the start.
    time.sleep(min(1.0, duration / 4))
    _send_until(grpc_url, never, time.monotonic() + duration, QUERY, small, loaded, timeout)
    stop.set()
    for thread in big_threads:
        thread.join()
    watcher.join()
    watch.sample()

    alone_s, loaded_s = alone.summary(), loaded.summary()
    both = alone_s["p99_ms"] is not None and loaded_s["p99_ms"] is not None
    return {
        "grpc_url": grpc_url,
        "duration_s": duration,
        "small_request": {"documents": small_docs, "bytes": sum(map(len, small)) + len(QUERY)},
        "big_request": {"documents": big_docs, "document_bytes": big_doc_bytes, "text": big_text,
                        "clients": big_clients},
        "small_alone": alone_s,
        "small_loaded": loaded_s,
        "p99_increase_ms": loaded_s["p99_ms"] - alone_s["p99_ms"] if both else None,
        "big": big_latencies.summary(),
        "memory_before": memory_before,
        "memory_peak": {"tokenizer_rss_bytes": watch.tokenizer_peak,
                        "tokenizer_rss_per_instance_bytes": sorted(watch.per_instance_peak.values()),
                        "group_rss_bytes": watch.group_peak if server_pgid is not None else None},
        "memory_after": memory_now(server_pgid),
    }


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def describe(report: dict) -> str:
    a, b, big = report["small_alone"], report["small_loaded"], report["big"]

    def ms(value) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    lines = [
        f"small request ({report['small_request']['documents']} docs): alone p50 {ms(a['p50_ms'])} p99 "
        f"{ms(a['p99_ms'])} ({a['requests']} requests); beside big ones p50 {ms(b['p50_ms'])} p99 "
        f"{ms(b['p99_ms'])} max {ms(b['max_ms'])} ({b['requests']} requests)",
        f"p99 increase: {ms(report['p99_increase_ms'])}",
        f"big request ({report['big_request']['documents']} x {report['big_request']['document_bytes']} bytes, "
        f"{report['big_request']['text']}): p50 {ms(big['p50_ms'])} max {ms(big['max_ms'])}, outcomes "
        f"{big['outcomes']}",
        f"tokenizer RSS: {report['memory_before']['tokenizer_instances']} instance(s), "
        f"{_mb(report['memory_before']['tokenizer_rss_bytes'])} before, "
        f"{_mb(report['memory_peak']['tokenizer_rss_bytes'])} at peak; per instance at peak "
        f"{[_mb(v) for v in report['memory_peak']['tokenizer_rss_per_instance_bytes']]}; server group "
        f"{_mb(report['memory_before']['group_rss_bytes'])} before, {_mb(report['memory_peak']['group_rss_bytes'])} "
        "at peak",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_rerank.bench.tokenizer_isolation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", default="127.0.0.1:8001")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of each phase (default: %(default)s)")
    parser.add_argument("--small-docs", type=int, default=10, help="documents of a small request (default: %(default)s)")
    parser.add_argument("--big-docs", type=int, default=8, help="documents of a big request (default: %(default)s)")
    parser.add_argument("--big-doc-bytes", type=int, default=1_000_000,
                        help="bytes of each big document (default: %(default)s; 8 of them stay under the "
                        "default 8 MiB max_request_bytes)")
    parser.add_argument("--big-clients", type=int, default=1,
                        help="clients sending big requests back to back (default: %(default)s)")
    parser.add_argument("--big-text", choices=("words", "nospace"), default="words",
                        help="words: English-like text; nospace: CJK without spaces, tokenized whole "
                        "(default: %(default)s)")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="tritonserver's pid: its process group's memory is reported and only its "
                        "tokenizer stubs count (default: every tokenizer stub on this machine)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of small requests first (default: "
                        "%(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout of one request, seconds")
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)
    pgid = os.getpgid(args.server_pid) if args.server_pid else None
    report = run_isolation(args.grpc_url, args.duration, small_docs=args.small_docs, big_docs=args.big_docs,
                           big_doc_bytes=args.big_doc_bytes, big_clients=args.big_clients, big_text=args.big_text,
                           server_pgid=pgid, warmup=args.warmup, timeout=args.timeout)
    # The load generator's machine (CPU model, cores, commit): what the numbers were measured on.
    report["context"] = asdict(run_context())
    if not args.json:
        print(describe(report))
    print(json.dumps(report, indent=2))
    unexpected = {k for k in (*report["small_alone"]["outcomes"], *report["small_loaded"]["outcomes"]) if k != "ok"}
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
