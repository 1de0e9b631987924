"""`triton-rerank bench-long-documents`: long documents scored whole, served against Hugging Face by hand.

Documents of 2k-20k tokens (DL19 passages concatenated, seeded) go to the `reranker` ensemble with
long_documents=chunk: the tokenizer step cuts each (query, document) pair into windows of the
model's max input, a new window every (window - chunk_overlap) document tokens, every window is
scored as its own pair, and a document's score is its best window's. The baseline does the same by
hand in this process, as a transformers user would:

    tokenizer(queries, documents, truncation="only_second", max_length=MAX_INPUT, stride=OVERLAP,
              return_overflowing_tokens=True, padding=True)
    AutoModelForSequenceClassification (SDPA), padded batches, torch.inference_mode
    the max over each document's windows (overflow_to_sample_mapping)

Contenders, on the same requests (text in, scores out, tokenization included), with the same torch
threads, run after run interleaved (the order flips every run) so that a shared machine's drift
hits both:
- hf-chunked (in-process): one request at a time, as above;
- triton-grpc: a real tritonserver (the ensemble, packed encoder) driven by the Python client
  (RerankClient over gRPC) at each concurrency level; the server idles while HF runs.
Both score the same windows (the check below), so documents/s and windows (pairs)/s give the same
ratio. Every served score must equal HF's within --tolerance, and every document's window and token
counts HF's exactly; the run fails (exit 1) otherwise.

Writes long_documents.csv (medians over runs), long_documents_runs.csv (each run) and
long_documents.md to --out, and prints the table. The committed results (4-9 minutes on 2 cores, by load):

    triton-rerank bench-long-documents --out results/cpu-long-documents
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..serving.tokenization import window_count
from . import report
from .workload import DL19_FILE, Request, load_dl19, resolve_data_dir, spread_indices, vocabulary_words

HF_CONTENDER = "hf-chunked"
SERVED_CONTENDER = "triton-grpc"
# The classification head's weight spread of the benchmark model (transformers' default init, 0.02,
# gives every window nearly the same logit, and a parity check of such scores proves little).
CLASSIFIER_STD = 0.5


# --------------------------------------------------------------------------------------------
# Workload: long documents made of passages
# --------------------------------------------------------------------------------------------


@dataclass
class PassagePool:
    """What documents are built from: queries, and passages with their token counts."""

    queries: list[str]
    # Per query, the passages that belong to it (its BM25 candidates), as indices into `passages`.
    own_passages: list[list[int]]
    passages: list[str]
    passage_tokens: list[int]
    source: str


@dataclass
class LongDocumentSet:
    """The requests every contender receives, and the token count of each document."""

    requests: list[Request]
    document_tokens: list[int]  # the document alone, no special tokens, in request order
    source: str

    @property
    def num_documents(self) -> int:
        return sum(len(r.documents) for r in self.requests)

    def documents(self) -> list[str]:
        return [d for r in self.requests for d in r.documents]


def dl19_pool(path: Path, count_tokens: Callable[[list[str]], list[int]]) -> PassagePool:
    """Every DL19 query with its BM25 candidates, and every candidate passage once."""
    queries, own, passages = [], [], []
    for record in load_dl19(path):
        start = len(passages)
        passages += [c["text"] for c in record["candidates"]]
        queries.append(record["query"])
        own.append(list(range(start, len(passages))))
    return PassagePool(queries, own, passages, count_tokens(passages), "DL19 passages")


def synthetic_pool(words: list[str], count_tokens: Callable[[list[str]], list[int]], seed: int = 0,
                   num_queries: int = 8, passages_per_query: int = 40) -> PassagePool:
    """Random vocabulary words as queries (6 words) and passages (40-120 words), when DL19 is absent."""
    rng = random.Random(seed)
    queries = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(num_queries)]
    passages = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
                for _ in range(num_queries * passages_per_query)]
    own = [list(range(q * passages_per_query, (q + 1) * passages_per_query)) for q in range(num_queries)]
    return PassagePool(queries, own, passages, count_tokens(passages), "synthetic passages")


def document_of(pool: PassagePool, first: int, target: int, rng: random.Random, tries: int = 64) -> tuple[str, int]:
    """Passages joined by spaces up to `target` tokens: `first`, then random ones of the pool.

    A passage that would overshoot is skipped for another (up to `tries` in a row), so the
    document ends just below its target (by less than one passage). Joined by a space, the tokens of a
    document are those of its passages for tokenizers that split at whitespace (BERT's, XLM-R's).
    """
    parts, total, misses = [first], pool.passage_tokens[first], 0
    while misses < tries:
        candidate = rng.randrange(len(pool.passages))
        if total + pool.passage_tokens[candidate] > target:
            misses += 1
            continue
        parts.append(candidate)
        total += pool.passage_tokens[candidate]
        misses = 0
    return " ".join(pool.passages[i] for i in parts), total


def build_documents(pool: PassagePool, num_requests: int, docs_per_request: int, min_tokens: int, max_tokens: int,
                    seed: int = 0) -> LongDocumentSet:
    """`num_requests` requests of one query (spread over the pool's queries) with `docs_per_request`
    documents each, every document of a target length drawn uniformly from [min_tokens, max_tokens].

    Document j of a request starts with the query's own j-th passage (its BM25 rank j for DL19), so
    each document holds something the query retrieved; the rest are random passages of the pool.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    rng = random.Random(seed)
    requests, tokens = [], []
    for q in spread_indices(len(pool.queries), num_requests) * math.ceil(num_requests / len(pool.queries)):
        if len(requests) == num_requests:
            break
        documents = []
        for j in range(docs_per_request):
            own = pool.own_passages[q]
            text, count = document_of(pool, own[j % len(own)], rng.randint(min_tokens, max_tokens), rng)
            documents.append(text)
            tokens.append(count)
        requests.append(Request(pool.queries[q], tuple(documents)))
    source = (f"{pool.source} concatenated into {min_tokens:,}-{max_tokens:,}-token documents (seed {seed}), "
              f"{num_requests} requests x {docs_per_request} documents")
    return LongDocumentSet(requests, tokens, source)


def most_windows(documents: LongDocumentSet, count_tokens: Callable[[list[str]], list[int]], pair_room: int,
                 overlap: int) -> int:
    """The most windows any document of the workload makes: its max_chunks_per_doc (the server's
    default, 64, would refuse a document of more; a request may ask for more)."""
    queries = [r.query for r in documents.requests]
    query_tokens = dict(zip(queries, count_tokens(queries), strict=True))
    tokens = iter(documents.document_tokens)
    return max(window_count(next(tokens), pair_room - query_tokens[r.query], overlap)
               for r in documents.requests for _ in r.documents)


def warm_up_request(documents: LongDocumentSet) -> Request:
    """The workload's shortest document with its query: a chunked request that costs the least."""
    pairs = [(r.query, d) for r in documents.requests for d in r.documents]
    query, document = pairs[int(np.argmin(documents.document_tokens))]
    return Request(query, (document,))


def distribution(values: Sequence[float]) -> dict[str, float]:
    """min, p10, p25, median, p75, p90, max and mean of `values`."""
    array = np.asarray(values, dtype=np.float64)
    out = {name: float(np.percentile(array, q)) for name, q in
           (("min", 0), ("p10", 10), ("p25", 25), ("median", 50), ("p75", 75), ("p90", 90), ("max", 100))}
    out["mean"] = float(array.mean())
    return out


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def build_model(out: Path, data_dir: Path | None, seed: int = 0) -> Path:
    """The serving benchmark's MiniLM-L6-shaped BERT (512-token window, bert-base-uncased tokenizer)
    with a wider classification head (`CLASSIFIER_STD`); reused while its sources are unchanged.

    Only the head's weight values differ from `build_bench_model`'s model: the same shape costs the
    same, and scores that differ between windows make the parity check mean something.
    """
    from .random_model import MARKER, MINILM_L6_CONFIG, build_random_model, model_sources, train_tokenizer

    sources = model_sources(data_dir)
    marker = {"name": f"ms-marco-MiniLM-L-6-v2-shape, classifier std {CLASSIFIER_STD}", "seed": seed, **sources}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    config = sources["config"] if Path(sources["config"]).is_file() else MINILM_L6_CONFIG
    tokenizer = sources["tokenizer"] if Path(sources["tokenizer"]).is_file() else train_tokenizer("bert", seed=seed)
    build_random_model(out, config, tokenizer, seed=seed, classifier_std=CLASSIFIER_STD,
                       tokenizer_class="BertTokenizer")
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def token_counter(model_dir: Path) -> Callable[[list[str]], list[int]]:
    """Tokens of each text alone (no special tokens) with the model's own tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def model_window(model_dir: Path) -> int:
    """The model's max input (tokens of one pair), as the server computes it."""
    from ..models.families import max_input_length

    return max_input_length(json.loads((model_dir / "config.json").read_text()))


# --------------------------------------------------------------------------------------------
# Measuring one pass over the workload
# --------------------------------------------------------------------------------------------


@dataclass
class Pass:
    """One contender's pass over every request: what it returned and how long it took."""

    contender: str
    concurrency: int  # requests in flight; 0 for the in-process baseline
    run: int
    seconds: float
    latencies_s: list[float]
    scores: np.ndarray  # per document, in request order
    chunk_counts: np.ndarray
    token_counts: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.scores)

    @property
    def windows(self) -> int:
        return int(self.chunk_counts.sum())

    @property
    def tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray
    chunk_counts: np.ndarray
    token_counts: np.ndarray


