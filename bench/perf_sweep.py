"""The Triton side of the benchmark: a server per settings variant, perf_analyzer sweeps, its CSV.

Each variant (queue delay, cross_encoder instances, torch threads, tokenizer threads) gets a
rendered copy of the model repository and a tritonserver of its own, started, warmed up, swept
with the real `perf_analyzer` (one run per concurrency level, over gRPC and/or HTTP) and stopped
before anything else is measured: on a small CPU two servers would steal each other's cores.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..launcher.repository import (
    SCORER,
    RepositorySettings,
    packaged_model_repository,
    read_config,
    render_model_repository,
)
from ..launcher.server import ServerAddress, TritonServer, free_ports
from ..models.dtypes import DTYPE_NAMES, QUANTIZE_NAMES
from ..models.families import ENGINE_NAMES
from .perf_analyzer import perf_analyzer_binary, perf_analyzer_environment

# perf_analyzer 2.51 `-f` CSV columns we read (times in microseconds).
PERF_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "infer_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",  # not written by 2.51: the sum of the component columns below
    "Server Queue": "server_queue_us",
    "Server Compute Infer": "server_infer_us",
    "Client Send": "client_send_us",
    "Client Recv": "client_recv_us",
}

# perf_analyzer's mean client latency is the sum of these (its stdout says so too).
_AVG_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
              "Server Compute Infer", "Server Compute Output", "Client Recv")


@dataclass
class PerfPoint:
    concurrency: int
    infer_per_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float = 0.0
    server_queue_us: float = 0.0
    server_infer_us: float = 0.0
    client_send_us: float = 0.0
    client_recv_us: float = 0.0


def parse_perf_csv(text: str) -> list[PerfPoint]:
    """Rows of a perf_analyzer `-f` CSV file (one per concurrency level)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"not a perf_analyzer CSV: no column {', '.join(missing)}")
    points = []
    for row in reader:
        if not row.get("Concurrency"):
            continue
        values = {attr: float(row[col]) for col, attr in PERF_COLUMNS.items() if row.get(col) not in (None, "")}
        values["concurrency"] = int(values["concurrency"])
        if "avg_us" not in values:
            values["avg_us"] = sum(float(row[c]) for c in _AVG_PARTS if row.get(c) not in (None, ""))
        points.append(PerfPoint(**values))
    return points


@dataclass(frozen=True)
class TritonVariant:
    """Server settings measured as one contender. None = as in model_repository/*/config.pbtxt."""

    queue_delay_us: int | None = None
    instances: int = 1
    num_threads: int = 2
    tokenizer_threads: int | None = None  # RAYON_NUM_THREADS of the server (the tokenizer stub)
    max_batch_tokens: int | None = None  # None: the run's --max-batch-tokens
    quantize: str | None = None  # None: the run's --quantize
    compile: int = 0  # 1: torch.compile the encoder's layers (serve --compile)
    engine: str = "packed"  # serve --engine
    dtype: str | None = None  # None: the run's --dtype

    def label(self) -> str:
        parts = [f"inst={self.instances}", f"thr={self.num_threads}"]
        if self.queue_delay_us is not None:
            parts.insert(0, f"delay={self.queue_delay_us}us")
        if self.tokenizer_threads is not None:
            parts.append(f"tok={self.tokenizer_threads}")
        if self.max_batch_tokens is not None:
            parts.append(f"mbt={self.max_batch_tokens}")
        if self.quantize not in (None, "none"):
            parts.append(self.quantize)
        if self.compile:
            parts.append("compiled")
        if self.engine != "packed":
            parts.append(self.engine)
        if self.dtype is not None:
            parts.append(self.dtype)
        return " ".join(parts)


_VARIANT_KEYS = {"delay": "queue_delay_us", "instances": "instances", "threads": "num_threads",
                 "tok": "tokenizer_threads", "mbt": "max_batch_tokens", "compile": "compile"}


def parse_variant(spec: str, default_threads: int) -> TritonVariant:
    """'delay=0,instances=2,threads=1,tok=1,mbt=4096,q=int8,engine=openvino,dtype=float32' -> TritonVariant (omitted keys keep
    their defaults)."""
    values: dict[str, int | str] = {"num_threads": default_threads}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = (s.strip() for s in part.partition("="))
        if key == "q" and value in QUANTIZE_NAMES:
            values["quantize"] = value
            continue
        if key == "engine" and value in ENGINE_NAMES:
            values["engine"] = value
            continue
        if key == "dtype" and value in ("auto", *DTYPE_NAMES):
            values["dtype"] = value
            continue
        if not sep or key not in _VARIANT_KEYS or not value.isdigit():
            raise ValueError(f"bad Triton variant item {part!r}: use delay=US,instances=N,threads=N,tok=N,mbt=N,"
                             f"compile=0|1,q={'|'.join(QUANTIZE_NAMES)},engine={'|'.join(ENGINE_NAMES)},"
                             f"dtype=auto|{'|'.join(DTYPE_NAMES)}")
        values[_VARIANT_KEYS[key]] = int(value)
    if values.get("instances", 1) < 1 or values.get("max_batch_tokens", 1) < 1:
        raise ValueError("instances and mbt must be >= 1")
    return TritonVariant(**values)


