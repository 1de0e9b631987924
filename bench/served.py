"""Concurrency sweeps of the served contenders (Triton by perf_analyzer, Infinity by HTTP), as report rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..launcher.server import free_ports
from .perf_analyzer import write_input_data
from .perf_sweep import (
    PerfPoint,
    PerfSettings,
    ServerSpec,
    TritonVariant,
    grpc_rerank,
    run_perf_point,
    running_triton,
    scrape_metrics,
    step_times,
    warm_up,
)
from .report import INFINITY, Row
from .workload import RequestSet


def level_count(args, concurrency: int) -> int:
    """Requests sent at one concurrency level: enough for every client to send `rounds` of them."""
    return max(args.requests_per_level, args.rounds * concurrency)


def latency_row(contender: str, kind: str, measure: str, concurrency: int, variant: str, backend: str,
                latencies_s: list[float], pairs_per_request: float, seconds: float | None = None) -> Row:
    """A row from raw latencies; throughput from `seconds` (wall time of them all) or their sum."""
    ms = np.asarray(latencies_s) * 1000.0
    wall = seconds if seconds is not None else float(np.sum(latencies_s))
    rps = len(latencies_s) / wall if wall > 0 else 0.0
    return Row(contender, kind, measure, concurrency, variant, backend, len(latencies_s), rps,
               rps * pairs_per_request, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean()))


def perf_row(point: PerfPoint, protocol: str, variant: str, backend: str, count: int, pairs_per_request: float) -> Row:
    return Row(f"triton-{protocol}", "server", "sweep", point.concurrency, variant, backend, count,
               point.infer_per_s, point.infer_per_s * pairs_per_request, point.p50_us / 1000.0,
               point.p99_us / 1000.0, point.avg_us / 1000.0)


def sweep_triton(args, model_dir: Path, requests: RequestSet, variant: TritonVariant, work: Path,
                 note: Callable[[str], None], bar) -> list[Row]:
    """Starts the server with `variant`, warms it up, runs perf_analyzer per protocol and level, stops it."""

    slug = variant.label().replace(" ", "_").replace("=", "")
    run_dir = work / f"triton-{slug}"
    data = write_input_data(work / "perf-input.json", requests.as_tuples())
    spec = ServerSpec(model_dir, variant, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens,
                      attention_backend=args.attention_backend)
    attention = args.attention_backend or ("triton" if args.device.startswith("cuda") else "sdpa")
    engine = {"packed": f"packed encoder ({attention})", "hf": "transformers (padded)",
              "openvino": "OpenVINO (padded)"}[variant.engine]
    backend = (f"tritonserver 2.51 ensemble, Python backend, {engine}, "
               f"max_batch_tokens {variant.max_batch_tokens or args.max_batch_tokens}")
    pairs_per_request = requests.num_pairs / len(requests.requests)
    rows = []
    note(f"starting tritonserver [{variant.label()}]")
    with running_triton(spec, run_dir) as address:
        note("warm-up")
        warm_up(address, requests.as_tuples(), count=args.warmup, parallel=max(2, variant.instances))
        for protocol in args.protocols:
            for concurrency in args.concurrency:
                count = level_count(args, concurrency)
                note(f"triton-{protocol} c={concurrency} ({count} requests)")
                settings = PerfSettings(request_count=count)
                before = scrape_metrics(address)
                point = run_perf_point(address, protocol, data, concurrency, settings, run_dir / "perf")
                row = perf_row(point, protocol, variant.label(), backend, count, pairs_per_request)
                times = step_times(before, scrape_metrics(address))
                if times is not None and concurrency == 1:
                    row.tokenizer_ms, row.encoder_ms = times.tokenizer_ms, times.encoder_ms
                    row.overhead_ms = row.avg_ms - times.tokenizer_ms - times.encoder_ms
                rows.append(row)
                bar.update(1)
        if getattr(args, "paired", True):
            note("paired latency: served and in-process, alternating")
            rows += paired_latency(args, model_dir, requests, address, variant, level_count(args, 1))
    return rows


def paired_latency(args, model_dir: Path, requests: RequestSet, address, variant: TritonVariant,
                   count: int) -> list[Row]:
    """The latency of one request served (gRPC, tritonclient) and in-process (our packed encoder
    in this process), alternating request by request while the server idles in between.

    Separate runs minutes apart differ by more than the few milliseconds the server adds on a
    shared machine; alternating puts both under the same conditions, so their difference is the
    serving overhead.
    """
    import time

    import torch
    import tritonclient.grpc as grpcclient

    from ..models.dtypes import torch_dtype
    from ..serving.scoring import PackedEngine, score_pairs
    from ..serving.tokenization import PairTokenizer

    torch.set_num_threads(variant.num_threads)
    max_batch_tokens = variant.max_batch_tokens or args.max_batch_tokens
    tokenizer = PairTokenizer(model_dir)
    engine = PackedEngine(str(model_dir), torch_dtype(args.dtype), torch.device(args.device),
                          args.attention_backend or None, variant.quantize or "none", bool(variant.compile))

    def local(query: str, documents: tuple[str, ...]) -> None:
        packed = tokenizer.encode(query, list(documents))
        score_pairs(engine, packed.input_ids, packed.token_type_ids, packed.lengths, max_batch_tokens)

    served, in_process = [], []
    with grpcclient.InferenceServerClient(address.grpc_url) as client:
        first = requests.requests[0]
        local(first.query, first.documents)
        grpc_rerank(client, first.query, first.documents)
        for i in range(count):
            r = requests.requests[i % len(requests.requests)]
            for where in (("served", "local") if i % 2 else ("local", "served")):
                started = time.perf_counter()
                if where == "local":
                    local(r.query, r.documents)
                else:
                    grpc_rerank(client, r.query, r.documents)
                (in_process if where == "local" else served).append(time.perf_counter() - started)
    per_request = requests.num_pairs / len(requests.requests)
    label = variant.label()
    return [
        latency_row("triton-grpc", "server", "paired", 1, label, "tritonclient.grpc, one request at a time",
                    served, per_request),
        latency_row("packed", "in-process", "paired", 1, f"paired with [{label}]",
                    f"PackedEngine, max_batch_tokens {max_batch_tokens}", in_process, per_request),
    ]


def sweep_infinity(args, model_dir: Path, requests: RequestSet, settings, work: Path,
                   note: Callable[[str], None], bar) -> list[Row]:
    from .peer import (
        drive_http,
        infinity_version,
        prepare_model,
        rerank_body,
        running_infinity,
    )

    version = infinity_version(settings) if settings.python else "?"
    backend = (f"infinity-emb {version}, engine {settings.engine}, batch size {settings.batch_size}"
               + (f", {' '.join(settings.extra_args)}" if settings.extra_args else ""))
    variant = f"{settings.engine} bs={settings.batch_size} thr={settings.threads}"
    bodies = [rerank_body(r.query, r.documents) for r in requests.requests]
    pairs_per_request = requests.num_pairs / len(requests.requests)
    rows = []
    note("starting Infinity")
    served = prepare_model(settings, model_dir, work)
    with running_infinity(settings, served, work / "infinity.log", free_ports(1)[0]) as url:
        note("warm-up")
        drive_http(f"{url}/rerank", bodies, 2, max(2, args.warmup))
        for concurrency in args.concurrency:
            count = level_count(args, concurrency)
            note(f"infinity c={concurrency} ({count} requests)")
            result = drive_http(f"{url}/rerank", bodies, concurrency, count)
            rows.append(latency_row(INFINITY, "server", "sweep", concurrency, variant, backend, result.latencies_s,
                                    pairs_per_request, seconds=result.seconds))
            bar.update(1)
    return rows