def timed_pass(contender: str, concurrency: int, run: int, requests: list[Request],
               score: Callable[[Request], Scored], on_request: Callable[[int], None]) -> Pass:
    """Scores every request, `concurrency` at a time (1 for 0: in-process), timing each and the whole."""

    def one(request: Request) -> tuple[Scored, float]:
        started = time.perf_counter()
        scored = score(request)
        elapsed = time.perf_counter() - started
        on_request(len(request.documents))
        return scored, elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="long-documents") as pool:
        results = list(pool.map(one, requests))
    seconds = time.perf_counter() - started
    return Pass(contender, concurrency, run, seconds, [t for _, t in results],
                *(np.concatenate([getattr(s, name) for s, _ in results])
                  for name in ("scores", "chunk_counts", "token_counts")))


class HfChunked:
    """The baseline: transformers alone, documents chunked by hand with the tokenizer's sliding window."""

    def __init__(self, model_dir: Path, *, threads: int, batch_size: int, overlap: int, max_length: int):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.batch_size, self.overlap, self.max_length = batch_size, overlap, max_length
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(pair=True)

    def backend(self) -> str:
        version = report.package_versions(("transformers",))["transformers"]
        return (f"transformers {version} AutoModelForSequenceClassification, SDPA, windows by "
                f"return_overflowing_tokens, padded batches of {self.batch_size}")

    def score(self, request: Request) -> Scored:
        torch = self.torch
        documents = list(request.documents)
        inputs = self.tokenizer([request.query] * len(documents), documents, truncation="only_second",
                                max_length=self.max_length, stride=self.overlap, return_overflowing_tokens=True,
                                padding=True, return_tensors="pt")
        owner = inputs.pop("overflow_to_sample_mapping").numpy()
        mask = inputs["attention_mask"]
        logits = []
        with torch.inference_mode():
            for start in range(0, len(owner), self.batch_size):
                rows = slice(start, start + self.batch_size)
                # Each batch padded to its own longest window, not the request's.
                width = int(mask[rows].sum(dim=1).max())
                batch = {name: tensor[rows, :width] for name, tensor in inputs.items()}
                logits.append(self.model(**batch).logits[:, 0].float())
        window_scores = torch.cat(logits).numpy()
        counts = np.bincount(owner, minlength=len(documents)).astype(np.int32)
        scores = np.full(len(documents), -np.inf, dtype=np.float32)
        np.maximum.at(scores, owner, window_scores)
        tokens = np.bincount(owner, weights=mask.sum(dim=1).numpy(), minlength=len(documents)).astype(np.int32)
        return Scored(scores, counts, tokens)