def configured_queue_delay(repository: Path | None = None) -> int:
    """The encoder's `max_queue_delay_microseconds` in a repository (default: the packaged one)."""
    source = packaged_model_repository() if repository is None else repository
    return read_config(source / SCORER).dynamic_batching.max_queue_delay_microseconds


@dataclass
class ServerSpec:
    model_dir: Path
    variant: TritonVariant
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_tokens: int = 16384
    attention_backend: str = ""
    extra: dict[str, dict[str, str]] = field(default_factory=dict)


def render_repository(spec: ServerSpec, target: Path) -> Path:
    settings = RepositorySettings(
        model_path=str(spec.model_dir), device=spec.device, dtype=spec.variant.dtype or spec.dtype,
        quantize=spec.variant.quantize or "none",
        compile=bool(spec.variant.compile), engine=spec.variant.engine,
        attention_backend=spec.attention_backend, max_batch_tokens=spec.variant.max_batch_tokens or spec.max_batch_tokens,
        instances=spec.variant.instances, num_threads=spec.variant.num_threads,
        queue_delay_us=spec.variant.queue_delay_us, extra=spec.extra,
    )
    return render_model_repository(settings, target)


@contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def running_triton(spec: ServerSpec, run_dir: Path, ready_timeout: float = 300.0) -> Iterator[ServerAddress]:
    """A tritonserver for `spec` on free loopback ports, stopped (with its stubs) on exit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    repository = render_repository(spec, run_dir / "model_repository")
    http, grpc, metrics = free_ports(3)
    address = ServerAddress("127.0.0.1", http, grpc, metrics)
    env = {"TOKENIZERS_PARALLELISM": "true"}
    if spec.variant.tokenizer_threads is not None:
        env["RAYON_NUM_THREADS"] = str(spec.variant.tokenizer_threads)
    with _environment(env):
        server = TritonServer(repository, run_dir, address, extra_args=["--exit-timeout-secs=5"]).start()
    try:
        server.wait_ready(ready_timeout)
        yield address
    finally:
        server.stop()


def grpc_rerank(client, query: str, documents: list[str] | tuple[str, ...]):
    """One request to the ensemble with a tritonclient.grpc client."""
    import tritonclient.grpc as grpcclient

    from ..client.triton_io import make_inputs

    return client.infer("reranker", make_inputs(grpcclient, query, documents), client_timeout=300)


def warm_up(address: ServerAddress, requests: list[tuple[str, list[str]]], count: int = 6, parallel: int = 2) -> None:
    """`count` requests, `parallel` at a time (so that every instance gets some): the first
    executes of a fresh stub (lazy torch initialisation) are slow and must not be measured."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    def send(item: tuple[str, list[str]]) -> None:
        with grpcclient.InferenceServerClient(address.grpc_url) as client:
            grpc_rerank(client, *item)

    items = (requests * count)[:count]
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(send, items))


_METRIC = re.compile(r'^(\w+)\{model="([^"]+)"[^}]*\}\s+(\S+)$')
SCRAPED = ("nv_inference_request_success", "nv_inference_compute_infer_duration_us", "rerank_compute_seconds_total")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(metric, model): value} of the Prometheus lines we use (Triton's own and the encoder's)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if match and match.group(1) in SCRAPED:
            key = (match.group(1), match.group(2))
            out[key] = out.get(key, 0.0) + float(match.group(3))
    return out


