"""`triton-rerank bench-decoder`: a decoder-LLM reranker (Qwen3-Reranker), served against its own recipe by hand.

The model is a random-weight Qwen3ForCausalLM of a real Qwen3-Reranker config (default the 0.6B one;
speed does not depend on the weight values) with the real Qwen3 tokenizer, both from the shared data
folder, built once in bfloat16 (as the releases ship) and reused. The workload is DL19: each query
with its first --docs-per-request BM25 candidates (a comma-separated list measures several request
sizes in one run, e.g. 20,100; --max-queries takes one value for all or one per size). Contenders,
on the same requests (text in, scores out, tokenization included), with the same torch threads, in
the same dtype, run after run interleaved (the order flips every run) so that a shared machine's
drift hits all of them:

- hf-recipe (in-process): the model card's recipe with transformers, one request at a time:

      tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
      model = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa")
      ids = prefix_tokens + tokenizer(instruction/query/document, truncation,
                                      max_length=max_length - len(prefix_tokens) - len(suffix_tokens)) + suffix_tokens
      tokenizer.pad(batch, padding=True); logits[:, -1, [no, yes]] -> log_softmax -> P(yes)

  in batches of --hf-batch-size documents, under torch.inference_mode;
- triton-shared: a real tritonserver as `triton-rerank serve --model-path DIR` renders it (the
  `reranker` ensemble: the prompt tokenizer step, then our packed causal decoder, which projects
  only the yes/no rows at each prompt's last token), with its default prefix sharing: each
  request's prompt head (system prompt, instruction, query: the longest common token prefix of its
  prompts, when at least min_shared_prefix tokens) computed once, each document's own tokens attending to it;
- triton-whole: the same server with `serve --no-prefix-sharing` (config.pbtxt prefix_sharing:
  false): every prompt computed whole.

Both servers are started before the first run and kept; one contender measures at a time, and the
CPU time the idle servers take meanwhile is measured and reported. The served passes are driven by
the Python client (RerankClient over gRPC) at each concurrency level.

The gain of shared heads, per request size: measured = shared / whole pairs/s within each run (the
median over runs), against what the token counts predict: whole tokens (every prompt's length) over
shared tokens (each request's head once plus every prompt's own tokens), the head found on the
tokenizer's ids exactly as the server finds it (serving/prefix_sharing.shared_prefix_length, below
the server's min_shared_prefix no head).

Parity: the served P(yes) = sigmoid(SCORES) (SCORES = logit(yes) - logit(no)) against HF's P(yes)
on the same documents, per variant, max |difference| and Spearman per request, every prompt's token
count against HF's, and shared against whole. In float32 the scores must agree within --tolerance
and the counts exactly, or the run fails (exit 1); in bfloat16 the score differences are reported,
not judged (shared and whole sum in different orders, so they differ slightly too).

Writes decoder.csv (medians over runs), decoder_runs.csv (each run), decoder_gain.csv (the gain of
shared heads) and decoder.md to --out, and prints the tables. The comparison the shared heads are
judged by, and the committed results (the 0.6B shape in bfloat16 on 2 cores: 3 queries x 20
documents and 1 query x 100, 2 runs of HF and of each served variant at concurrency 1 and 4 (1 only
where there is a single request); 12 minutes on a quiet machine):

    triton-rerank bench-decoder --docs-per-request 20,100 --max-queries 3,1 --out results/cpu-qwen3-reranker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..models.dtypes import DTYPE_NAMES, auto_dtype
from . import long_documents as ld
from . import report
from .workload import DL19_FILE, Request, RequestSet, dl19_requests, resolve_data_dir

if TYPE_CHECKING:
    from ..launcher.server import TritonServer
    from .perf_sweep import ServerSpec

HF_CONTENDER = "hf-recipe"
# The two served variants: `serve`'s default (each request's prompt head computed once) and
# `serve --no-prefix-sharing` (every prompt computed whole).
SHARED_CONTENDER = "triton-shared"
WHOLE_CONTENDER = "triton-whole"
VARIANTS = {"shared": SHARED_CONTENDER, "whole": WHOLE_CONTENDER}
CONTENDER_ORDER = (HF_CONTENDER, SHARED_CONTENDER, WHOLE_CONTENDER)
# long_documents' pass, row and parity helpers know their in-process reference by its name there;
# passes are labelled so while measuring and renamed in the rows reported.
_REFERENCE = ld.HF_CONTENDER
# The model card's max_length (what its recipe truncates prompts to); the model's window, when
# smaller, caps it.
RECIPE_MAX_LENGTH = 8192
SIZES = ("0.6B", "4B", "8B")
# The weights are built (and saved) in the dtype the releases ship; each contender casts on load.
BUILD_DTYPE = "bfloat16"
QUICK = {"max_queries": [2], "docs_per_request": [4], "repeat": 1, "concurrency": [1, 2]}
FULL = {"max_queries": [3], "docs_per_request": [20], "repeat": 2, "concurrency": [1, 4]}

# Qwen3-Reranker's prompt, written out as its model card has it (not imported from the serving code,
# so that the baseline checks it).
RECIPE_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                 "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                 "<|im_start|>user\n")
RECIPE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RECIPE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction: str | None, query: str, document: str) -> str:
    """The model card's `format_instruction`: the middle of the prompt."""
    if instruction is None:
        instruction = RECIPE_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def recipe_prompts(tokenizer, prefix_ids: list[int], suffix_ids: list[int], query: str, documents: Sequence[str],
                   max_length: int, instruction: str | None = None) -> list[list[int]]:
    """Token ids of each document's prompt, as the model card's `process_inputs` builds them before padding."""
    pairs = [format_instruction(instruction, query, document) for document in documents]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_ids) - len(suffix_ids))
    return [prefix_ids + list(ids) + suffix_ids for ids in inputs["input_ids"]]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """P(yes) of logit(yes) - logit(no), in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties sharing the mean of their ranks (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score lists; nan when either is constant or shorter than 2."""
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def config_file(choice: str, data_dir: Path | None) -> Path:
    """A Qwen3-Reranker config.json: one of SIZES (from the data folder), or a file given."""
    from .random_model import QWEN3_RERANKER_CONFIG_FILES

    if choice in QWEN3_RERANKER_CONFIG_FILES:
        if data_dir is None or not (data_dir / QWEN3_RERANKER_CONFIG_FILES[choice]).is_file():
            raise SystemExit(f"no {QWEN3_RERANKER_CONFIG_FILES[choice]} in the data folder ({data_dir or 'none found'}):"
                             " give --data-dir, or --config FILE")
        return data_dir / QWEN3_RERANKER_CONFIG_FILES[choice]
    if not Path(choice).is_file():
        raise SystemExit(f"--config {choice}: neither one of {', '.join(SIZES)} nor a file")
    return Path(choice)