def served_scorer(client, overlap: int, max_chunks: int) -> Callable[[Request], Scored]:
    def score(request: Request) -> Scored:
        scored = client.score(request.query, list(request.documents), long_documents="chunk",
                              chunk_overlap=overlap, max_chunks_per_doc=max_chunks)
        return Scored(scored.scores.astype(np.float32), scored.chunk_counts.astype(np.int32),
                      scored.token_counts.astype(np.int32))

    return score


def tokenizer_limits(requests: list[Request]) -> dict[str, dict[str, str]]:
    """Tokenizer-step limits raised to fit the workload, where its defaults (1 MiB a string,
    8 MiB a request) would refuse it; empty when they fit."""
    from ..launcher.repository import TOKENIZER
    from ..serving.request_options import RequestLimits

    text = max(len(s.encode()) for r in requests for s in (r.query, *r.documents))
    request = max(len(r.query.encode()) + sum(len(d.encode()) for d in r.documents) for r in requests)
    limits = {}
    if text > RequestLimits.max_text_bytes:
        limits["max_text_bytes"] = str(text)
    if request > RequestLimits.max_request_bytes:
        limits["max_request_bytes"] = str(request)
    return {TOKENIZER: limits} if limits else {}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    contender: str
    kind: str  # in-process | server
    concurrency: int
    backend: str
    documents: int
    windows: int
    tokens: int
    seconds: float
    documents_per_s: float
    windows_per_s: float
    tokens_per_s: float
    p50_request_ms: float
    ratio_vs_hf: float | None = None  # windows/s over HF's in the same run (medians: the median of those)
    run: int = 0  # long_documents_runs.csv: which run; long_documents.csv: 0
    runs: int = 1
    each_run_ratio: str = ""  # long_documents.csv: the ratio within each run


