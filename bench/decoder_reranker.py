"""`triton-rerank bench-decoder`: a decoder-LLM reranker (Qwen3-Reranker), served against its own recipe by hand.

The model is a random-weight Qwen3ForCausalLM of a real Qwen3-Reranker config (default the 0.6B one;
speed does not depend on the weight values) with the real Qwen3 tokenizer, both from the shared data
folder, built once in bfloat16 (as the releases ship) and reused. The workload is DL19: each query
with its first --docs-per-request BM25 candidates. Contenders, on the same requests (text in, scores
out, tokenization included), with the same torch threads, in the same dtype, run after run
interleaved (the order flips every run) so that a shared machine's drift hits both:

- hf-recipe (in-process): the model card's recipe with transformers, one request at a time:

      tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
      model = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa")
      ids = prefix_tokens + tokenizer(instruction/query/document, truncation,
                                      max_length=max_length - len(prefix_tokens) - len(suffix_tokens)) + suffix_tokens
      tokenizer.pad(batch, padding=True); logits[:, -1, [no, yes]] -> log_softmax -> P(yes)

  in batches of --hf-batch-size documents, under torch.inference_mode;
- triton-grpc: a real tritonserver as `triton-rerank serve --model-path DIR` renders it (the
  `reranker` ensemble: the prompt tokenizer step, then our packed causal decoder, which computes
  each request's prompt head (system prompt, instruction, query), shared by its documents, once
  (`serve`'s default; --no-prefix-sharing computes every prompt whole) and projects only the yes/no
  rows at each prompt's last token) driven by the Python client (RerankClient over gRPC) at each
  concurrency level; the server idles while HF runs.

Parity: the served P(yes) = sigmoid(SCORES) (SCORES = logit(yes) - logit(no)) against HF's P(yes)
on the same documents, max |difference| and Spearman per request, and every prompt's token count
against HF's. In float32 the scores must agree within --tolerance and the counts exactly, or the run
fails (exit 1); in bfloat16 the score difference is reported, not judged.

Writes decoder.csv (medians over runs), decoder_runs.csv (each run) and decoder.md to --out, and
prints the table. The committed results (4-11 minutes on 2 shared cores in bfloat16, by load; about
twice that in float32: the 0.6B shape, 3 queries x 20 documents, 2 runs of HF and of concurrency 1
and 4):

    triton-rerank bench-decoder --out results/cpu-qwen3-reranker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.dtypes import DTYPE_NAMES, auto_dtype
from . import long_documents as ld
from . import report
from .workload import DL19_FILE, Request, RequestSet, dl19_requests, resolve_data_dir

HF_CONTENDER = "hf-recipe"
SERVED_CONTENDER = ld.SERVED_CONTENDER
# long_documents' pass, row and parity helpers know their in-process reference by its name there;
# passes are labelled so while measuring and renamed in the rows reported.
_REFERENCE = ld.HF_CONTENDER
# The model card's max_length (what its recipe truncates prompts to); the model's window, when
# smaller, caps it.
RECIPE_MAX_LENGTH = 8192
SIZES = ("0.6B", "4B", "8B")
# The weights are built (and saved) in the dtype the releases ship; each contender casts on load.
BUILD_DTYPE = "bfloat16"
QUICK = {"max_queries": 2, "docs_per_request": 4, "repeat": 1, "concurrency": [1, 2]}
FULL = {"max_queries": 3, "docs_per_request": 20, "repeat": 2, "concurrency": [1, 4]}

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


class _Renamed:
    """The progress bar, showing this benchmark's name of the in-process contender."""

    def __init__(self, bar):
        self.bar, self.update = bar, bar.update

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.bar.set_postfix_str(text.replace(_REFERENCE, HF_CONTENDER), refresh=refresh)


def served_scorer(client) -> Callable[[Request], ld.Scored]:
    """A request through the ensemble: P(yes) = sigmoid(SCORES) and the prompts' token counts."""

    def score(request: Request) -> ld.Scored:
        scored = client.score(request.query, list(request.documents))
        return ld.Scored(sigmoid(scored.scores), scored.chunk_counts.astype(np.int32),
                         scored.token_counts.astype(np.int32))

    return score


