"""In-process baselines of the benchmark: the same requests scored without any server.

- `hf_padded`: what a user writes by hand with Hugging Face transformers: the workload's
  (query, document) pairs in order, batches of 32, the model's tokenizer with padding and
  `truncation="only_second"`, `AutoModelForSequenceClassification` with SDPA attention.
- `packed`: our packed encoder without Triton: the server's `PairTokenizer` per request, then
  every pair of the workload through `score_pairs` (length-sorted micro-batches under the same
  `max_batch_tokens` as the server).

Both include tokenization (text in, scores out), as the served contenders do, and use the same
torch thread count. Each measures (a) the whole workload once after a warm-up ("offline"
pairs/s) and (b) single requests one after another (the latency of one request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .workload import Request, RequestSet


@dataclass
class InProcessResult:
    name: str
    backend: str
    pairs: int
    seconds: float  # the whole workload, once
    latencies_s: list[float] = field(default_factory=list)  # one request at a time
    docs_per_request: int = 0
    # Of those single requests, when the engine reports them: tokenization and encoder forwards.
    tokenize_s: list[float] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _measure(name: str, backend: str, requests: RequestSet, score_all: Callable[[Sequence[Request]], object],
             score_one: Callable[[Request], object], latency_repeats: int, device: str,
             progress: Callable[[str], None] | None) -> InProcessResult:
    for request in requests.requests[:2]:  # warm-up: lazy init, allocator, thread pools
        score_one(request)
    _sync(device)
    if progress:
        progress(f"{name}: {requests.num_pairs} pairs")
    started = time.perf_counter()
    score_all(requests.requests)
    _sync(device)
    seconds = time.perf_counter() - started
    result = InProcessResult(name, backend, requests.num_pairs, seconds, [], requests.docs_per_request)
    for i in range(latency_repeats):
        if progress:
            progress(f"{name}: latency {i + 1}/{latency_repeats}")
        request = requests.requests[i % len(requests.requests)]
        started = time.perf_counter()
        split = score_one(request)
        _sync(device)
        result.latencies_s.append(time.perf_counter() - started)
        if isinstance(split, tuple):
            result.tokenize_s.append(split[0])
            result.encode_s.append(split[1])
    return result


def hf_padded(model_dir: Path, requests: RequestSet, *, threads: int, batch_size: int = 32, device: str = "cpu",
              dtype: str = "float32", max_length: int = 512, latency_repeats: int = 10,
              progress: Callable[[str], None] | None = None) -> InProcessResult:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..models.dtypes import torch_dtype

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch_dtype(dtype), attn_implementation="sdpa").to(device).eval()

    @torch.inference_mode()
    def score_pairs(pairs: list[tuple[str, str]]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            inputs = tokenizer([q for q, _ in batch], [d for _, d in batch], padding=True, truncation="only_second",
                               max_length=max_length, return_tensors="pt").to(device)
            scores.extend(model(**inputs).logits[:, 0].float().cpu().tolist())
        return scores

    def score_all(reqs: Sequence[Request]) -> list[float]:
        return score_pairs([(r.query, d) for r in reqs for d in r.documents])

    result = _measure("hf-padded", f"transformers {_version('transformers')} AutoModelForSequenceClassification, "
                      f"SDPA, padded batches of {batch_size}", requests, score_all,
                      lambda r: score_pairs([(r.query, d) for d in r.documents]), latency_repeats, device, progress)
    return result


def packed(model_dir: Path, requests: RequestSet, *, threads: int, max_batch_tokens: int = 16384,
           device: str = "cpu", dtype: str = "float32", attention_backend: str | None = None,
           quantize: str = "none", latency_repeats: int = 10,
           progress: Callable[[str], None] | None = None) -> InProcessResult:
    import numpy as np
    import torch

    from ..models.dtypes import torch_dtype
    from ..serving.scoring import PackedEngine, score_pairs
    from ..serving.tokenization import PairTokenizer

    torch.set_num_threads(threads)
    tokenizer = PairTokenizer(model_dir)
    engine = PackedEngine(str(model_dir), torch_dtype(dtype), torch.device(device), attention_backend or None,
                          quantize)

    def score_all(reqs: Sequence[Request]) -> np.ndarray:
        parts = [tokenizer.encode(r.query, list(r.documents)) for r in reqs]
        return score_pairs(engine, np.concatenate([p.input_ids for p in parts]),
                           np.concatenate([p.token_type_ids for p in parts]),
                           np.concatenate([p.lengths for p in parts]), max_batch_tokens)

    def score_one(r: Request) -> tuple[float, float]:
        started = time.perf_counter()
        p = tokenizer.encode(r.query, list(r.documents))
        tokenized = time.perf_counter()
        score_pairs(engine, p.input_ids, p.token_type_ids, p.lengths, max_batch_tokens)
        return tokenized - started, time.perf_counter() - tokenized

    backend = (f"PackedEngine ({attention_backend or ('triton' if device.startswith('cuda') else 'sdpa')} "
               f"attention), max_batch_tokens {max_batch_tokens}" + ("" if quantize == "none" else f", {quantize}"))
    result = _measure("packed", backend, requests, score_all, score_one, latency_repeats, device, progress)
    return result


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