def row_of(p: Pass, backend: str) -> Row:
    return Row(p.contender, "in-process" if p.concurrency == 0 else "server", p.concurrency, backend, p.documents,
               p.windows, p.tokens, p.seconds, p.documents / p.seconds, p.windows / p.seconds, p.tokens / p.seconds,
               1000 * statistics.median(p.latencies_s), run=p.run)


def with_ratios(rows: list[Row]) -> list[Row]:
    """Each row with its windows/s over the HF row of its own run."""
    hf = {r.run: r.windows_per_s for r in rows if r.contender == HF_CONTENDER}
    return [dataclasses.replace(r, ratio_vs_hf=r.windows_per_s / hf[r.run]) if r.run in hf else r for r in rows]


def medians(rows: list[Row]) -> list[Row]:
    """One row per (contender, concurrency): the median of each figure over the runs."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.contender, r.concurrency), []).append(r)
    out = []
    for group in groups.values():
        def med(name: str, group: list[Row] = group) -> float:
            return statistics.median(getattr(r, name) for r in group)

        ratios = [r.ratio_vs_hf for r in group if r.ratio_vs_hf is not None]
        first = group[0]
        out.append(Row(first.contender, first.kind, first.concurrency, first.backend, first.documents, first.windows,
                       first.tokens, med("seconds"), med("documents_per_s"), med("windows_per_s"),
                       med("tokens_per_s"), med("p50_request_ms"),
                       statistics.median(ratios) if ratios else None, run=0, runs=len(group),
                       each_run_ratio=", ".join(f"{v:.2f}" for v in ratios)))
    return out


@dataclass
class Parity:
    """The served scores against HF's on the same documents."""

    max_abs_diff: float
    tolerance: float
    counts_match: bool  # windows and tokens of every document, in every served pass
    score_range: tuple[float, float]
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.counts_match and self.max_abs_diff <= self.tolerance


def parity(passes: list[Pass], tolerance: float) -> Parity:
    """Every served pass against the first HF pass: max |score difference|, exact window and token counts."""
    reference = next(p for p in passes if p.contender == HF_CONTENDER)
    served = [p for p in passes if p.contender != HF_CONTENDER]
    worst, mismatches = 0.0, []
    for p in served:
        worst = max(worst, float(np.max(np.abs(p.scores.astype(np.float64) - reference.scores))))
        for name in ("chunk_counts", "token_counts"):
            bad = np.flatnonzero(getattr(p, name) != getattr(reference, name))
            if len(bad):
                i = int(bad[0])
                mismatches.append(f"run {p.run} c={p.concurrency}: {name} of document {i} is "
                                  f"{getattr(p, name)[i]}, HF {getattr(reference, name)[i]}")
    low, high = float(reference.scores.min()), float(reference.scores.max())
    return Parity(worst, tolerance, not mismatches, (low, high), mismatches)


CSV_CONTEXT = ("cpu", "cores", "torch_threads", "torch", "model", "workload", "commit", "date")


def write_csv(path: Path, rows: list[Row], context: dict[str, str]) -> Path:
    import csv
    import io

    names = [f.name for f in dataclasses.fields(Row)] + list(CSV_CONTEXT)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    for row in rows:
        values = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(row).items()}
        writer.writerow({**values, **{k: context[k] for k in CSV_CONTEXT}})
    return report.atomic_write(path, text.getvalue())