def scrape_metrics(address: ServerAddress) -> dict[tuple[str, str], float]:
    from urllib.request import urlopen

    with urlopen(f"http://{address.host}:{address.metrics_port}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


@dataclass
class StepTimes:
    """Per served request, between two scrapes: time in the two models' own code."""

    requests: int
    tokenizer_ms: float  # the tokenizer step's execute (Triton's compute_infer; includes the stub round trip)
    encoder_ms: float  # encoder forwards only (our rerank_compute_seconds_total)


def step_times(before: dict, after: dict) -> StepTimes | None:
    def delta(metric: str, model: str) -> float:
        return after.get((metric, model), 0.0) - before.get((metric, model), 0.0)

    n = delta("nv_inference_request_success", "reranker")
    if n <= 0:
        return None
    return StepTimes(int(n), delta("nv_inference_compute_infer_duration_us", "tokenizer") / 1000.0 / n,
                     delta("rerank_compute_seconds_total", "cross_encoder") * 1000.0 / n)


@dataclass
class PerfSettings:
    """How perf_analyzer measures one concurrency level.

    By default a fixed number of requests (`--request-count`): on a small CPU a request of 20
    documents takes a large fraction of a second, so stability-checked time windows either hold
    one or two requests (and fail as unstable) or take minutes. With `request_count=0` it uses
    time windows of `measurement_interval_ms` until 3 agree within `stability_percentage`.
    """

    request_count: int = 16
    measurement_interval_ms: int = 4000
    max_trials: int = 10
    stability_percentage: int = 10
    timeout_s: float = 600.0


def perf_command(binary: Path | str, url: str, protocol: str, input_data: Path, concurrency: int,
                 csv_path: Path, settings: PerfSettings, model: str = "reranker") -> list[str]:
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    command = [str(binary), "-m", model, "-u", url, "-i", protocol, "--input-data", str(input_data),
               "--concurrency-range", str(concurrency), "-f", str(csv_path)]
    if settings.request_count > 0:
        return [*command, "--request-count", str(max(settings.request_count, concurrency))]
    return [*command, "--measurement-interval", str(settings.measurement_interval_ms),
            "--stability-percentage", str(settings.stability_percentage), "--max-trials", str(settings.max_trials)]


def parse_profile_export(data: bytes | str) -> list[tuple[int, int]]:
    """(start_ns, end_ns) of every request in a perf_analyzer `--profile-export-file` JSON.

    The file echoes the BYTES inputs raw (not always valid UTF-8); only timestamps are read.
    """
    import json

    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    out = []
    for experiment in json.loads(text)["experiments"]:
        for request in experiment["requests"]:
            if request.get("response_timestamps"):
                out.append((int(request["timestamp"]), int(request["response_timestamps"][-1])))
    return out


def point_from_records(concurrency: int, records: list[tuple[int, int]], server: PerfPoint | None = None) -> PerfPoint:
    """Throughput and latency percentiles from request timestamps.

    perf_analyzer 2.51's own figure in --request-count mode divides by a window polled in whole
    seconds (up to 1 s too long); here: requests / (last answer - first send), as for Infinity.
    """
    import numpy as np

    if not records:
        raise ValueError("no completed requests")
    lat_us = np.array([(end - start) / 1000.0 for start, end in records])
    span_s = (max(end for _, end in records) - min(start for start, _ in records)) / 1e9
    p50, p90, p95, p99 = (float(np.percentile(lat_us, q)) for q in (50, 90, 95, 99))
    extra = {}
    if server is not None:
        extra = {k: getattr(server, k) for k in ("server_queue_us", "server_infer_us", "client_send_us",
                                                  "client_recv_us")}
    return PerfPoint(concurrency, len(records) / span_s if span_s > 0 else 0.0, p50, p90, p95, p99,
                     float(lat_us.mean()), **extra)


def run_perf_point(address: ServerAddress, protocol: str, input_data: Path, concurrency: int,
                   settings: PerfSettings, work_dir: Path) -> PerfPoint:
    """perf_analyzer at one concurrency level; raises with its output when it fails."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = work_dir / f"perf-{protocol}-c{concurrency}"
    csv_path, export = stem.with_suffix(".csv"), stem.with_suffix(".json")
    url = address.grpc_url if protocol == "grpc" else address.http_url
    command = perf_command(perf_analyzer_binary(), url, protocol, input_data, concurrency, csv_path, settings)
    command += ["--profile-export-file", str(export)]
    for old in (csv_path, export):  # perf_analyzer refuses an existing export file
        old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="palibs-") as libs:
        result = subprocess.run(command, env=perf_analyzer_environment(Path(libs)), capture_output=True,
                                text=True, timeout=settings.timeout_s)
    stem.with_suffix(".log").write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode != 0 or not csv_path.is_file():
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if "error" in line.lower()][:5]
        raise RuntimeError(f"perf_analyzer failed (exit {result.returncode}): "
                           + ("\n".join(errors) or output[-2000:]) + f" (see {stem.with_suffix('.log')})")
    points = parse_perf_csv(csv_path.read_text())
    if len(points) != 1:
        raise RuntimeError(f"perf_analyzer wrote {len(points)} rows to {csv_path}, expected 1")
    if settings.request_count > 0 and export.is_file():
        return point_from_records(concurrency, parse_profile_export(export.read_bytes()), points[0])
    return points[0]
