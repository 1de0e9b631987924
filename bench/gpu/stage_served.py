"""GPU-check stage 6, ``served``: the `reranker` ensemble through the real tritonserver, over gRPC.

The same random-weight bge-reranker-v2-m3 shape as ``encoder`` (tiny on CPU), written with the
real XLM-R tokenizer from the data folder, is served by the bundled tritonserver (nvidia-pytriton;
on a machine without it, the wheel carried in --carry, see carry.py) from the rendered model
repository, on the device and dtype of the run, packed encoder with Triton attention on CUDA.
After a warm-up, DL19 requests (each query with its top 20, then top 100 passages) are sent by
`concurrency` asynchronous gRPC clients (tritonclient.grpc.aio through the project's
AsyncRerankClient) for a fixed time per level. Per level: requests/s, pairs/s, p50/p99 latency,
real tokens/s (from the ensemble's TOKEN_COUNTS) and model TFLOP/s over the same FLOP count as
``encoder``; where the time went (tokenizer step, encoder forwards) from the server's metrics.
results.py adds MFU and the ratio to the in-process packed encoder of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...launcher.server import ServerAddress
from ..workload import (
    DL19_FILE,
    TOKENIZER_FILE,
    RequestSet,
    dl19_requests,
    encoder_flops,
    load_model_config,
    resolve_data_dir,
)
from .stage_recorder import StageRecorder, guarded, log

# (documents per request, concurrency levels) on a GPU and in the CPU smoke mode.
GPU_LEVELS = ((20, (1, 8, 32, 64)), (100, (1, 4, 16, 32)))
CPU_LEVELS = ((20, (1, 2)),)
GPU_LEVEL_SECONDS, CPU_LEVEL_SECONDS = 8.0, 3.0
# Time kept back for stopping the server after the last level.
STOP_RESERVE_SECONDS = 20.0


def build_served_model(out: Path, cfg: dict, data_dir: Path | None) -> tuple[Path, str]:
    """The random-weight model directory with a tokenizer: the real XLM-R one when the data folder has it."""
    from ..random_model import build_random_model, train_tokenizer

    tokenizer_json = data_dir / TOKENIZER_FILE if data_dir is not None else None
    if tokenizer_json is not None and tokenizer_json.is_file():
        tokenizer, source = str(tokenizer_json), str(tokenizer_json)
    else:
        tokenizer, source = train_tokenizer("xlm-roberta"), "trained XLM-R-style tokenizer (tiny vocabulary)"
    return build_random_model(out, cfg, tokenizer, seed=0), source


def served_requests(data_dir: Path | None, docs: int, tokenizer_dir: Path) -> RequestSet:
    """DL19 queries with their top `docs` passages; synthetic words of the tokenizer when DL19 is absent."""
    if data_dir is not None and (data_dir / DL19_FILE).is_file():
        return dl19_requests(data_dir / DL19_FILE, docs)
    from ..workload import synthetic_requests, vocabulary_words

    words = vocabulary_words(tokenizer_dir / "tokenizer.json")
    return synthetic_requests(words, num_requests=16, docs_per_request=docs, query_tokens=8, doc_tokens=80)


async def drive(url: str, requests: RequestSet, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients send the requests in turn for `seconds` (each finishes its last one)."""
    from ...client.rerank_client import AsyncRerankClient

    client = AsyncRerankClient(url, "grpc", retries=0, max_documents_per_request=None, timeout=600.0)
    latencies: list[float] = []
    lengths: list[int] = []
    pairs = 0
    items = requests.requests
    start = time.perf_counter()
    stop_at = start + seconds

    async def one_client(offset: int) -> None:
        nonlocal pairs
        i = offset
        while time.perf_counter() < stop_at:
            request = items[i % len(items)]
            i += concurrency
            t0 = time.perf_counter()
            scored = await client.score(request.query, request.documents)
            latencies.append(time.perf_counter() - t0)
            lengths.extend(int(n) for n in scored.token_counts)
            pairs += len(request.documents)

    try:
        await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies), "pairs": pairs, "seconds": wall, "tokens": int(sum(lengths)),
        "requests_per_s": len(latencies) / wall, "pairs_per_s": pairs / wall, "tokens_per_s": sum(lengths) / wall,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
        "lengths": lengths,
    }