def results_table(rows: list[Row]) -> str:
    return report.markdown_table(
        ["contender", "concurrency", "runs", "documents/s", "windows (pairs)/s", "tokens/s", "p50 ms / request",
         "served / HF (median of runs)", "each run"],
        [[r.contender, "in-process" if r.kind == "in-process" else str(r.concurrency), str(r.runs),
          f"{r.documents_per_s:.3f}", f"{r.windows_per_s:.2f}", f"{r.tokens_per_s:,.0f}", f"{r.p50_request_ms:,.0f}",
          "-" if r.contender == HF_CONTENDER or r.ratio_vs_hf is None else f"{r.ratio_vs_hf:.2f}x",
          "-" if r.contender == HF_CONTENDER else r.each_run_ratio] for r in rows])


def workload_table(documents: LongDocumentSet, windows: Sequence[int]) -> str:
    tokens, per_doc = distribution(documents.document_tokens), distribution(windows)
    names = list(tokens)
    return report.markdown_table(["per document", *names],
                                 [["tokens", *(f"{tokens[n]:,.0f}" for n in names)],
                                  ["windows", *(f"{per_doc[n]:.1f}" if n == "mean" else f"{per_doc[n]:.0f}"
                                                for n in names)]])


def markdown(rows: list[Row], context: dict[str, str], documents: LongDocumentSet, windows: Sequence[int],
             check: Parity, notes: list[str]) -> str:
    verdict = "passed" if check.ok else "FAILED"
    parts = [
        "# Long documents, chunked: served ensemble vs Hugging Face by hand",
        "",
        f"- model: {context['model']}; float32 on cpu",
        f"- machine: {context['machine']}; CPU {context['cpu']}; {context['cores']} cores; torch {context['torch']}, "
        f"{context['torch_threads']} threads per contender",
        f"- commit {context['commit']} (when the run started), {context['date']}",
        f"- command: `{context['command']}`",
        f"- workload: {documents.source}; {documents.num_documents} documents, {sum(windows):,} windows "
        f"(pairs) of up to {context['window']} tokens, chunk_overlap {context['overlap']}",
        "",
        "## Throughput",
        "",
        "Medians over the runs. The ratio is served windows/s over HF's, computed within each run (contenders "
        "interleaved) and then the median; documents/s gives the same ratio (both score the same windows).",
        "",
        results_table(rows),
        "",
        "## Correctness",
        "",
        f"Served chunked scores vs HF's max over the same windows, every served pass: max abs difference "
        f"**{check.max_abs_diff:.2e}** (tolerance {check.tolerance:g}, fp32; HF scores span "
        f"{check.score_range[0]:.3f} .. {check.score_range[1]:.3f}); window and token counts of every document "
        f"{'equal' if check.counts_match else 'DIFFER'}: {verdict}.",
        *[f"- {m}" for m in check.mismatches[:10]],
        "",
        "## Workload",
        "",
        workload_table(documents, windows),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/bench-long-documents",
                   help="folder for long_documents.csv, long_documents_runs.csv and long_documents.md "
                   "(default: %(default)s)")
    p.add_argument("--work-dir", default="build/bench-long-documents-work", help="server run folder and logs")
    g = p.add_argument_group("model and workload")
    g.add_argument("--model-dir", default=None, help="a BERT/XLM-R cross-encoder directory; default: build the "
                   "serving benchmark's random-weight MiniLM-L6-shaped BERT (512-token window, bert-base-uncased "
                   f"tokenizer) with a classification head of std {CLASSIFIER_STD}, in "
                   "build/bench-model-minilm-l6-long")
    g.add_argument("--data-dir", default=None, help="the shared data folder; default ../shared/data if present")
    g.add_argument("--source", choices=["dl19", "synthetic"], default="dl19",
                   help="passages to build documents from: DL19's (synthetic words when the file is absent), "
                   "or random vocabulary words (default: %(default)s)")
    g.add_argument("--requests", type=int, default=4, help="requests of one query each (default: %(default)s)")
    g.add_argument("--docs-per-request", type=int, default=3, help="documents per request (default: %(default)s)")
    g.add_argument("--min-doc-tokens", type=int, default=2000, help="shortest document target (default: %(default)s)")
    g.add_argument("--max-doc-tokens", type=int, default=20000, help="longest document target (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the document lengths and passages")
    g.add_argument("--chunk-overlap", type=int, default=32, help="tokens neighbouring windows share "
                   "(default: %(default)s, the server's)")
    g = p.add_argument_group("measurement")
    g.add_argument("--concurrency", type=_levels, default=[1, 2],
                   help="requests in flight at once for the served passes, comma-separated (default: 1,2)")
    g.add_argument("--repeat", type=int, default=3, help="runs, interleaved; figures are medians (default: "
                   "%(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch threads of both contenders; default the cores "
                   "this process may use")
    g.add_argument("--hf-batch-size", type=int, default=16, help="windows per HF forward (default: %(default)s; "
                   "16 measured best on the 2-core CPU)")
    g.add_argument("--max-batch-tokens", type=int, default=4096, help="the server's packed-encoder token budget "
                   "per forward (default: %(default)s, the CPU default)")
    g.add_argument("--tolerance", type=float, default=1e-3, help="largest |served - HF| score accepted "
                   "(default: %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-long-documents",
        help="benchmark long documents scored chunked: the served ensemble vs HF transformers chunking by hand",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def load_documents(args, data_dir: Path | None, model_dir: Path, notes: list[str]) -> LongDocumentSet:
    count = token_counter(model_dir)
    if args.source == "dl19" and data_dir is not None and (data_dir / DL19_FILE).is_file():
        pool = dl19_pool(data_dir / DL19_FILE, count)
    else:
        if args.source == "dl19":
            notes.append(f"{DL19_FILE} not found: documents of random vocabulary words instead")
        pool = synthetic_pool(vocabulary_words(model_dir / "tokenizer.json"), count, args.seed)
    documents = build_documents(pool, args.requests, args.docs_per_request, args.min_doc_tokens,
                                args.max_doc_tokens, args.seed)
    # The tokens of each whole document, not the sum of its passages' (they agree for whitespace-splitting
    # tokenizers; this is what the windows are cut from).
    documents.document_tokens = count(documents.documents())
    return documents


def check_arguments(args) -> None:
    for name in ("requests", "docs_per_request", "repeat", "hf_batch_size", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.chunk_overlap < 0:
        raise SystemExit("--chunk-overlap must be >= 0")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..client.rerank_client import RerankClient
    from .perf_sweep import ServerSpec, TritonVariant, running_triton
    from .random_model import describe_model

    check_arguments(args)
    args.threads = args.threads or report.usable_cores()
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started, notes = time.monotonic(), []
    data_dir = resolve_data_dir(args.data_dir)
    model_dir = Path(args.model_dir) if args.model_dir else build_model(
        Path("build") / "bench-model-minilm-l6-long", data_dir)
    documents = load_documents(args, data_dir, model_dir, notes)
    window = model_window(model_dir)
    hf = HfChunked(model_dir, threads=args.threads, batch_size=args.hf_batch_size, overlap=args.chunk_overlap,
                   max_length=window)
    max_chunks = most_windows(documents, token_counter(model_dir), window - hf.special_tokens, args.chunk_overlap)
    spec = ServerSpec(model_dir, TritonVariant(queue_delay_us=0, instances=1, num_threads=args.threads),
                      max_batch_tokens=args.max_batch_tokens, extra=tokenizer_limits(documents.requests))
    served_backend = (f"tritonserver 2.51 ensemble (long_documents=chunk), packed encoder (sdpa), max_batch_tokens "
                      f"{args.max_batch_tokens}, 1 instance, queue delay 0; RerankClient over gRPC")
    # Taken before the server starts: the commit of the code it loads.
    context = run_context(args, describe_model(model_dir), documents, window)
    passes: list[Pass] = []
    total = documents.num_documents * args.repeat * (1 + len(args.concurrency))
    with tqdm(total=total, desc="long documents", unit="doc", dynamic_ncols=True, file=sys.stderr) as bar:
        bar.set_postfix_str("starting tritonserver", refresh=True)
        with running_triton(spec, work / "triton") as address, RerankClient(address.grpc_url, "grpc") as client:
            served = served_scorer(client, args.chunk_overlap, max_chunks)
            bar.set_postfix_str("warm-up", refresh=True)
            # The first calls of a fresh stub or model pay for lazy initialisation, allocators, thread pools;
            # two requests at once reach both instances of the tokenizer step.
            shortest = warm_up_request(documents)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(served, [shortest, shortest]))
            hf.score(shortest)
            for run_number in range(1, args.repeat + 1):
                passes += one_run(run_number, args.repeat, args.concurrency, documents.requests, hf.score, served,
                                  bar)
    notes += method_notes(args, started)
    return finish(args, out, passes, documents, hf.backend(), served_backend, context, notes)


def one_run(run_number: int, repeat: int, levels: list[int], requests: list[Request],
            hf_score: Callable[[Request], Scored], served: Callable[[Request], Scored], bar) -> list[Pass]:
    """HF and every served level once; odd runs start with HF, even ones end with it (drift hits both)."""
    steps = [(HF_CONTENDER, 0, hf_score)] + [(SERVED_CONTENDER, c, served) for c in levels]
    if run_number % 2 == 0:
        steps.reverse()
    passes = []
    for contender, concurrency, score in steps:
        where = "in-process" if concurrency == 0 else f"c={concurrency}"
        bar.set_postfix_str(f"run {run_number}/{repeat}: {contender} {where}", refresh=True)
        passes.append(timed_pass(contender, concurrency, run_number, requests, score, bar.update))
    return passes


def finish(args, out: Path, passes: list[Pass], documents: LongDocumentSet, hf_backend: str, served_backend: str,
           context: dict[str, str], notes: list[str]) -> int:
    """Correctness, rows, files, the printed table; 1 when the served scores disagree with HF's."""
    check = parity(passes, args.tolerance)
    backends = {HF_CONTENDER: hf_backend, SERVED_CONTENDER: served_backend}
    raw = with_ratios([row_of(p, backends[p.contender]) for p in passes])
    rows = sorted(medians(raw), key=lambda r: (r.contender != HF_CONTENDER, r.concurrency))
    windows = next(p for p in passes if p.contender == HF_CONTENDER).chunk_counts.tolist()
    write_csv(out / "long_documents.csv", rows, context)
    write_csv(out / "long_documents_runs.csv", raw, context)
    text = markdown(rows, context, documents, windows, check, notes)
    report.atomic_write(out / "long_documents.md", text)
    print(results_table(rows))
    print(f"\nmax |served - HF| score difference {check.max_abs_diff:.2e} (tolerance {args.tolerance:g}); "
          f"window and token counts {'equal' if check.counts_match else 'DIFFER'}; CPU {context['cpu']}, "
          f"{args.threads} torch threads, commit {context['commit']}")
    for mismatch in check.mismatches[:10]:
        print(f"  {mismatch}")
    print(f"wrote {out / 'long_documents.csv'}, {out / 'long_documents_runs.csv'}, {out / 'long_documents.md'}")
    return 0 if check.ok else 1


def run_context(args, model: str, documents: LongDocumentSet, window: int) -> dict[str, str]:
    ctx = report.run_context(("torch",))
    command = "triton-rerank bench-long-documents " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return {"machine": ctx.machine, "cpu": ctx.cpu, "cores": str(ctx.cores), "torch_threads": str(args.threads),
            "torch": ctx.versions.get("torch", "-"), "model": model, "workload": documents.source,
            "commit": ctx.commit, "date": ctx.date, "command": command, "window": str(window),
            "overlap": str(args.chunk_overlap)}


def method_notes(args, started: float) -> list[str]:
    return [
        f"{args.repeat} runs; in each, HF once and the server once per concurrency level ({', '.join(map(str, args.concurrency))}), "
        "one after another on the same requests; odd runs start with HF, even runs end with it; one tritonserver "
        "for the whole run, idle while HF runs",
        "served: RerankClient(grpc).score(query, documents, long_documents='chunk', chunk_overlap, "
        "max_chunks_per_doc), each request timed from the call to its answer; a pass's rates are its documents "
        "(windows, tokens) over the wall time of all its requests",
        f"HF: one request at a time: the tokenizer's sliding window (stride = chunk_overlap {args.chunk_overlap}), "
        f"forwards of {args.hf_batch_size} windows padded to the batch's longest, the max over each document's "
        "windows; tokenization included, as on the served side",
        "warm-up before measuring: the shortest document alone, twice at once to the server, once to HF",
        "the CPU is shared with other work: absolute numbers are noisy; the ratio, measured within each run, is "
        "the figure to read",
        f"whole run {time.monotonic() - started:.0f} s",
    ]