def _reusable(out: Path, marker: dict) -> bool:
    from .random_model import MARKER

    return (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker


def build_model(out: Path, config: Path, data_dir: Path | None, seed: int = 0) -> Path:
    """A random-weight Qwen3-Reranker of `config` with the Qwen3 tokenizer, in BUILD_DTYPE; reused while
    its sources are unchanged (a marker file records them)."""
    from ..models.dtypes import torch_dtype
    from .random_model import MARKER, build_random_decoder, qwen3_tokenizer_file

    tokenizer = qwen3_tokenizer_file(data_dir)
    marker = {"name": f"{config.stem}-shape", "seed": seed, "config": str(config.resolve()),
              "tokenizer": str(tokenizer.resolve()), "dtype": BUILD_DTYPE}
    if _reusable(out, marker):
        return out
    build_random_decoder(out, config, tokenizer, seed, torch_dtype(BUILD_DTYPE))
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def build_tiny_model(out: Path, data_dir: Path | None, seed: int = 0) -> Path:
    """`make_test_decoder`'s tiny Qwen3 reranker (2 layers, hidden 64, the real tokenizer); reused."""
    from .random_model import MARKER, make_test_decoder, qwen3_tokenizer_file

    marker = {"name": "tiny-qwen3-reranker", "seed": seed, "tokenizer": str(qwen3_tokenizer_file(data_dir).resolve())}
    if _reusable(out, marker):
        return out
    make_test_decoder(out, seed=seed, data_dir=data_dir)
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


# --------------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------------


class HfRecipe:
    """The baseline: Qwen3-Reranker's model card recipe with transformers alone."""

    def __init__(self, model_dir: Path, *, threads: int, batch_size: int, dtype: str, max_length: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from ..models.dtypes import torch_dtype

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype),
                                                          attn_implementation="sdpa").eval()
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.prefix_ids = self.tokenizer.encode(RECIPE_PREFIX, add_special_tokens=False)
        self.suffix_ids = self.tokenizer.encode(RECIPE_SUFFIX, add_special_tokens=False)
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype

    def backend(self) -> str:
        version = report.package_versions(("transformers",))["transformers"]
        return (f"transformers {version} AutoModelForCausalLM (SDPA, {self.dtype}), the model card's recipe: "
                f"left-padded batches of {self.batch_size}, P(yes) from the last token's (no, yes) logits")

    def prompts(self, request: Request) -> list[list[int]]:
        """Token ids of every prompt of `request`, as the recipe builds them (and the server's tokenizer step)."""
        return recipe_prompts(self.tokenizer, self.prefix_ids, self.suffix_ids, request.query, request.documents,
                              self.max_length)

    def score(self, request: Request) -> ld.Scored:
        torch = self.torch
        documents = list(request.documents)
        scores, lengths = [], []
        with torch.inference_mode():
            for start in range(0, len(documents), self.batch_size):
                ids = recipe_prompts(self.tokenizer, self.prefix_ids, self.suffix_ids, request.query,
                                     documents[start:start + self.batch_size], self.max_length)
                # (The recipe also passes max_length here, which padding=True ignores.)
                inputs = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
                logits = self.model(**inputs).logits[:, -1, :]
                # The two logits in float32 before the softmax: P(yes) not rounded to bfloat16 (costs nothing).
                pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1).float()
                scores.append(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().double())
                lengths.append(inputs["attention_mask"].sum(dim=1))
        return ld.Scored(torch.cat(scores).numpy(), np.ones(len(documents), dtype=np.int32),
                         torch.cat(lengths).numpy().astype(np.int32))