# --------------------------------------------------------------------------------------------
# Parity and results
# --------------------------------------------------------------------------------------------


@dataclass
class RequestParity:
    """One request's served P(yes) against HF's, over every served pass."""

    query: str
    documents: int
    max_abs_diff: float
    spearman_min: float  # the lowest over the served passes
    hf_range: tuple[float, float]


@dataclass
class DecoderParity:
    scores: ld.Parity  # over every document of every served pass
    requests: list[RequestParity]
    judged: bool  # float32: the tolerance applies; otherwise reported only

    @property
    def ok(self) -> bool:
        return self.scores.counts_match and (self.scores.ok or not self.judged)

    @property
    def verdict(self) -> str:
        if not self.scores.counts_match:
            return "FAILED (prompt token counts differ)"
        if not self.judged:
            return "reported (scores are judged in float32 only)"
        return "passed" if self.scores.ok else "FAILED"

    def spearman(self) -> tuple[float, float]:
        """(min, median) of the per-request Spearman correlations."""
        values = [r.spearman_min for r in self.requests if not math.isnan(r.spearman_min)]
        return (min(values), statistics.median(values)) if values else (math.nan, math.nan)


def parity(passes: list[ld.Pass], requests: list[Request], tolerance: float, judged: bool) -> DecoderParity:
    reference = next(p for p in passes if p.contender == _REFERENCE)
    served = [p for p in passes if p.contender != _REFERENCE]
    per_request, start = [], 0
    for request in requests:
        rows = slice(start, start + len(request.documents))
        start = rows.stop
        hf = reference.scores[rows]
        per_request.append(RequestParity(
            request.query, len(request.documents), max(float(np.max(np.abs(p.scores[rows] - hf))) for p in served),
            min(spearman(p.scores[rows], hf) for p in served), (float(hf.min()), float(hf.max()))))
    return DecoderParity(ld.parity(passes, tolerance), per_request, judged)


def rows_of(passes: list[ld.Pass], backends: dict[str, str]) -> tuple[list[ld.Row], list[ld.Row]]:
    """(medians, each run) as long_documents' rows, HF first, with this benchmark's contender names."""
    raw = ld.with_ratios([ld.row_of(p, backends[p.contender]) for p in passes])
    rows = sorted(ld.medians(raw), key=lambda r: (r.contender != _REFERENCE, r.concurrency))

    def named(r: ld.Row) -> ld.Row:
        return dataclasses.replace(r, contender=HF_CONTENDER) if r.contender == _REFERENCE else r

    return [named(r) for r in rows], [named(r) for r in raw]


def results_table(rows: list[ld.Row]) -> str:
    return report.markdown_table(
        ["contender", "concurrency", "runs", "pairs/s", "tokens/s", "p50 ms / request", "served / HF (median of runs)",
         "each run"],
        [[r.contender, "in-process" if r.kind == "in-process" else str(r.concurrency), str(r.runs),
          f"{r.windows_per_s:.2f}", f"{r.tokens_per_s:,.0f}", f"{r.p50_request_ms:,.0f}",
          "-" if r.contender == HF_CONTENDER or r.ratio_vs_hf is None else f"{r.ratio_vs_hf:.2f}x",
          "-" if r.contender == HF_CONTENDER else r.each_run_ratio] for r in rows])


def parity_table(check: DecoderParity) -> str:
    return report.markdown_table(
        ["request", "query", "documents", "max abs diff P(yes)", "Spearman (lowest pass)", "HF P(yes) range"],
        [[str(i), r.query[:60], str(r.documents), f"{r.max_abs_diff:.2e}", f"{r.spearman_min:.4f}",
          f"{r.hf_range[0]:.4f} .. {r.hf_range[1]:.4f}"] for i, r in enumerate(check.requests, 1)])