def _level(rec: StageRecorder, address: ServerAddress, requests: RequestSet, docs: int, concurrency: int,
           seconds: float, cfg: dict) -> dict[str, Any]:
    from ..perf_sweep import scrape_metrics, step_times

    before = scrape_metrics(address)
    point = asyncio.run(drive(address.grpc_url, requests, concurrency, seconds))
    steps = step_times(before, scrape_metrics(address))
    lengths = point.pop("lengths")
    point.update({"docs": docs, "concurrency": concurrency,
                  "tflops": encoder_flops(lengths, cfg) / point["seconds"] / 1e12 if lengths else 0.0})
    if steps is not None:
        point.update({"tokenizer_ms_per_request": steps.tokenizer_ms, "encoder_ms_per_request": steps.encoder_ms})
    log(f"served docs={docs} c={concurrency}: {point['pairs_per_s']:.1f} pairs/s, p50 {point['p50_ms']:.1f} ms, "
        f"p99 {point['p99_ms']:.1f} ms, {point['tflops']:.2f} TFLOP/s")
    return point


def stage_served(args: argparse.Namespace, rec: StageRecorder) -> None:
    from ..perf_sweep import ServerSpec, TritonVariant, running_triton, warm_up

    device = args.device
    tiny = device != "cuda"
    data_dir = resolve_data_dir(args.data_dir)
    cfg, cfg_source = load_model_config(data_dir, tiny)
    attention = "triton" if device == "cuda" else "sdpa"
    rec.data.update({"model": f"bge-reranker-v2-m3 shape ({cfg_source}), random weights", "device": device,
                     "dtype": args.dtype, "attention_backend": attention, "token_budget": args.token_budget})
    from ...launcher.triton_install import TritonInstall

    # The bundled server in use: installed, or unpacked from the carried wheel (check.py --carry).
    rec.set("tritonserver", str(TritonInstall.find().server))
    rec.set("levels", [])
    levels, seconds = (GPU_LEVELS, GPU_LEVEL_SECONDS) if not tiny else (CPU_LEVELS, CPU_LEVEL_SECONDS)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_served_"))
    try:
        t0 = time.time()
        model_dir, tokenizer_source = build_served_model(work / "model", cfg, data_dir)
        rec.data.update({"tokenizer": tokenizer_source, "build_model_s": time.time() - t0})
        log(f"served: model written in {time.time() - t0:.1f}s; starting tritonserver")
        spec = ServerSpec(model_dir, TritonVariant(instances=1, num_threads=0), device=device, dtype=args.dtype,
                          max_batch_tokens=args.token_budget, attention_backend=attention)
        t0 = time.time()
        with running_triton(spec, work / "run", ready_timeout=max(60.0, rec.time_left() - 60.0)) as address:
            rec.set("server_ready_s", time.time() - t0)
            log(f"served: tritonserver ready in {time.time() - t0:.1f}s")
            for docs, concurrencies in levels:
                requests = served_requests(data_dir, docs, model_dir)
                rec.data.setdefault("workloads", {})[str(docs)] = requests.source
                with guarded(rec, f"warm-up docs={docs}"):
                    warm_up(address, requests.as_tuples()[:8], count=8, parallel=2)
                for concurrency in concurrencies:
                    if rec.time_left() < seconds + STOP_RESERVE_SECONDS:
                        rec.data["levels"].append({"docs": docs, "concurrency": concurrency,
                                                   "error": "skipped: stage deadline near"})
                        continue
                    with guarded(rec, f"level docs={docs} c={concurrency}"):
                        rec.data["levels"].append(_level(rec, address, requests, docs, concurrency, seconds, cfg))
                    rec.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)