def served_scorer(client) -> Callable[[Request], ld.Scored]:
    """A request through the ensemble: P(yes) = sigmoid(SCORES) and the prompts' token counts."""

    def score(request: Request) -> ld.Scored:
        scored = client.score(request.query, list(request.documents))
        return ld.Scored(sigmoid(scored.scores), scored.chunk_counts.astype(np.int32),
                         scored.token_counts.astype(np.int32))

    return score


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(session id, CPU seconds used: user + system) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = text[text.rindex(")") + 2:].split()  # from field 3 (state) on
    return int(fields_[3]), (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU seconds of one tritonserver and every process of its session (its Python backend stubs: each server
    runs in a session of its own, led by its pid), from /proc; `seconds` is None where that cannot be read."""

    def __init__(self, pid: int | None):
        # (Not this process's own session: then the server's CPU could not be told apart from it.)
        readable = pid is not None and _proc_stat(str(pid)) is not None
        self.session = pid if readable and pid != os.getsid(0) else None
        self.idle_cpu_s = 0.0  # while other contenders measured
        self.idle_wall_s = 0.0

    def seconds(self) -> float | None:
        if self.session is None:
            return None
        total = 0.0
        for entry in Path("/proc").glob("[0-9]*"):
            stat = _proc_stat(entry.name)
            if stat is not None and stat[0] == self.session:
                total += stat[1]
        return total

    def add_idle(self, before: float | None, wall_s: float) -> None:
        after = self.seconds()
        if before is not None and after is not None:
            self.idle_cpu_s += max(0.0, after - before)
            self.idle_wall_s += wall_s


# --------------------------------------------------------------------------------------------
# Token counts: the gain that shared heads predict
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTokens:
    """The tokens of a set of requests' prompts, whole and with each request's head computed once.

    whole: every prompt's length, summed; shared: each request's head once plus every prompt's own
    tokens (what follows the head); head: the head tokens inside all prompts (each request's head
    times its prompts); heads: each request's head length (0 where the prompts share fewer than the
    server's min_shared_prefix tokens: computed whole); planned: the tokens the server's micro-batch
    plan computes for each request alone at max_batch_tokens (a request's head once per micro-batch
    holding any of its prompts), None when not planned.
    """

    requests: int
    prompts: int
    whole: int
    shared: int
    head: int
    heads: tuple[int, ...]
    planned: int | None = None
    max_batch_tokens: int | None = None

    @property
    def predicted_gain(self) -> float:
        return self.whole / self.shared

    @property
    def prefix_share(self) -> float:
        return self.head / self.whole

    @property
    def planned_gain(self) -> float | None:
        return None if self.planned is None else self.whole / self.planned


@contextmanager
def running_servers(specs: dict[str, ServerSpec], work: Path, ready_timeout: float = 300.0) -> Iterator[dict[str, TritonServer]]:
    """perf_sweep.running_triton for several servers: {name: TritonServer} on free loopback ports, run folder
    work/name, started together (they load at once) and stopped together (with their stubs) on exit."""
    from ..launcher.server import ServerAddress, TritonServer, free_ports
    from .perf_sweep import render_repository

    ports = iter(free_ports(3 * len(specs)))  # at once: none handed out twice
    servers: dict[str, TritonServer] = {}
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the servers' environment, as running_triton sets it
        try:
            for name, spec in specs.items():
                run_dir = work / name
                run_dir.mkdir(parents=True, exist_ok=True)
                repository = render_repository(spec, run_dir / "model_repository")
                address = ServerAddress("127.0.0.1", next(ports), next(ports), next(ports))
                servers[name] = TritonServer(repository, run_dir, address, extra_args=["--exit-timeout-secs=5"])
                servers[name].start()
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        for server in servers.values():
            server.wait_ready(ready_timeout)
        yield servers
    finally:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(lambda server: server.stop(), servers.values()))


def prompt_tokens(prompts: Sequence[Sequence[Sequence[int]]], min_shared_prefix: int | None = None,
                  max_batch_tokens: int | None = None) -> PromptTokens:
    """The token counts of requests given as their prompts' token ids (one list of prompts per request).

    Each request's head is found as the server finds it: serving/prefix_sharing.shared_prefix_length on
    the packed ids (the longest common prefix, at most the shortest prompt less one token), taken only
    when at least min_shared_prefix (default the server's) tokens long. With max_batch_tokens, also the
    tokens of the server's plan (`plan_shared_micro_batches`) for each request alone.
    """
    from ..serving.prefix_sharing import (
        DEFAULT_MIN_SHARED_PREFIX,
        SharingPairs,
        plan_shared_micro_batches,
        shared_prefix_length,
    )

    threshold = max(DEFAULT_MIN_SHARED_PREFIX if min_shared_prefix is None else min_shared_prefix, 1)
    whole = shared = head_tokens = planned = 0
    heads = []
    for request in prompts:
        lengths = np.array([len(p) for p in request], dtype=np.int64)
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in request]) if len(request) else np.zeros(0, np.int64)
        head = shared_prefix_length(ids, lengths)
        head = head if head >= threshold else 0
        heads.append(head)
        total = int(lengths.sum())
        whole += total
        shared += total - head * (len(lengths) - 1)
        head_tokens += head * len(lengths)
        if max_batch_tokens is not None:
            if head:
                pairs = SharingPairs.split([(ids, lengths, head)])
                for batch in plan_shared_micro_batches(pairs.own_lengths, pairs.group, np.array([head]),
                                                       max_batch_tokens):
                    planned += int(pairs.own_lengths[batch].sum()) + head
            else:
                planned += total
    return PromptTokens(len(prompts), sum(len(r) for r in prompts), whole, shared, head_tokens, tuple(heads),
                        planned if max_batch_tokens is not None else None, max_batch_tokens)


# --------------------------------------------------------------------------------------------
# Workloads and runs
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One request size: its requests, the concurrency levels measured on them, their token counts."""

    docs_per_request: int
    requests: RequestSet
    levels: list[int]
    skipped: list[int] = field(default_factory=list)  # levels that would repeat a smaller one
    tokens: PromptTokens | None = None


def levels_for(levels: Sequence[int], num_requests: int) -> tuple[list[int], list[int]]:
    """(measured, skipped): a level above the request count puts them all in flight, as the request count
    does; of the levels alike in that, the first is measured and the others skipped."""
    measured, skipped, seen = [], [], set()
    for level in levels:
        effective = min(level, num_requests)
        (skipped if effective in seen else measured).append(level)
        seen.add(effective)
    return measured, skipped


def one_run(run_number: int, repeat: int, workload: Workload, hf_score: Callable[[Request], ld.Scored],
            served: dict[str, Callable[[Request], ld.Scored]], bar, meters: dict[str, ServerCpu]) -> list[ld.Pass]:
    """HF once, then each level's served variants side by side; even runs in the reverse order (drift hits
    all of them). One contender measures at a time; the idle servers' CPU time is added to their meters."""
    steps = [(_REFERENCE, 0, hf_score)]
    for level in workload.levels:
        steps += [(name, level, score) for name, score in served.items()]
    if run_number % 2 == 0:
        steps.reverse()
    passes = []
    for contender, concurrency, score in steps:
        where = "in-process" if concurrency == 0 else f"c={concurrency}"
        name = HF_CONTENDER if contender == _REFERENCE else contender
        bar.set_postfix_str(f"run {run_number}/{repeat}, {workload.docs_per_request} docs: {name} {where}",
                            refresh=True)
        before = {n: m.seconds() for n, m in meters.items() if n != contender}
        p = ld.timed_pass(contender, concurrency, run_number, workload.requests.requests, score, bar.update)
        for n, start in before.items():
            meters[n].add_idle(start, p.seconds)
        passes.append(p)
    return passes


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@dataclass
class RequestParity:
    """One request's served P(yes) against HF's (each variant, over its passes) and shared against whole."""

    query: str
    documents: int
    vs_hf: dict[str, float]  # served contender -> max |served - HF| over its passes
    shared_vs_whole: float  # max |shared - whole| over passes of the same run and level; nan unless both ran
    spearman_min: float  # the lowest over the served passes, against HF
    hf_range: tuple[float, float]

    @property
    def max_abs_diff(self) -> float:
        return max(self.vs_hf.values())


def _nanmax(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


@dataclass
class DecoderParity:
    scores: ld.Parity  # every served pass against HF: the largest difference, the token counts
    requests: list[RequestParity]
    judged: bool  # float32: the tolerance applies; otherwise reported only
    docs_per_request: int = 0

    def vs_hf(self, contender: str) -> float:
        return _nanmax(r.vs_hf.get(contender, math.nan) for r in self.requests)

    @property
    def shared_vs_whole(self) -> float:
        return _nanmax(r.shared_vs_whole for r in self.requests)

    @property
    def scores_ok(self) -> bool:
        return self.scores.ok and not self.shared_vs_whole > self.scores.tolerance

    @property
    def ok(self) -> bool:
        return self.scores.counts_match and (self.scores_ok or not self.judged)

    @property
    def verdict(self) -> str:
        if not self.scores.counts_match:
            return "FAILED (prompt token counts differ)"
        if not self.judged:
            return "reported (scores are judged in float32 only)"
        return "passed" if self.scores_ok else "FAILED"

    def spearman(self) -> tuple[float, float]:
        """(min, median) of the per-request Spearman correlations."""
        values = [r.spearman_min for r in self.requests if not math.isnan(r.spearman_min)]
        return (min(values), statistics.median(values)) if values else (math.nan, math.nan)


def parity(passes: list[ld.Pass], requests: list[Request], tolerance: float, judged: bool,
           docs_per_request: int = 0) -> DecoderParity:
    """The served passes of one workload against its first HF pass, and shared against whole."""
    reference = next(p for p in passes if p.contender == _REFERENCE)
    served = [p for p in passes if p.contender != _REFERENCE]
    contenders = [c for c in CONTENDER_ORDER if any(p.contender == c for p in served)]
    whole = {(p.run, p.concurrency): p for p in served if p.contender == WHOLE_CONTENDER}
    side_by_side = [(p, whole[(p.run, p.concurrency)]) for p in served
                    if p.contender == SHARED_CONTENDER and (p.run, p.concurrency) in whole]
    per_request, start = [], 0
    for request in requests:
        rows = slice(start, start + len(request.documents))
        start = rows.stop
        hf = reference.scores[rows]
        per_request.append(RequestParity(
            request.query, len(request.documents),
            {c: max(float(np.max(np.abs(p.scores[rows] - hf))) for p in served if p.contender == c)
             for c in contenders},
            _nanmax(float(np.max(np.abs(s.scores[rows] - w.scores[rows]))) for s, w in side_by_side),
            min(spearman(p.scores[rows], hf) for p in served), (float(hf.min()), float(hf.max()))))
    return DecoderParity(ld.parity(passes, tolerance), per_request, judged, docs_per_request)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def rows_of(passes: list[ld.Pass], backends: dict[str, str]) -> tuple[list[ld.Row], list[ld.Row]]:
    """(medians, each run) of one workload as long_documents' rows, HF first, then the served variants, with
    this benchmark's contender names."""

    def named(r: ld.Row) -> ld.Row:
        return dataclasses.replace(r, contender=HF_CONTENDER) if r.contender == _REFERENCE else r

    raw = ld.with_ratios([ld.row_of(p, backends[p.contender]) for p in passes])
    rows = sorted((named(r) for r in ld.medians(raw)), key=lambda r: (CONTENDER_ORDER.index(r.contender),
                                                                      r.concurrency))
    return rows, [named(r) for r in raw]


@dataclass(frozen=True)
class GainRow:
    """The shared heads' gain at one request size and concurrency: triton-shared over triton-whole."""

    docs_per_request: int
    concurrency: int
    shared_pairs_per_s: float  # medians over the runs
    whole_pairs_per_s: float
    each_run: tuple[float, ...]  # shared / whole pairs/s within each run
    tokens: PromptTokens

    @property
    def runs(self) -> int:
        return len(self.each_run)

    @property
    def measured(self) -> float:
        return statistics.median(self.each_run)

    @property
    def predicted(self) -> float:
        return self.tokens.predicted_gain

    @property
    def of_factor(self) -> float:
        """measured / predicted: the speed-up factor realised."""
        return self.measured / self.predicted

    @property
    def of_saving(self) -> float:
        """(measured - 1) / (predicted - 1): the share of the predicted saving (the gain above 1x) realised."""
        return (self.measured - 1) / (self.predicted - 1) if self.predicted != 1 else math.nan


def gain_rows(raw: list[ld.Row], docs_per_request: int, tokens: PromptTokens) -> list[GainRow]:
    """One GainRow per concurrency level at which both served variants ran, from the rows of each run."""
    by = {(r.contender, r.concurrency, r.run): r for r in raw}
    out = []
    for level in sorted({r.concurrency for r in raw if r.contender == SHARED_CONTENDER}):
        runs = sorted(run for (c, lv, run) in by if c == SHARED_CONTENDER and lv == level
                      and (WHOLE_CONTENDER, level, run) in by)
        if not runs:
            continue
        shared = [by[(SHARED_CONTENDER, level, run)].windows_per_s for run in runs]
        whole = [by[(WHOLE_CONTENDER, level, run)].windows_per_s for run in runs]
        out.append(GainRow(docs_per_request, level, statistics.median(shared), statistics.median(whole),
                           tuple(s / w for s, w in zip(shared, whole, strict=True)), tokens))
    return out


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}x"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def results_table(sized: Sequence[tuple[int, Sequence[ld.Row]]]) -> str:
    """The throughput rows of each request size (docs per request, its rows)."""
    return report.markdown_table(
        ["docs / request", "contender", "concurrency", "runs", "pairs/s", "tokens/s", "p50 ms / request",
         "/ HF (median of runs)", "each run"],
        [[str(docs), r.contender, "in-process" if r.kind == "in-process" else str(r.concurrency), str(r.runs),
          f"{r.windows_per_s:.2f}", f"{r.tokens_per_s:,.0f}", f"{r.p50_request_ms:,.0f}",
          "-" if r.contender == HF_CONTENDER or r.ratio_vs_hf is None else f"{r.ratio_vs_hf:.2f}x",
          "-" if r.contender == HF_CONTENDER else r.each_run_ratio] for docs, rows in sized for r in rows])


def gain_table(gains: Sequence[GainRow]) -> str:
    return report.markdown_table(
        ["docs / request", "concurrency", "runs", f"{SHARED_CONTENDER} pairs/s", f"{WHOLE_CONTENDER} pairs/s",
         "measured gain (median of runs)", "each run", "predicted gain (tokens)", "measured / predicted",
         "(measured - 1) / (predicted - 1)"],
        [[str(g.docs_per_request), str(g.concurrency), str(g.runs), f"{g.shared_pairs_per_s:.2f}",
          f"{g.whole_pairs_per_s:.2f}", f"**{_x(g.measured)}**", ", ".join(f"{v:.2f}" for v in g.each_run),
          _x(g.predicted), _pct(g.of_factor), _pct(g.of_saving)] for g in gains])


def tokens_table(workloads: Sequence[Workload]) -> str:
    def heads(t: PromptTokens) -> str:
        return ", ".join(map(str, t.heads)) if len(t.heads) <= 6 else f"{min(t.heads)} .. {max(t.heads)}"

    return report.markdown_table(
        ["docs / request", "requests", "prompts", "whole tokens", "shared tokens", "head per request",
         "head share of all tokens", "predicted gain", "server's plan: tokens", "plan's gain"],
        [[str(w.docs_per_request), str(t.requests), str(t.prompts), f"{t.whole:,}", f"{t.shared:,}", heads(t),
          _pct(t.prefix_share), _x(t.predicted_gain, 3), "-" if t.planned is None else f"{t.planned:,}",
          _x(t.planned_gain, 3)] for w in workloads if (t := w.tokens) is not None])


def parity_table(checks: Sequence[DecoderParity]) -> str:
    contenders = [c for c in (SHARED_CONTENDER, WHOLE_CONTENDER) if any(c in r.vs_hf for k in checks
                                                                        for r in k.requests)]
    both = len(contenders) == 2
    return report.markdown_table(
        ["docs / request", "request", "query", *(f"max abs diff {c} vs HF" for c in contenders),
         *([f"{SHARED_CONTENDER} vs {WHOLE_CONTENDER}"] if both else []), "Spearman vs HF (lowest pass)",
         "HF P(yes) range"],
        [[str(k.docs_per_request), str(i), r.query[:60],
          *(f"{r.vs_hf[c]:.2e}" if c in r.vs_hf else "-" for c in contenders),
          *([f"{r.shared_vs_whole:.2e}"] if both else []), f"{r.spearman_min:.4f}",
          f"{r.hf_range[0]:.4f} .. {r.hf_range[1]:.4f}"] for k in checks for i, r in enumerate(k.requests, 1)])


def parity_line(check: DecoderParity) -> str:
    low, median = check.spearman()
    tolerance = f"tolerance {check.scores.tolerance:g}" if check.judged else "no tolerance outside float32"
    variants = [c for c in (SHARED_CONTENDER, WHOLE_CONTENDER) if not math.isnan(check.vs_hf(c))]
    diffs = ", ".join(f"{c} vs HF **{check.vs_hf(c):.2e}**" for c in variants)
    if not math.isnan(check.shared_vs_whole):
        diffs += f", {SHARED_CONTENDER} vs {WHOLE_CONTENDER} **{check.shared_vs_whole:.2e}**"
    return (f"{check.docs_per_request} documents per request: max |d| P(yes): {diffs} ({tolerance}); Spearman "
            f"per request vs HF: lowest {low:.4f}, median {median:.4f}; prompt token counts "
            f"{'equal' if check.scores.counts_match else 'DIFFER'}: {check.verdict}")


def target_line(gains: Sequence[GainRow], fraction: float = 0.85) -> str:
    """What a target of `fraction` of the predicted gain asks of each size, by either reading."""
    sizes = {g.docs_per_request: g.predicted for g in gains}
    return "; ".join(f"at {docs} documents per request, predicted {_x(p)}: a measured gain of at least "
                     f"{_x(fraction * p)} by the first reading, {_x(1 + fraction * (p - 1))} by the second"
                     for docs, p in sizes.items())


def markdown(sized: Sequence[tuple[int, Sequence[ld.Row]]], gains: Sequence[GainRow], workloads: Sequence[Workload],
             context: dict[str, str], checks: Sequence[DecoderParity], backends: dict[str, str],
             notes: list[str]) -> str:
    from ..serving.prefix_sharing import DEFAULT_MIN_SHARED_PREFIX

    parts = [
        "# Decoder reranker (Qwen3-Reranker): served with and without shared prompt heads, against the Hugging "
        "Face recipe",
        "",
        f"- model: {context['model_name']}; {context['dtype']} on cpu ({context['dtype_why']})",
        f"- machine: {context['machine']}; CPU {context['cpu']}; {context['cores']} cores; torch {context['torch']}, "
        f"transformers {context['transformers']}, {context['torch_threads']} torch threads per contender",
        f"- commit {context['commit']} (when the run started), {context['date']}",
        f"- command: `{context['command']}`",
        *(f"- workload: {w.requests.source}; {context[f'pairs_{w.docs_per_request}']} (query, document) pairs, "
          f"{context[f'tokens_per_pair_{w.docs_per_request}']} tokens per pair (the whole prompt; min "
          f"{context[f'min_tokens_{w.docs_per_request}']}, max {context[f'max_tokens_{w.docs_per_request}']})"
          for w in workloads),
        "",
        "Contenders, one measuring at a time, on the same requests:",
        "",
        *(f"- **{name}**: {backends[key]}" for name, key in
          ((HF_CONTENDER, _REFERENCE), (SHARED_CONTENDER, SHARED_CONTENDER), (WHOLE_CONTENDER, WHOLE_CONTENDER))
          if key in backends),
    ]
    if gains:
        parts += [
            "",
            "## Shared prompt heads: measured against predicted gain",
            "",
            f"Measured gain: {SHARED_CONTENDER} pairs/s over {WHOLE_CONTENDER} pairs/s, within each run (the two "
            "passes side by side), then the median over runs. Predicted gain: whole tokens (every prompt's "
            "length, summed) over shared tokens (each request's head once, plus every prompt's own tokens), the "
            "head found on the tokenizer's ids as the server finds it (the longest common token prefix of a "
            f"request's prompts, at most the shortest less one; below {DEFAULT_MIN_SHARED_PREFIX} tokens none). A fraction of the predicted "
            "gain has two readings, both given: measured / predicted (of the speed-up factor) and "
            "(measured - 1) / (predicted - 1) (of the saving, the gain above 1x). A target such as \"within 85% "
            f"of the predicted gain\" does not say which: {target_line(gains)}.",
            "",
            gain_table(gains),
            "",
            "The token counts (the server's plan: its micro-batches at the run's max_batch_tokens for each "
            "request alone, a request's head computed once in each micro-batch that holds any of its prompts; "
            "its gain is whole tokens over the plan's):",
            "",
            tokens_table(workloads),
        ]
    parts += [
        "",
        "## Throughput",
        "",
        "Medians over the runs. The ratio is pairs/s over HF's, computed within each run (contenders interleaved) "
        "and then the median.",
        "",
        results_table(sized),
        "",
        "## Parity",
        "",
        "Served P(yes) = sigmoid(SCORES) against HF's P(yes) on the same documents, every served pass; "
        f"{SHARED_CONTENDER} against {WHOLE_CONTENDER} pass by pass (same run and concurrency; in bfloat16 the two "
        "sum in different orders, so they differ slightly):",
        "",
        *(f"- {parity_line(check)}" for check in checks),
        *(f"- {m}" for check in checks for m in check.scores.mismatches[:10]),
        "",
        parity_table(checks),
    ]
    return "\n".join([*parts, "", "## Notes", "", *(f"- {n}" for n in notes)]) + "\n"


def write_rows_csv(path: Path, sized: Sequence[tuple[int, Sequence[ld.Row]]], context: dict[str, str],
                   sources: dict[int, str]) -> Path:
    import csv
    import io

    names = ["docs_per_request", *(f.name for f in dataclasses.fields(ld.Row)), *ld.CSV_CONTEXT]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    for docs, rows in sized:
        for row in rows:
            values = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(row).items()}
            writer.writerow({"docs_per_request": docs, **values, **{k: context[k] for k in ld.CSV_CONTEXT},
                             "workload": sources[docs]})
    return report.atomic_write(path, text.getvalue())


def write_gain_csv(path: Path, gains: Sequence[GainRow], context: dict[str, str], sources: dict[int, str]) -> Path:
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["docs_per_request", "concurrency", "runs", "shared_pairs_per_s", "whole_pairs_per_s",
                     "measured_gain", "each_run", "predicted_gain", "measured_over_predicted",
                     "measured_saving_over_predicted", "requests", "prompts", "whole_tokens", "shared_tokens",
                     "head_tokens", "prefix_share", "heads", "planned_tokens", "planned_gain", "max_batch_tokens",
                     *ld.CSV_CONTEXT])
    for g in gains:
        t = g.tokens
        writer.writerow([g.docs_per_request, g.concurrency, g.runs, round(g.shared_pairs_per_s, 4),
                         round(g.whole_pairs_per_s, 4), round(g.measured, 4), " ".join(f"{v:.4f}" for v in g.each_run),
                         round(g.predicted, 4), round(g.of_factor, 4), round(g.of_saving, 4), t.requests, t.prompts,
                         t.whole, t.shared, t.head, round(t.prefix_share, 4), " ".join(map(str, t.heads)),
                         "" if t.planned is None else t.planned,
                         "" if t.planned_gain is None else round(t.planned_gain, 4), t.max_batch_tokens or "",
                         *({**context, "workload": sources[g.docs_per_request]}[k] for k in ld.CSV_CONTEXT)])
    return report.atomic_write(path, text.getvalue())


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _variants(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in VARIANTS for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected {' and/or '.join(VARIANTS)}, comma-separated, got {text!r}")
    return [v for v in VARIANTS if v in values]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/bench-decoder", help="folder for decoder.csv, decoder_runs.csv, "
                   "decoder_gain.csv and decoder.md (default: %(default)s)")
    p.add_argument("--work-dir", default="build/bench-decoder-work", help="server run folders and logs")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute: the tiny Qwen3 decoder "
                   f"(unless --model-dir), {', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given")
    g = p.add_argument_group("model and workload")
    g.add_argument("--config", default="0.6B", help=f"the shape: {', '.join(SIZES)} (Qwen3-Reranker-SIZE.json of "
                   "the data folder) or a config.json file (default: %(default)s); built with random weights and "
                   "the Qwen3 tokenizer in build/bench-model-<name>, reused while unchanged")
    g.add_argument("--model-dir", default=None, help="an existing Qwen3ForCausalLM reranker directory instead")
    g.add_argument("--data-dir", default=None, help="the shared data folder; default ../shared/data if present")
    g.add_argument("--max-queries", type=ld._levels, default=None,
                   help="DL19 queries, one request each: one value for every --docs-per-request, or one per "
                   f"size, comma-separated (default {FULL['max_queries'][0]})")
    g.add_argument("--docs-per-request", type=ld._levels, default=None,
                   help=f"each query's first BM25 candidates (default {FULL['docs_per_request'][0]}; 100 is DL19's "
                   "all); several sizes, comma-separated (e.g. 20,100), are measured in one run, run after run "
                   "interleaved")
    g.add_argument("--max-length", type=int, default=RECIPE_MAX_LENGTH, help="most tokens of one prompt, for "
                   "all contenders (default: %(default)s, the model card's; the model's window caps it)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="every contender's dtype; auto: what the server picks on this CPU (bfloat16 with AMX or "
                   "AVX512-BF16, else float32)")
    g.add_argument("--concurrency", type=ld._levels, default=None,
                   help="requests in flight at once for the served passes, comma-separated (default: "
                   f"{','.join(map(str, FULL['concurrency']))}); a level above a size's request count is measured "
                   "once (the first such level), as they would all repeat it")
    g.add_argument("--repeat", type=int, default=None, help="runs, interleaved; figures are medians "
                   f"(default: {FULL['repeat']})")
    g.add_argument("--threads", type=int, default=None, help="torch threads of every contender; default the cores "
                   "this process may use")
    g.add_argument("--hf-batch-size", type=int, default=8, help="documents per HF forward (default: %(default)s)")
    g.add_argument("--max-batch-tokens", type=int, default=4096, help="the servers' packed-decoder token budget "
                   "per forward (default: %(default)s, the CPU default)")
    g.add_argument("--served", type=_variants, default=None,
                   help="the served variants: shared (`serve`'s default: each request's prompt head computed "
                   "once) and/or whole (`serve --no-prefix-sharing`: every prompt computed whole), comma-separated; "
                   "default both, a tritonserver each")
    g.add_argument("--no-prefix-sharing", action="store_true", help="only the whole variant (--served whole)")
    g.add_argument("--tolerance", type=float, default=1e-4, help="largest |served - HF| and |shared - whole| "
                   "P(yes) accepted in float32 (default: %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-decoder",
        help="benchmark a decoder reranker (Qwen3-Reranker): the served ensemble, with and without shared "
        "prompt heads, vs the HF transformers recipe",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def settle_arguments(args) -> None:
    """Fills the workload and measurement defaults (--quick's or the full run's) and checks them."""
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("repeat", "hf_batch_size", "max_batch_tokens", "max_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if len(set(args.docs_per_request)) != len(args.docs_per_request):
        raise SystemExit("--docs-per-request: each size once")
    if len(args.max_queries) not in (1, len(args.docs_per_request)):
        raise SystemExit("--max-queries: one value, or one per --docs-per-request size")
    args.sizes = list(zip(args.docs_per_request, args.max_queries * len(args.docs_per_request)
                          if len(args.max_queries) == 1 else args.max_queries, strict=True))
    if args.no_prefix_sharing:
        if args.served not in (None, ["whole"]):
            raise SystemExit("--no-prefix-sharing measures the whole variant only: leave out --served, or give "
                             "--served whole")
        args.served = ["whole"]
    args.served = args.served or list(VARIANTS)
    args.threads = args.threads or report.usable_cores()
    args.dtype_why = "as given"
    if args.dtype == "auto":
        args.dtype, args.dtype_why = auto_dtype("cpu")


def model_of(args, data_dir: Path | None) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    if args.quick:
        return build_tiny_model(Path("build") / "bench-model-qwen3-tiny", data_dir, args.seed)
    config = config_file(args.config, data_dir)
    return build_model(Path("build") / f"bench-model-{config.stem.lower()}", config, data_dir, args.seed)


def load_workloads(args, data_dir: Path | None) -> list[Workload]:
    if data_dir is None or not (data_dir / DL19_FILE).is_file():
        raise SystemExit(f"{DL19_FILE} not found in the data folder ({data_dir or 'none found'}): give --data-dir")
    workloads = []
    for docs, queries in args.sizes:
        requests = dl19_requests(data_dir / DL19_FILE, docs, queries)
        workloads.append(Workload(docs, requests, *levels_for(args.concurrency, len(requests.requests))))
    return workloads


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..client.rerank_client import RerankClient
    from ..launcher.repository import SCORER, TOKENIZER
    from .perf_sweep import ServerSpec, TritonVariant
    from .random_model import describe_model

    settle_arguments(args)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data_dir = resolve_data_dir(args.data_dir)
    workloads = load_workloads(args, data_dir)
    model_dir = model_of(args, data_dir)
    max_length = min(args.max_length, ld.model_window(model_dir))
    hf = HfRecipe(model_dir, threads=args.threads, batch_size=args.hf_batch_size, dtype=args.dtype,
                  max_length=max_length)
    for w in workloads:
        w.tokens = prompt_tokens([hf.prompts(r) for r in w.requests.requests], max_batch_tokens=args.max_batch_tokens)
    backends = {_REFERENCE: hf.backend()}
    specs = {}
    for variant in args.served:
        # `serve`'s repository (queue delay as in config.pbtxt), the tokenizer step at the same max_length as
        # HF, prefix sharing set explicitly.
        extra = {TOKENIZER: {"max_length": str(max_length)},
                 SCORER: {"prefix_sharing": "true" if variant == "shared" else "false"}}
        specs[VARIANTS[variant]] = ServerSpec(model_dir, TritonVariant(instances=1, num_threads=args.threads),
                                              dtype=args.dtype, max_batch_tokens=args.max_batch_tokens, extra=extra)
        how = ("`serve`'s default: each request's prompt head computed once" if variant == "shared" else
               "`serve --no-prefix-sharing`: every prompt computed whole")
        backends[VARIANTS[variant]] = (f"tritonserver 2.51 ensemble (prompt tokenizer step, packed causal decoder, "
                                       f"{args.dtype}; {how}), max_batch_tokens {args.max_batch_tokens}, 1 instance; "
                                       "RerankClient over gRPC")
    # Taken before the servers start: the commit of the code they load.
    context = run_context(args, describe_model(model_dir), workloads)
    passes: dict[int, list[ld.Pass]] = {w.docs_per_request: [] for w in workloads}
    total = args.repeat * sum(w.requests.num_pairs * (1 + len(specs) * len(w.levels)) for w in workloads)
    meters: dict[str, ServerCpu] = {}
    with tqdm(total=total, desc="decoder reranker", unit="pair", dynamic_ncols=True, file=sys.stderr) as bar, \
            ExitStack() as stack:
        bar.set_postfix_str(f"starting {len(specs)} tritonserver(s)", refresh=True)
        servers = stack.enter_context(running_servers(specs, work))
        served = {}
        for name, server in servers.items():
            served[name] = served_scorer(stack.enter_context(RerankClient(server.address.grpc_url, "grpc")))
            meters[name] = ServerCpu(server.process.pid if server.process is not None else None)
        bar.set_postfix_str("warm-up", refresh=True)
        # The first calls of a fresh stub or model pay for lazy initialisation, allocators, thread pools.
        first = workloads[0].requests.requests[0]
        warm = Request(first.query, first.documents[:2])
        for score in served.values():
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(score, [warm, warm]))
            score(Request(first.query, first.documents[:8]))
        hf.score(warm)
        for run_number in range(1, args.repeat + 1):
            for w in workloads:
                passes[w.docs_per_request] += one_run(run_number, args.repeat, w, hf.score, served, bar, meters)
    notes = method_notes(args, hf.max_length, workloads, meters, started)
    return finish(args, out, passes, workloads, backends, context, notes)


def finish(args, out: Path, passes: dict[int, list[ld.Pass]], workloads: list[Workload], backends: dict[str, str],
           context: dict[str, str], notes: list[str]) -> int:
    """Parity, rows, gains, files, the printed tables; 1 when the served scores disagree with HF's."""
    checks, sized, raw, gains = [], [], [], []
    for w in workloads:
        docs, own = w.docs_per_request, passes[w.docs_per_request]
        checks.append(parity(own, w.requests.requests, args.tolerance, judged=args.dtype == "float32",
                             docs_per_request=docs))
        rows, each = rows_of(own, backends)
        sized.append((docs, rows))
        raw.append((docs, each))
        if w.tokens is not None:
            gains += gain_rows(each, docs, w.tokens)
        tokens = next(p for p in own if p.contender == _REFERENCE).token_counts
        context.update({f"pairs_{docs}": str(len(tokens)), f"tokens_per_pair_{docs}": f"{tokens.mean():.1f}",
                        f"min_tokens_{docs}": str(int(tokens.min())), f"max_tokens_{docs}": str(int(tokens.max()))})
    sources = {w.docs_per_request: w.requests.source for w in workloads}
    files = [out / "decoder.csv", out / "decoder_runs.csv", out / "decoder_gain.csv", out / "decoder.md"]
    write_rows_csv(files[0], sized, context, sources)
    write_rows_csv(files[1], raw, context, sources)
    write_gain_csv(files[2], gains, context, sources)
    report.atomic_write(files[3], markdown(sized, gains, workloads, context, checks, backends, notes))
    print(results_table(sized))
    if gains:
        print()
        print(gain_table(gains))
        print()
        print(tokens_table(workloads))
    print()
    print(parity_table(checks))
    print()
    for check in checks:
        print(parity_line(check).replace("**", ""))
        for mismatch in check.scores.mismatches[:10]:
            print(f"  {mismatch}")
    print(f"{context['model']}; CPU {context['cpu']}, {args.threads} torch threads, commit {context['commit']}")
    print(f"wrote {', '.join(map(str, files))}")
    return 0 if all(check.ok for check in checks) else 1


def run_context(args, model: str, workloads: Sequence[Workload]) -> dict[str, str]:
    ctx = report.run_context(("torch", "transformers"))
    command = "triton-rerank bench-decoder " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return {"machine": ctx.machine, "cpu": ctx.cpu, "cores": str(ctx.cores), "torch_threads": str(args.threads),
            "torch": ctx.versions.get("torch", "-"), "transformers": ctx.versions.get("transformers", "-"),
            "model": f"{model}, {args.dtype}", "model_name": model,
            "workload": "; ".join(w.requests.source for w in workloads), "commit": ctx.commit, "date": ctx.date,
            "command": command, "dtype": args.dtype, "dtype_why": args.dtype_why}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def idle_note(meters: dict[str, ServerCpu]) -> str:
    parts = [f"{name} {m.idle_cpu_s:.1f} CPU s over {m.idle_wall_s:.0f} s of the others' passes "
             f"({100 * m.idle_cpu_s / m.idle_wall_s:.1f}% of one core)" for name, m in meters.items()
             if m.session is not None and m.idle_wall_s > 0]
    if not parts:
        return "the idle servers' CPU time could not be read (/proc)"
    return ("CPU time of each tritonserver (its process and its backend stubs) while idle, i.e. while another "
            "contender measured: " + "; ".join(parts))


def method_notes(args, max_length: int, workloads: Sequence[Workload], meters: dict[str, ServerCpu],
                 started: float) -> list[str]:
    from ..serving.prefix_sharing import DEFAULT_MIN_SHARED_PREFIX

    crowded = [f"concurrency {', '.join(map(str, [c for c in w.levels if c > len(w.requests.requests)]))} exceeds "
               f"the {len(w.requests.requests)} requests of a pass at {w.docs_per_request} documents: all of them "
               "are in flight at once" for w in workloads if any(c > len(w.requests.requests) for c in w.levels)]
    skipped = [f"concurrency {', '.join(map(str, w.skipped))} not measured at {w.docs_per_request} documents: "
               f"with {_count(len(w.requests.requests), 'request')} it would repeat a level measured"
               for w in workloads if w.skipped]
    variants = " and ".join(VARIANTS[v] for v in args.served)
    return [
        *crowded,
        *skipped,
        f"{_count(args.repeat, 'run')}; in each, for each request size, HF once, then at each concurrency level "
        f"({', '.join(map(str, args.concurrency))}) {variants} one after the other, on the same requests; odd runs "
        "in that order, even runs in the reverse",
        f"{_count(len(args.served), 'tritonserver')}, {variants}, started before the first run and kept to the end: only "
        "one contender measures at a time, the others idle; " + idle_note(meters),
        "served: RerankClient(grpc).score(query, documents), each request timed from the call to its answer; a "
        "pass's rates are its pairs (tokens) over the wall time of all its requests; the servers' queue delay and "
        "batching as `triton-rerank serve` renders them, prefix sharing set explicitly (config.pbtxt "
        "prefix_sharing true / false)",
        f"HF: one request at a time, the model card's recipe: prompts built and left-padded per batch of "
        f"{args.hf_batch_size} documents, max_length {max_length}, the full vocabulary's logits at every position "
        "(as the recipe's model(**inputs).logits), P(yes) = exp(log_softmax([no, yes]))[1]; tokenization included, "
        "as on the served side",
        "token counts: the recipe's prompts (the same ids as the server's tokenizer step), each request's head by "
        f"serving/prefix_sharing.shared_prefix_length, kept at {DEFAULT_MIN_SHARED_PREFIX} tokens or more (the server's "
        "min_shared_prefix)",
        "weights: random, of the config's shape (speed does not depend on their values), built in bfloat16 as the "
        "releases ship; every contender loads the same files and casts them to the run's dtype",
        "in decoder.csv, documents_per_s and windows_per_s are both pairs/s (one prompt per document)",
        "warm-up before measuring: the first query with two documents, twice at once to each server, once to HF; "
        "then with (up to) eight documents once to each server",
        "the CPU is shared with other work: absolute numbers are noisy; the ratios, measured within each run, are "
        "the figures to read",
        f"whole run {time.monotonic() - started:.0f} s",
    ]