def parity_line(check: DecoderParity) -> str:
    low, median = check.spearman()
    tolerance = f"tolerance {check.scores.tolerance:g}" if check.judged else "no tolerance outside float32"
    return (f"max |served - HF| P(yes) **{check.scores.max_abs_diff:.2e}** ({tolerance}); Spearman per request: "
            f"lowest {low:.4f}, median {median:.4f}; prompt token counts "
            f"{'equal' if check.scores.counts_match else 'DIFFER'}: {check.verdict}")


def markdown(rows: list[ld.Row], context: dict[str, str], check: DecoderParity, notes: list[str]) -> str:
    parts = [
        "# Decoder reranker (Qwen3-Reranker): served ensemble vs the Hugging Face recipe",
        "",
        f"- model: {context['model_name']}; {context['dtype']} on cpu ({context['dtype_why']})",
        f"- machine: {context['machine']}; CPU {context['cpu']}; {context['cores']} cores; torch {context['torch']}, "
        f"transformers {context['transformers']}, {context['torch_threads']} torch threads per contender",
        f"- commit {context['commit']} (when the run started), {context['date']}",
        f"- command: `{context['command']}`",
        f"- workload: {context['workload']}; {context['pairs']} (query, document) pairs, {context['tokens_per_pair']} "
        f"tokens per pair (the whole prompt; min {context['min_tokens']}, max {context['max_tokens']})",
        "",
        "## Throughput",
        "",
        "Medians over the runs. The ratio is served pairs/s over HF's, computed within each run (contenders "
        "interleaved) and then the median.",
        "",
        results_table(rows),
        "",
        "## Parity",
        "",
        f"Served P(yes) = sigmoid(SCORES) against HF's P(yes) on the same documents, every served pass: "
        f"{parity_line(check)}.",
        *[f"- {m}" for m in check.scores.mismatches[:10]],
        "",
        parity_table(check),
    ]
    return "\n".join([*parts, "", "## Notes", "", *(f"- {n}" for n in notes)]) + "\n"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/bench-decoder", help="folder for decoder.csv, decoder_runs.csv and "
                   "decoder.md (default: %(default)s)")
    p.add_argument("--work-dir", default="build/bench-decoder-work", help="server run folder and logs")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute: the tiny Qwen3 decoder "
                   f"(unless --model-dir), {', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given")
    g = p.add_argument_group("model and workload")
    g.add_argument("--config", default="0.6B", help=f"the shape: {', '.join(SIZES)} (Qwen3-Reranker-SIZE.json of "
                   "the data folder) or a config.json file (default: %(default)s); built with random weights and "
                   "the Qwen3 tokenizer in build/bench-model-<name>, reused while unchanged")
    g.add_argument("--model-dir", default=None, help="an existing Qwen3ForCausalLM reranker directory instead")
    g.add_argument("--data-dir", default=None, help="the shared data folder; default ../shared/data if present")
    g.add_argument("--max-queries", type=int, default=None,
                   help=f"DL19 queries, one request each (default {FULL['max_queries']}; 4-11 minutes for the 0.6B "
                   "shape in bfloat16 on 2 shared cores)")
    g.add_argument("--docs-per-request", type=int, default=None,
                   help=f"each query's first BM25 candidates (default {FULL['docs_per_request']}; 100 is DL19's all)")
    g.add_argument("--max-length", type=int, default=RECIPE_MAX_LENGTH, help="most tokens of one prompt, for "
                   "both contenders (default: %(default)s, the model card's; the model's window caps it)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="both contenders' dtype; auto: what the server picks on this CPU (bfloat16 with AMX or "
                   "AVX512-BF16, else float32)")
    g.add_argument("--concurrency", type=ld._levels, default=None,
                   help="requests in flight at once for the served passes, comma-separated (default: "
                   f"{','.join(map(str, FULL['concurrency']))})")
    g.add_argument("--repeat", type=int, default=None, help="runs, interleaved; figures are medians "
                   f"(default: {FULL['repeat']})")
    g.add_argument("--threads", type=int, default=None, help="torch threads of both contenders; default the cores "
                   "this process may use")
    g.add_argument("--hf-batch-size", type=int, default=8, help="documents per HF forward (default: %(default)s)")
    g.add_argument("--max-batch-tokens", type=int, default=4096, help="the server's packed-decoder token budget "
                   "per forward (default: %(default)s, the CPU default)")
    g.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                   help="the server computes every prompt whole (`serve --no-prefix-sharing`); default as `serve`: "
                   "each request's shared prompt head (system prompt, instruction, query) once")
    g.add_argument("--tolerance", type=float, default=1e-4, help="largest |served - HF| P(yes) accepted in float32 "
                   "(default: %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-decoder",
        help="benchmark a decoder reranker (Qwen3-Reranker): the served ensemble vs the HF transformers recipe",
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
    for name in ("max_queries", "docs_per_request", "repeat", "hf_batch_size", "max_batch_tokens", "max_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
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


def load_requests(args, data_dir: Path | None) -> RequestSet:
    if data_dir is None or not (data_dir / DL19_FILE).is_file():
        raise SystemExit(f"{DL19_FILE} not found in the data folder ({data_dir or 'none found'}): give --data-dir")
    return dl19_requests(data_dir / DL19_FILE, args.docs_per_request, args.max_queries)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..client.rerank_client import RerankClient
    from ..launcher.repository import SCORER, TOKENIZER
    from .perf_sweep import ServerSpec, TritonVariant, running_triton
    from .random_model import describe_model

    settle_arguments(args)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data_dir = resolve_data_dir(args.data_dir)
    requests = load_requests(args, data_dir)
    model_dir = model_of(args, data_dir)
    max_length = min(args.max_length, ld.model_window(model_dir))
    hf = HfRecipe(model_dir, threads=args.threads, batch_size=args.hf_batch_size, dtype=args.dtype,
                  max_length=max_length)
    # `serve`'s repository (queue delay and prefix sharing as in config.pbtxt), the tokenizer step at the same
    # max_length as HF.
    extra = {TOKENIZER: {"max_length": str(max_length)}}
    if not args.prefix_sharing:
        extra[SCORER] = {"prefix_sharing": "false"}
    spec = ServerSpec(model_dir, TritonVariant(instances=1, num_threads=args.threads), dtype=args.dtype,
                      max_batch_tokens=args.max_batch_tokens, extra=extra)
    sharing = "each request's prompt head computed once" if args.prefix_sharing else "prefix sharing off"
    served_backend = (f"tritonserver 2.51 ensemble (prompt tokenizer step, packed causal decoder, {args.dtype}, "
                      f"{sharing}), max_batch_tokens {args.max_batch_tokens}, 1 instance; RerankClient over gRPC")
    # Taken before the server starts: the commit of the code it loads.
    context = run_context(args, describe_model(model_dir), requests)
    passes: list[ld.Pass] = []
    total = requests.num_pairs * args.repeat * (1 + len(args.concurrency))
    with tqdm(total=total, desc="decoder reranker", unit="pair", dynamic_ncols=True, file=sys.stderr) as bar:
        bar.set_postfix_str("starting tritonserver", refresh=True)
        with running_triton(spec, work / "triton") as address, RerankClient(address.grpc_url, "grpc") as client:
            served = served_scorer(client)
            bar.set_postfix_str("warm-up", refresh=True)
            # The first calls of a fresh stub or model pay for lazy initialisation, allocators, thread pools.
            first = requests.requests[0]
            warm = Request(first.query, first.documents[:2])
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(served, [warm, warm]))
            hf.score(warm)
            for run_number in range(1, args.repeat + 1):
                passes += ld.one_run(run_number, args.repeat, args.concurrency, requests.requests, hf.score, served,
                                     _Renamed(bar))
    notes = method_notes(args, hf.max_length, len(requests.requests), started)
    return finish(args, out, passes, requests, {_REFERENCE: hf.backend(), SERVED_CONTENDER: served_backend},
                  context, notes)


def finish(args, out: Path, passes: list[ld.Pass], requests: RequestSet, backends: dict[str, str],
           context: dict[str, str], notes: list[str]) -> int:
    """Parity, rows, files, the printed table; 1 when the served scores disagree with HF's."""
    check = parity(passes, requests.requests, args.tolerance, judged=args.dtype == "float32")
    rows, raw = rows_of(passes, backends)
    tokens = next(p for p in passes if p.contender == _REFERENCE).token_counts
    context.update(pairs=str(len(tokens)), tokens_per_pair=f"{tokens.mean():.1f}", min_tokens=str(int(tokens.min())),
                   max_tokens=str(int(tokens.max())))
    files = [out / "decoder.csv", out / "decoder_runs.csv", out / "decoder.md"]
    ld.write_csv(files[0], rows, context)
    ld.write_csv(files[1], raw, context)
    report.atomic_write(files[2], markdown(rows, context, check, notes))
    print(results_table(rows))
    print()
    print(parity_table(check))
    print(f"\n{parity_line(check).replace('**', '')}")
    for mismatch in check.scores.mismatches[:10]:
        print(f"  {mismatch}")
    print(f"{context['model']}; {context['tokens_per_pair']} tokens per pair; CPU {context['cpu']}, "
          f"{args.threads} torch threads, commit {context['commit']}")
    print(f"wrote {', '.join(map(str, files))}")
    return 0 if check.ok else 1


def run_context(args, model: str, requests: RequestSet) -> dict[str, str]:
    ctx = report.run_context(("torch", "transformers"))
    command = "triton-rerank bench-decoder " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return {"machine": ctx.machine, "cpu": ctx.cpu, "cores": str(ctx.cores), "torch_threads": str(args.threads),
            "torch": ctx.versions.get("torch", "-"), "transformers": ctx.versions.get("transformers", "-"),
            "model": f"{model}, {args.dtype}", "model_name": model, "workload": requests.source, "commit": ctx.commit, "date": ctx.date,
            "command": command, "dtype": args.dtype, "dtype_why": args.dtype_why}


def method_notes(args, max_length: int, num_requests: int, started: float) -> list[str]:
    crowded = [c for c in args.concurrency if c > num_requests]
    return [
        *([f"concurrency {', '.join(map(str, crowded))} exceeds the {num_requests} requests of a pass: all of them "
           "are in flight at once"] if crowded else []),
        f"{args.repeat} runs; in each, HF once and the server once per concurrency level "
        f"({', '.join(map(str, args.concurrency))}), one after another on the same requests; odd runs start with HF, "
        "even runs end with it; one tritonserver for the whole run, idle while HF runs",
        "served: RerankClient(grpc).score(query, documents), each request timed from the call to its answer; a "
        "pass's rates are its pairs (tokens) over the wall time of all its requests; the server's queue delay and "
        "batching as `triton-rerank serve` renders them; prefix sharing "
        + ("on (each request's prompt head, shared by its documents, computed once)" if args.prefix_sharing else
           "off (--no-prefix-sharing: every prompt computed whole)"),
        f"HF: one request at a time, the model card's recipe: prompts built and left-padded per batch of "
        f"{args.hf_batch_size} documents, max_length {max_length}, the full vocabulary's logits at every position "
        "(as the recipe's model(**inputs).logits), P(yes) = exp(log_softmax([no, yes]))[1]; tokenization included, "
        "as on the served side",
        "weights: random, of the config's shape (speed does not depend on their values), built in bfloat16 as the "
        "releases ship; both contenders load the same files and cast them to the run's dtype",
        "in decoder.csv, documents_per_s and windows_per_s are both pairs/s (one prompt per document)",
        "warm-up before measuring: the first query with two documents, twice at once to the server, once to HF",
        "the CPU is shared with other work: absolute numbers are noisy; the ratio, measured within each run, is "
        "the figure to read",
        f"whole run {time.monotonic() - started:.0f} s",
    ]
