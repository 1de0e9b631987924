"""bfloat16 and int8 against float32 on a CPU: how far the served scores and rankings move, on DL19.

The server picks bfloat16 by default on CPUs with AMX or AVX512-BF16, and `--quantize int8` makes
the encoder's linears int8 (bfloat16 elsewhere). This measures what each costs in fidelity: the
same DL19 (query, passage) pairs are scored by the server's engine (`PackedEngine`: our packed
encoder, torch SDPA attention, CPU, micro-batches of the CPU's token budget, torch threads = the
cores) in float32 and in each reduced precision (--precisions), and each is compared with float32:

  - |reduced - fp32| per pair: max and mean, and both over the fp32 scores' std (scale-free);
  - per query: Spearman rank correlation of the two score lists (average ranks for ties), min and
    median over queries; top-10 overlap; whether the top passage is the same;
  - pairs whose reduced score ties another pair of the same query (bf16 keeps 8 significant bits).

Checks come with it, on the first --reference-pairs pairs: the Hugging Face transformers reference
(AutoModelForSequenceClassification, SDPA, padded micro-batches) in float32 must give our float32
scores (max |ours - transformers| is reported), and its own bfloat16 error next to ours tells bf16's
rounding from our engine's.

Models: random weights in the shape of a real cross-encoder (no real weights are reachable here),
built once per shape and weight scale in build/precision-fidelity/ and reused while their recipe
is unchanged:
  minilm-l6  cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, 6 layers, hidden 384; bert-base-uncased tokenizer)
  bge-m3     BAAI/bge-reranker-v2-m3 (XLM-R large, 24 layers, hidden 1024, ~568M params; XLM-R tokenizer)
with the config and tokenizer files of the shared data folder (../shared/data).

Weight scale. With transformers' default init (std 0.02) every pair gets nearly the same score
(std ~0.005) and the [CLS] state that feeds the head differs little between pairs next to what all
pairs share, so rounding noise is large next to the signal that ranks. Two recipes, per shape:
  --encoder-scales 1    the encoder as transformers initializes it (std 0.02);
  --encoder-scales 2.5  every linear weight of the encoder and the pooler/head dense layer x2.5
                        (std 0.05): sharper attention, a [CLS] state that depends more on the pair.
In both, the output projection (one row) is redrawn and then calibrated on a few fixed DL19 pairs
(the last queries of the file) in float32 so that scores have mean 0 and std --score-std (default
2): spread over several units like a trained reranker's logits, and centred, since bf16's
resolution falls with magnitude. The affine calibration changes no ranking; |d| scales with it,
|d|/std does not. The two recipes bracket what a trained model may do; they are not a trained
model. A real checkpoint can be measured as it is with --model-dir.

Peers. With --peer-python (the peers' environment of `triton-rerank bench --contenders peers`), the
reduced precisions of the CPU rerankers people pick (ONNX Runtime dynamic int8, OpenVINO bf16,
torch bf16, all under sentence-transformers) are measured on the same pairs, each against its own
float32, so that ours and theirs sit in one table.

Writes precision_fidelity.md, precision_fidelity.csv (one row per model) and
precision_fidelity_queries.csv (one row per model and query) to --out, and prints the table.
The committed results (7.5 minutes on the 2-core CPU with the models built; building them the first
time adds about a minute, 4.4 GB of build/ and 6.7 GB of peak memory):

    python -m triton_rerank.bench.precision_fidelity --out results/cpu-precision-fidelity
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..models.dtypes import auto_dtype, cpu_flags, int8_instructions
from . import report
from .random_model import MINILM_L6_CONFIG
from .workload import (
    BGE_RERANKER_V2_M3_CONFIG,
    CONFIG_FILE,
    DL19_FILE,
    TOKENIZER_FILE,
    load_dl19,
    resolve_data_dir,
    spread_indices,
)

# The server's CPU token budget per forward (serving.scoring.DEFAULT_BATCH_TOKENS["cpu"]).
CPU_BATCH_TOKENS = 4096
TOP_K = 10
BUILD_ROOT = Path("build") / "precision-fidelity"
MARKER = "precision_fidelity_model.json"
# Calibration pairs of the output projection: the last CALIBRATION_QUERIES queries of the file, the
# passages at these BM25 ranks of each (spread over the list, so that scores differ).
CALIBRATION_QUERIES = 4
CALIBRATION_RANKS = (0, 33, 66, 99)
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Shape:
    """A real cross-encoder's shape: its config and tokenizer in the data folder, and default workload size."""

    name: str
    title: str
    config_file: str  # relative to the data folder
    tokenizer_file: str
    builtin_config: dict
    tokenizer_class: str | None
    queries: int
    passages: int
    reference_pairs: int


SHAPES: dict[str, Shape] = {
    "minilm-l6": Shape("minilm-l6", "ms-marco-MiniLM-L-6-v2 shape", "configs/ms-marco-MiniLM-L-6-v2.json",
                       "tokenizers/bert-base-uncased/tokenizer.json", MINILM_L6_CONFIG, "BertTokenizer",
                       queries=20, passages=100, reference_pairs=200),
    "bge-m3": Shape("bge-m3", "bge-reranker-v2-m3 shape", CONFIG_FILE, TOKENIZER_FILE, BGE_RERANKER_V2_M3_CONFIG, None,
                    queries=10, passages=20, reference_pairs=20),
}


# --------------------------------------------------------------------------------------------
# Metrics (numpy only)
# --------------------------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing the mean of their ranks (scipy.stats.rankdata's 'average')."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman of {len(ra)} and {len(rb)} values")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_k(scores: Sequence[float], k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; a tie goes to the earlier index (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int = TOP_K) -> float:
    """|top-k of a & top-k of b| / k (k capped at the list's length)."""
    k = min(k, len(a))
    return len(set(top_k(a, k).tolist()) & set(top_k(b, k).tolist())) / k if k else float("nan")


def tied_pairs(scores: Sequence[float]) -> int:
    """Pairs whose score equals another pair's of the same list."""
    _, counts = np.unique(np.asarray(scores), return_counts=True)
    return int(counts[counts > 1].sum())


@dataclass
class QueryFidelity:
    query: int  # index in the workload
    qid: str
    pairs: int
    spearman: float
    top_k_overlap: float
    same_top1: bool
    max_abs_diff: float
    fp32_ties: int
    reduced_ties: int


def per_query(fp32: np.ndarray, reduced: np.ndarray, counts: Sequence[int],
              qids: Sequence[str]) -> list[QueryFidelity]:
    """The comparison of each query's pairs (the next counts[i] scores)."""
    out, start = [], 0
    for i, (n, qid) in enumerate(zip(counts, qids, strict=True)):
        a, b = fp32[start:start + n], reduced[start:start + n]
        start += n
        out.append(QueryFidelity(i, str(qid), n, spearman(a, b), top_k_overlap(a, b),
                                 bool(top_k(a, 1)[0] == top_k(b, 1)[0]), float(np.abs(b - a).max()),
                                 tied_pairs(a), tied_pairs(b)))
    if start != len(fp32):
        raise ValueError(f"query counts sum to {start}, not to the {len(fp32)} scores")
    return out


@dataclass
class Fidelity:
    """A reduced precision (bf16, int8) against fp32 over a whole workload."""

    pairs: int
    queries: int
    score_mean: float  # fp32
    score_std: float  # fp32, over all pairs
    max_abs_diff: float
    mean_abs_diff: float
    spearman_min: float
    spearman_median: float
    spearman_mean: float
    top10_overlap_mean: float
    top10_overlap_min: float
    same_top1: int  # queries whose best passage is the same
    reduced_ties: int  # pairs tied with another of their query in the reduced precision ...
    fp32_ties: int  # ... and in fp32

    @property
    def max_over_std(self) -> float:
        return self.max_abs_diff / self.score_std if self.score_std > 0 else float("nan")

    @property
    def mean_over_std(self) -> float:
        return self.mean_abs_diff / self.score_std if self.score_std > 0 else float("nan")


def fidelity(fp32: np.ndarray, reduced: np.ndarray, queries: list[QueryFidelity]) -> Fidelity:
    fp32, reduced = np.asarray(fp32, dtype=np.float64), np.asarray(reduced, dtype=np.float64)
    diff = np.abs(reduced - fp32)
    rho = np.array([q.spearman for q in queries])
    overlap = np.array([q.top_k_overlap for q in queries])
    return Fidelity(
        pairs=len(fp32), queries=len(queries), score_mean=float(fp32.mean()), score_std=float(fp32.std()),
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        spearman_min=float(np.nanmin(rho)), spearman_median=float(np.nanmedian(rho)),
        spearman_mean=float(np.nanmean(rho)), top10_overlap_mean=float(overlap.mean()),
        top10_overlap_min=float(overlap.min()), same_top1=sum(q.same_top1 for q in queries),
        reduced_ties=sum(q.reduced_ties for q in queries), fp32_ties=sum(q.fp32_ties for q in queries))


# --------------------------------------------------------------------------------------------
# Workload: DL19 queries with their BM25 top passages
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    qids: list[str]
    queries: list[str]
    documents: list[list[str]]
    source: str

    @property
    def pairs(self) -> int:
        return sum(len(d) for d in self.documents)


def select_workload(records: Sequence[dict], queries: int, passages: int) -> Workload:
    """`queries` queries spread over the records (file order), each with its first `passages` candidates."""
    usable = [r for r in records if r["candidates"]]
    chosen = [usable[i] for i in spread_indices(len(usable), min(queries, len(usable)))]
    return Workload([str(r["qid"]) for r in chosen], [r["query"] for r in chosen],
                    [[c["text"] for c in r["candidates"][:passages]] for r in chosen],
                    f"DL19: {len(chosen)} queries (spread over the {len(usable)}) x BM25 top {passages}")


def calibration_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    """The fixed (query, passage) pairs the output projection is calibrated on."""
    pairs = []
    for record in list(records)[-CALIBRATION_QUERIES:]:
        candidates = record["candidates"]
        pairs += [(record["query"], candidates[r]["text"]) for r in CALIBRATION_RANKS if r < len(candidates)]
    return pairs


@dataclass
class EncodedPairs:
    """A workload's pairs packed as the server packs them, every query's pairs in a row."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    counts: list[int]  # pairs of each query

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def head(self, pairs: int) -> EncodedPairs:
        """The first `pairs` pairs."""
        pairs = min(pairs, len(self.lengths))
        tokens = int(self.lengths[:pairs].sum())
        counts, left = [], pairs
        for n in self.counts:
            if left <= 0:
                break
            counts.append(min(n, left))
            left -= counts[-1]
        return EncodedPairs(self.input_ids[:tokens], self.token_type_ids[:tokens], self.lengths[:pairs], counts)


def encode(model_dir: Path, workload: Workload) -> EncodedPairs:
    """The server's tokenization (PairTokenizer, documents cut to the model's window) of every pair."""
    from ..serving.tokenization import PairTokenizer

    tokenizer = PairTokenizer(model_dir)
    packed = [tokenizer.encode(q, d) for q, d in zip(workload.queries, workload.documents, strict=True)]
    return EncodedPairs(np.concatenate([p.input_ids for p in packed]),
                        np.concatenate([p.token_type_ids for p in packed]),
                        np.concatenate([p.lengths for p in packed]), [len(p.lengths) for p in packed])


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


# The reduced precisions measured against float32: (activation dtype, quantize) of the server's engine.
# int8 is what `serve --quantize int8` runs on a CPU whose dtype=auto is bfloat16.
# name -> (dtype, quantize, engine): what each reduced precision runs.
# openvino-int8 runs float32 elsewhere: OpenVINO's int8 graph measured faster so than with bf16 around it.
PRECISIONS = {"bfloat16": ("bfloat16", "none", "packed"), "int8": ("bfloat16", "int8", "packed"),
              "openvino": ("bfloat16", "none", "openvino"), "openvino-int8": ("float32", "int8", "openvino")}
PRECISION_TITLES = {"bfloat16": "bf16", "int8": "int8 linears (bf16 elsewhere)", "openvino": "OpenVINO bf16",
                    "openvino-int8": "OpenVINO int8 linears (fp32 elsewhere)"}
ENGINE_TITLES = {"packed": "packed", "hf": "transformers", "openvino": "openvino"}
# The peers' reduced precisions (bench/cpu_peers.py), each against the peer's own float32 (st-torch-fp32).
PEER_TITLES = {"st-torch-bf16": "peer: sentence-transformers torch bf16",
               "st-onnx-int8": "peer: ONNX Runtime dynamic int8 (sentence-transformers)",
               "st-openvino": "peer: OpenVINO bf16 (sentence-transformers)"}


def title(precision: str) -> str:
    return PRECISION_TITLES.get(precision) or PEER_TITLES[precision]


@dataclass
class Pass:
    engine: str  # "packed float32", "packed bfloat16", "packed int8", "transformers float32"
    scores: np.ndarray
    seconds: float
    tokens: int
    head_dtype: str = ""  # the dtype the classification head ran in ("" when not known)


def make_engine(kind: str, model_dir: Path, dtype_name: str, quantize: str = "none"):
    """The server's engines on the CPU: "packed" (PackedEngine, sdpa), "hf" (HFEngine, the reference) or
    "openvino" (OpenVINOEngine)."""
    import torch

    from ..serving.scoring import HFEngine, PackedEngine

    dtype, cpu = getattr(torch, dtype_name), torch.device("cpu")
    if kind == "packed":
        return PackedEngine(str(model_dir), dtype, cpu, "sdpa", quantize)
    if kind == "hf":
        return HFEngine(str(model_dir), dtype, cpu)
    if kind == "openvino":
        from ..serving.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(str(model_dir), dtype, cpu, quantize=quantize)
    raise ValueError(f"engine kind must be one of {', '.join(ENGINE_TITLES)}, got {kind!r}")


def score_pass(kind: str, model_dir: Path, precision: str, pairs: EncodedPairs, max_batch_tokens: int,
               on_tokens: Callable[[int], None] | None = None) -> Pass:
    """Every pair scored by a freshly loaded engine (freed afterwards: a 568M model is 2.3 GB in fp32).
    precision: float32, or one of PRECISIONS (transformers: float32 or bfloat16)."""
    from ..serving.scoring import score_pairs

    dtype_name, quantize, _ = PRECISIONS.get(precision, (precision, "none", kind))
    engine = make_engine(kind, model_dir, dtype_name, quantize)
    head = getattr(getattr(engine, "model", None), "head", None)
    head_dtype = str(head.out_proj.weight.dtype).removeprefix("torch.") if head is not None else ""
    if kind == "openvino":
        head_dtype = "float32"  # compiled apart in float32 (serving/openvino_engine.py)
    observe = (lambda tokens, _seconds: on_tokens(tokens)) if on_tokens else None
    try:
        started = time.perf_counter()
        scores = score_pairs(engine, pairs.input_ids, pairs.token_type_ids, pairs.lengths, max_batch_tokens,
                             observe=observe)
        seconds = time.perf_counter() - started
    finally:
        del engine
        gc.collect()
    # "openvino bfloat16", not "openvino openvino"; "openvino int8", not "openvino openvino-int8".
    label = dtype_name if precision == kind else precision.removeprefix(f"{kind}-")
    return Pass(f"{ENGINE_TITLES[kind]} {label}", scores, seconds, pairs.tokens, head_dtype)


@dataclass
class Reference:
    """The transformers checks on the first `pairs` pairs: its fp32 against ours, and its bf16 error next to
    our reduced precision's."""

    pairs: int = 0
    fp32_max_abs_diff: float = float("nan")  # max |packed fp32 - transformers fp32|
    ours_max: float = float("nan")  # max |packed reduced - packed fp32| on these pairs
    ours_mean: float = float("nan")
    hf_bf16_max: float = float("nan")  # max |transformers bf16 - transformers fp32|
    hf_bf16_mean: float = float("nan")


@dataclass
class ModelResult:
    model: str  # label, e.g. "minilm-l6 x2.5"
    precision: str  # the reduced one: a key of PRECISIONS
    description: str
    model_dir: str
    fidelity: Fidelity
    queries: list[QueryFidelity]
    reference: Reference
    tokens: int
    passes: list[Pass] = field(default_factory=list)

    def seconds(self, engine: str) -> float:
        return next((p.seconds for p in self.passes if p.engine == engine), float("nan"))

    @property
    def fp32_seconds(self) -> float:
        """The float32 pass it is measured against: the peer's own for a peer, else our packed engine's."""
        return self.seconds("st-torch-fp32" if self.precision in PEER_TITLES else "packed float32")

    @property
    def reduced_seconds(self) -> float:
        """The reduced precision's pass, whichever engine ran it (it follows packed float32)."""
        return self.passes[1].seconds if len(self.passes) > 1 else float("nan")


def reference_check(fp32: np.ndarray, reduced: np.ndarray, hf32: np.ndarray, hf16: np.ndarray) -> Reference:
    """The checks on the first len(hf32) pairs (hf16 may be empty: not run)."""
    n = len(hf32)
    ours = np.abs(reduced[:n].astype(np.float64) - fp32[:n])
    theirs = np.abs(hf16.astype(np.float64) - hf32) if len(hf16) else np.array([float("nan")])
    return Reference(n, float(np.abs(hf32.astype(np.float64) - fp32[:n]).max()), float(ours.max()),
                     float(ours.mean()), float(theirs.max()), float(theirs.mean()))


def measure(model_dir: Path, label: str, description: str, workload: Workload, *, reference_pairs: int,
            precisions: Sequence[str] = ("bfloat16",), max_batch_tokens: int = CPU_BATCH_TOKENS,
            on_tokens: Callable[[int], None] | None = None,
            on_step: Callable[[str], None] | None = None) -> list[ModelResult]:
    """fp32 and each of `precisions` passes of the packed engine over the workload, transformers fp32 and bf16
    on the first `reference_pairs` pairs: one result per reduced precision."""
    pairs = encode(model_dir, workload)
    head = pairs.head(reference_pairs)
    passes = {}
    for kind, precision, subset in (("packed", "float32", pairs), *((PRECISIONS[p][2], p, pairs) for p in precisions),
                                    ("hf", "float32", head), ("hf", "bfloat16", head)):
        if not len(subset.lengths):
            continue
        if on_step:
            on_step(f"{label}: {kind} {precision}")
        passes[kind, precision] = score_pass(kind, model_dir, precision, subset, max_batch_tokens, on_tokens)
    fp32 = passes["packed", "float32"].scores
    results = []
    for precision in precisions:
        reduced = passes[PRECISIONS[precision][2], precision].scores
        queries = per_query(fp32, reduced, pairs.counts, workload.qids)
        reference = reference_check(fp32, reduced, passes["hf", "float32"].scores, passes["hf", "bfloat16"].scores) \
            if ("hf", "float32") in passes else Reference()
        shown = [p for (kind, name), p in passes.items() if kind == "hf" or name in ("float32", precision)]
        results.append(ModelResult(label, precision, description, str(model_dir), fidelity(fp32, reduced, queries),
                                   queries, reference, pairs.tokens, shown))
    return results


def measure_peers(model_dir: Path, label: str, description: str, workload: Workload, ours_fp32: Pass, *,
                  python: str, peers: Sequence[str], threads: int, work: Path,
                  on_step: Callable[[str], None] | None = None) -> list[ModelResult]:
    """The peers' reduced precisions on the same pairs, each in its own process (bench/cpu_peers.py), each
    against the peer's own float32 (st-torch-fp32: transformers under sentence-transformers), like for like:
    the same tokenization and batches. Their reference check is max |st-torch-fp32 - our packed fp32| over
    every pair: that the peers score the same model as ours."""
    from .cpu_peers import REFERENCE, model_copy, run_peer

    pairs = [(q, d) for q, documents in zip(workload.queries, workload.documents, strict=True) for d in documents]
    counts = [len(documents) for documents in workload.documents]
    ran = {}
    for contender in (REFERENCE, *peers):
        if on_step:
            on_step(f"{label}: {contender}")
        result = run_peer(python, contender, model_copy(model_dir, work, contender), pairs, threads, batch_size=16)
        if len(result.scores) != len(pairs):
            raise ValueError(f"{contender} returned {len(result.scores)} scores for {len(pairs)} pairs")
        ran[contender] = Pass(contender, np.asarray(result.scores, dtype=np.float32), result.seconds, ours_fp32.tokens)
    theirs_fp32 = ran[REFERENCE].scores
    same_model = float(np.abs(theirs_fp32.astype(np.float64) - ours_fp32.scores).max())
    results = []
    for contender in peers:
        reduced = ran[contender].scores
        queries = per_query(theirs_fp32, reduced, counts, workload.qids)
        diff = np.abs(reduced.astype(np.float64) - theirs_fp32)
        reference = Reference(len(pairs), same_model, float(diff.max()), float(diff.mean()))
        results.append(ModelResult(label, contender, description, str(model_dir),
                                   fidelity(theirs_fp32, reduced, queries), queries, reference, ours_fp32.tokens,
                                   [ours_fp32, ran[contender], ran[REFERENCE]]))
    return results


# --------------------------------------------------------------------------------------------
# Random-weight models: scaled encoder, calibrated output projection
# --------------------------------------------------------------------------------------------


def output_projection(model):
    """The one-row linear layer that makes the score: BERT's `classifier`, RoBERTa's `classifier.out_proj`."""
    import torch

    head = model.classifier
    layer = getattr(head, "out_proj", head)
    if not isinstance(layer, torch.nn.Linear) or layer.out_features != 1:
        raise ValueError(f"no one-label output projection in {type(model).__name__}")
    return layer


def scale_encoder(model, scale: float) -> None:
    """Every linear weight but the output projection's (attention, FFN, pooler/head dense) times `scale`."""
    import torch

    if scale == 1.0:
        return
    out = output_projection(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not out:
                module.weight.mul_(scale)


def hf_scores(model, tokenizer_file: Path, pairs: Sequence[tuple[str, str]], max_length: int,
              batch_size: int = 8) -> np.ndarray:
    """fp32 logits of `pairs` by a transformers model in memory (padded batches)."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="only_second")
    encodings = tokenizer.encode_batch(list(pairs))
    pad = model.config.pad_token_id or 0
    uses_types = getattr(model.config, "type_vocab_size", 1) > 1
    scores = []
    with torch.inference_mode():
        for start in range(0, len(encodings), batch_size):
            batch = encodings[start:start + batch_size]
            width = max(len(e.ids) for e in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            types = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                ids[row, :len(e.ids)] = torch.tensor(e.ids)
                types[row, :len(e.ids)] = torch.tensor(e.type_ids)
                mask[row, :len(e.ids)] = 1
            inputs = {"input_ids": ids, "attention_mask": mask, **({"token_type_ids": types} if uses_types else {})}
            scores.append(model(**inputs).logits[:, 0].float())
    return torch.cat(scores).numpy().astype(np.float64)


def calibrate_output(model, scores_of: Callable[[Any], np.ndarray], score_std: float, seed: int) -> dict[str, float]:
    """Redraws the output projection (seeded) and sets it so that `scores_of(model)` has mean 0, std `score_std`.

    The score is affine in the projection (w . h + b): scaling w by a = score_std / std and setting
    b = -a (mean - b0) maps the calibration scores exactly onto mean 0, std score_std.
    """
    import torch

    out = output_projection(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        out.weight.copy_(torch.randn(out.weight.shape, generator=generator, dtype=torch.float32))
        out.bias.zero_()
        raw = scores_of(model)
        std, mean = float(raw.std()), float(raw.mean())
        if not std > 0:
            raise ValueError("every calibration pair got the same score: nothing to spread")
        a = score_std / std
        out.weight.mul_(a)
        out.bias.fill_(-a * mean)
    return {"raw_std": std, "raw_mean": mean, "weight_scale": a}


def build_model(shape: Shape, data_dir: Path, records: Sequence[dict], *, encoder_scale: float, score_std: float,
                seed: int = 0, root: Path = BUILD_ROOT, on_step: Callable[[str], None] | None = None) -> Path:
    """The random-weight model of `shape` and recipe in root/<shape>-x<scale>; reused while the recipe is unchanged."""
    from ..models.families import max_input_length
    from .random_model import config_dict, load_tokenizer, random_model, save_model_dir

    config_file, tokenizer_file = data_dir / shape.config_file, data_dir / shape.tokenizer_file
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found: the {shape.name} shape needs the real tokenizer")
    out = root / f"{shape.name}-x{encoder_scale:g}"
    calibration = calibration_pairs(records)
    marker = {"recipe": RECIPE_VERSION, "shape": shape.name, "seed": seed, "encoder_scale": encoder_scale,
              "score_std": score_std, "config": str(config_file) if config_file.is_file() else "built-in",
              "tokenizer": str(tokenizer_file), "calibration_pairs": len(calibration)}
    if (out / MARKER).is_file():
        old = json.loads((out / MARKER).read_text())
        if {k: old.get(k) for k in marker} == marker:
            return out
    if on_step:
        on_step(f"building {out.name}")
    config = config_dict(config_file if config_file.is_file() else shape.builtin_config)
    tokenizer = load_tokenizer(tokenizer_file)
    config["vocab_size"] = tokenizer.get_vocab_size()
    model = random_model(config, seed=seed, attn_implementation="sdpa",
                         init=lambda m: scale_encoder(m, encoder_scale))
    window = max_input_length(config)
    calibrated = calibrate_output(model, lambda m: hf_scores(m, tokenizer_file, calibration, window), score_std, seed)
    save_model_dir(out, model, tokenizer, tokenizer_class=shape.tokenizer_class)
    del model
    gc.collect()
    report.atomic_write(out / MARKER, json.dumps({**marker, "calibrated": calibrated}, indent=1))
    return out


def describe(model_dir: Path, title: str | None = None) -> str:
    """One line: the shape, and for a model built here its weight recipe and calibration."""
    cfg = json.loads((model_dir / "config.json").read_text())
    marker = model_dir / MARKER
    text = (f"{title + ': ' if title else ''}{cfg.get('model_type')}, {cfg.get('num_hidden_layers')} layers, hidden "
            f"{cfg.get('hidden_size')}, {cfg.get('num_attention_heads')} heads, vocab {cfg.get('vocab_size')}")
    if marker.is_file():
        m = json.loads(marker.read_text())
        c = m.get("calibrated", {})
        text += (f"; random weights (seed {m['seed']}), encoder linear weights x{m['encoder_scale']:g} of the 0.02 "
                 f"init, output projection calibrated to mean 0, std {m['score_std']:g} on {m['calibration_pairs']} "
                 f"pairs (before: a unit-std projection gave mean {c.get('raw_mean', float('nan')):.3g}, std "
                 f"{c.get('raw_std', float('nan')):.3g})")
    return text


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")


def machine_context(threads: int) -> dict[str, str]:
    import torch

    ctx = report.run_context(("torch", "transformers"))
    flags = cpu_flags()
    default, why = auto_dtype("cpu", flags)
    return {"cpu": ctx.cpu, "cores": str(ctx.cores), "torch_threads": str(threads),
            "bf16_flags": ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in BF16_FLAGS),
            "server_default": f"{default}, {why}",
            "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "torch": ctx.versions.get("torch", "-"), "transformers": ctx.versions.get("transformers", "-"),
            "machine": ctx.machine, "commit": ctx.commit, "date": ctx.date}


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

CSV_FIELDS = ("model", "precision", "pairs", "queries", "tokens", "score_mean", "score_std", "max_abs_diff",
              "mean_abs_diff", "max_over_std", "mean_over_std", "spearman_min", "spearman_median", "spearman_mean",
              "top10_overlap_mean", "top10_overlap_min", "same_top1", "reduced_ties", "fp32_ties", "reference_pairs",
              "reference_fp32_max_abs_diff", "reference_ours_max", "reference_ours_mean",
              "reference_hf_bf16_max", "reference_hf_bf16_mean", "fp32_s", "reduced_s", "hf_fp32_s", "hf_bf16_s",
              "description")


def csv_row(r: ModelResult) -> dict[str, Any]:
    f = r.fidelity
    return {"model": r.model, "precision": r.precision, **asdict(f), "tokens": r.tokens,
            "max_over_std": f.max_over_std, "mean_over_std": f.mean_over_std,
            **{f"reference_{k}": v for k, v in asdict(r.reference).items() if k != "pairs"},
            "reference_pairs": r.reference.pairs,
            "fp32_s": r.fp32_seconds, "reduced_s": r.reduced_seconds,
            "hf_fp32_s": r.seconds("transformers float32"), "hf_bf16_s": r.seconds("transformers bfloat16"),
            "description": r.description}


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) else ("-" if isinstance(x, float) else str(x))


def write_csvs(out: Path, results: list[ModelResult], context: dict[str, str]) -> list[Path]:
    extra = ("cpu", "bf16_flags", "torch_threads", "torch", "commit", "date")
    paths = []
    with report.atomic_path(out / "precision_fidelity.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *extra])
        writer.writeheader()
        for r in results:
            row = csv_row(r)
            writer.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()},
                             **{k: context[k] for k in extra}})
    paths.append(out / "precision_fidelity.csv")
    with report.atomic_path(out / "precision_fidelity_queries.csv") as tmp, open(tmp, "w", newline="") as f:
        names = [f.name for f in fields(QueryFidelity)]
        writer = csv.DictWriter(f, fieldnames=["model", "precision", *names])
        writer.writeheader()
        for r in results:
            for q in r.queries:
                writer.writerow({"model": r.model, "precision": r.precision, **{k: (f"{v:.6g}" if isinstance(v, float) else v)
                                                      for k, v in asdict(q).items()}})
    paths.append(out / "precision_fidelity_queries.csv")
    return paths


def results_table(results: list[ModelResult]) -> str:
    headers = ["model", "precision", "pairs (queries)", "score std", "max abs d", "mean abs d", "max d / std",
               "mean d / std", "Spearman min", "Spearman median", "top-10 overlap", "same top-1",
               "ours vs transformers fp32"]
    rows = []
    for r in results:
        f = r.fidelity
        rows.append([r.model, title(r.precision), f"{f.pairs} ({f.queries})", _g(f.score_std), _g(f.max_abs_diff), _g(f.mean_abs_diff),
                     _g(f.max_over_std), _g(f.mean_over_std), f"{f.spearman_min:.4f}", f"{f.spearman_median:.4f}",
                     f"{f.top10_overlap_mean:.2f} (min {f.top10_overlap_min:.1f})", f"{f.same_top1}/{f.queries}",
                     f"{_g(r.reference.fp32_max_abs_diff)} ({r.reference.pairs} pairs)"])
    return report.markdown_table(headers, rows)


def reference_table(results: list[ModelResult]) -> str:
    headers = ["model", "precision", "pairs", "max abs(ours fp32 - transformers fp32)", "max abs d: ours",
               "max abs d: transformers bf16", "mean abs d: ours", "mean abs d: transformers bf16"]
    rows = [[r.model, title(r.precision), r.reference.pairs, _g(r.reference.fp32_max_abs_diff),
             _g(r.reference.ours_max), _g(r.reference.hf_bf16_max), _g(r.reference.ours_mean),
             _g(r.reference.hf_bf16_mean)]
            for r in results if r.precision not in PEER_TITLES]  # theirs: the main table's last column
    return report.markdown_table(headers, rows)


def timing_table(results: list[ModelResult]) -> str:
    headers = ["model", "precision", "tokens", "fp32 s", "reduced s", "speed-up over fp32",
               "transformers fp32 / bf16 s (pairs)"]
    rows = []
    for r in results:
        fp32, reduced = r.fp32_seconds, r.reduced_seconds
        transformers = "-" if r.precision in PEER_TITLES else (  # a peer: against its own float32
            f"{r.seconds('transformers float32'):.1f} / {r.seconds('transformers bfloat16'):.1f} ({r.reference.pairs})")
        rows.append([r.model, title(r.precision), r.tokens, f"{fp32:.1f}", f"{reduced:.1f}",
                     f"{fp32 / reduced:.2f}x", transformers])
    return report.markdown_table(headers, rows)


def markdown(results: list[ModelResult], context: dict[str, str], workloads: dict[str, str], notes: list[str]) -> str:
    lines = [
        "# bfloat16 and int8 against float32 on the CPU: score and ranking fidelity",
        "",
        f"CPU {context['cpu']}, {context['cores']} cores, {context['torch_threads']} torch threads; "
        f"bf16 flags: {context['bf16_flags']} (the server's dtype=auto here: {context['server_default']}); "
        f"torch {context['torch']} (CPU capability {context['torch_cpu_capability']}), "
        f"transformers {context['transformers']}; commit {context['commit']}; {context['date']}.",
        "",
        f"`{context['command']}`",
        "",
        "Each model scores the same DL19 pairs with the server's engine (PackedEngine: packed encoder, SDPA "
        f"attention, micro-batches of {context['max_batch_tokens']} tokens) in float32 and in each reduced "
        "precision: bf16 (`--dtype bfloat16`), and int8 linears with bf16 elsewhere (`--quantize int8`, weights "
        "int8 per output channel, activations int8 per token). d = reduced - fp32 per pair; Spearman per query "
        "over its passages (average ranks for ties), min and median over queries; top-10 overlap "
        "|top10(fp32) & top10(reduced)| / 10, mean (min) over queries; "
        "same top-1: queries whose best passage is the same. The last column is the sanity check: max "
        "|packed fp32 - transformers fp32| on the first pairs (below).",
        *(["", "Rows marked peer (`--peer-python`): another project's reduced precision (bench/cpu_peers.py, each "
            "in its own process, batches of 16) against that project's own float32 (sentence-transformers on "
            "transformers, st-torch-fp32) on the same pairs; their last column is max |st-torch-fp32 - packed "
            "fp32| over every pair, that the peer scores the same model."]
          if any(r.precision in PEER_TITLES for r in results) else []),
        "",
        results_table(results),
        "",
        "## Models and workloads",
        "",
    ]
    for model in dict.fromkeys(r.model for r in results):  # each model once, in order
        same = [r for r in results if r.model == model]
        r = same[0]
        ties = ", ".join(f"{title(o.precision)} {o.fidelity.reduced_ties}" for o in same)
        lines.append(f"- **{model}**: {r.description}; {workloads[model]}; {r.tokens:,} tokens; fp32 score mean "
                     f"{_g(r.fidelity.score_mean)}, std {_g(r.fidelity.score_std)}; pairs tied with another of their "
                     f"query: fp32 {r.fidelity.fp32_ties}, {ties}")
    lines += ["", "## transformers on the same pairs", "",
              "The first pairs of each workload, also scored by transformers (AutoModelForSequenceClassification, "
              "SDPA, padded micro-batches) in float32 and in bfloat16: its fp32 must be ours, and its own bf16 "
              "error says whether ours is bf16's or our engine's (and sets int8's error beside bf16's).", "",
              reference_table(results),
              "", "## Time (shared CPU: indicative only)", "", timing_table(results), "", "## Notes", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def _names_of(what: str, choices) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `choices`."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or text!r}; choose from "
                                             f"{', '.join(choices)}")
        return names

    return parse


_shapes = _names_of("shape", SHAPES)
_precisions = _names_of("precision", PRECISIONS)
_peers = _names_of("peer", PEER_TITLES)


def default_precisions() -> list[str]:
    import importlib.util

    return ["bfloat16", *(["int8"] if int8_instructions() else []),
            *(["openvino"] if importlib.util.find_spec("openvino") else []),
            *(["openvino-int8"] if importlib.util.find_spec("openvino") and int8_instructions() else [])]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m triton_rerank.bench.precision_fidelity",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/precision-fidelity/results",
                   help="folder for precision_fidelity.md/.csv and precision_fidelity_queries.csv "
                   "(default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="the shared data folder (DL19, tokenizers, configs); default "
                   "../shared/data when present")
    g = p.add_argument_group("models")
    g.add_argument("--shapes", type=_shapes, default=list(SHAPES),
                   help=f"random-weight shapes to build and measure, comma-separated: {', '.join(SHAPES)} "
                   "(default: all)")
    g.add_argument("--encoder-scales", type=_floats, default=[1.0, 2.5],
                   help="weight recipes: factors on the encoder's linear weights (1 = transformers' init, std "
                   "0.02), one model per shape and factor (default: 1,2.5)")
    g.add_argument("--score-std", type=float, default=2.0,
                   help="the fp32 score std the output projection is calibrated to, mean 0 (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    g.add_argument("--build-dir", default=str(BUILD_ROOT), help="where models are built and reused "
                   "(default: %(default)s)")
    g.add_argument("--model-dir", action="append", default=[],
                   help="measure this cross-encoder directory as it is instead of the random shapes (repeatable); "
                   "a real checkpoint, for instance")
    g = p.add_argument_group("workload (DL19: queries spread over the file, each with its BM25 top passages)")
    g.add_argument("--queries", type=int, default=None,
                   help="queries per model (default per shape: " + ", ".join(
                       f"{s.name} {s.queries}" for s in SHAPES.values()) + "; --model-dir 20)")
    g.add_argument("--passages", type=int, default=None,
                   help="passages per query, BM25 top (default per shape: " + ", ".join(
                       f"{s.name} {s.passages}" for s in SHAPES.values()) + "; --model-dir 100)")
    g.add_argument("--reference-pairs", type=int, default=None,
                   help="pairs (the first ones) the transformers fp32 check scores, 0 to skip (default per shape: "
                   + ", ".join(f"{s.name} {s.reference_pairs}" for s in SHAPES.values()) + "; --model-dir 200)")
    g = p.add_argument_group("engine")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    g.add_argument("--max-batch-tokens", type=int, default=CPU_BATCH_TOKENS,
                   help="tokens per forward (default: %(default)s, the server's CPU default)")
    g.add_argument("--precisions", type=_precisions,
                   default=default_precisions(),
                   help="reduced precisions to compare with float32, comma-separated: " + ", ".join(
                       f"{k} ({v})" for k, v in PRECISION_TITLES.items()) + " (default: all; int8 only on a CPU "
                   "with VNNI or AMX-INT8, openvino only where the openvino package is installed)")
    g = p.add_argument_group("peers (the CPU rerankers people pick, as in `triton-rerank bench --contenders peers`)")
    g.add_argument("--peer-python", default=None,
                   help="the Python of the peers' virtual environment (make bench-cpu-peers-setup: "
                   "build/cpu-peers-venv/bin/python); with it, each of --peers is measured on the same pairs "
                   "against its own float32 (default: no peers)")
    g.add_argument("--peers", type=_peers, default=list(PEER_TITLES),
                   help="peers' reduced precisions, comma-separated: " + ", ".join(
                       f"{k} ({v.removeprefix('peer: ')})" for k, v in PEER_TITLES.items()) + " (default: all)")
    return p


@dataclass
class Job:
    label: str
    queries: int
    passages: int
    reference_pairs: int
    shape: Shape | None = None
    encoder_scale: float = 1.0
    model_dir: Path | None = None


def plan_jobs(args) -> list[Job]:
    if args.model_dir:
        return [Job(Path(d).name, args.queries or 20, args.passages or 100,
                    200 if args.reference_pairs is None else args.reference_pairs, model_dir=Path(d))
                for d in args.model_dir]
    return [Job(f"{SHAPES[name].name} x{scale:g}", args.queries or SHAPES[name].queries,
                args.passages or SHAPES[name].passages,
                SHAPES[name].reference_pairs if args.reference_pairs is None else args.reference_pairs,
                shape=SHAPES[name], encoder_scale=scale)
            for name in args.shapes for scale in args.encoder_scales]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("queries", "passages", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if (args.reference_pairs or 0) < 0 or args.max_batch_tokens < 1 or args.score_std <= 0:
        raise SystemExit("--reference-pairs must be >= 0, --max-batch-tokens and --score-std > 0")
    if args.peer_python and not Path(args.peer_python).is_file():
        raise SystemExit(f"--peer-python {args.peer_python}: no such file; create the peers' environment with "
                         "make bench-cpu-peers-setup (build/cpu-peers-venv/bin/python)")
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None or not (data_dir / DL19_FILE).is_file():
        raise SystemExit(f"{DL19_FILE} not found (data folder {args.data_dir or '../shared/data'}): this "
                         "benchmark measures on DL19")

    import torch
    from tqdm import tqdm

    started = time.monotonic()
    threads = args.threads or report.usable_cores()
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_dl19(data_dir / DL19_FILE)
    jobs = plan_jobs(args)
    context = {**machine_context(threads), "max_batch_tokens": str(args.max_batch_tokens),
               "command": "python -m triton_rerank.bench.precision_fidelity " + " ".join(
                   shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))}
    results, workloads, built = [], {}, []
    with tqdm(total=len(jobs), desc="models", unit="model", dynamic_ncols=True, file=sys.stderr) as bar:
        def step(text: str) -> None:
            bar.set_postfix_str(text, refresh=True)

        for job in jobs:
            workload = select_workload(records, job.queries, job.passages)
            model_dir = job.model_dir
            if model_dir is None:
                t, building = time.monotonic(), []
                model_dir = build_model(job.shape, data_dir, records, encoder_scale=job.encoder_scale,
                                        score_std=args.score_std, seed=args.seed, root=Path(args.build_dir),
                                        on_step=lambda text, building=building: (building.append(text), step(text)))
                if building:
                    built.append(f"{model_dir} in {time.monotonic() - t:.0f} s")
            pairs = encode(model_dir, workload)
            total = (1 + len(args.precisions)) * pairs.tokens + 2 * pairs.head(job.reference_pairs).tokens
            description = describe(model_dir, job.shape and job.shape.title)
            with tqdm(total=total, desc=job.label, unit="tok", unit_scale=True, leave=False, dynamic_ncols=True,
                      file=sys.stderr) as tokens_bar:
                ours = measure(model_dir, job.label, description, workload, reference_pairs=job.reference_pairs,
                               precisions=args.precisions, max_batch_tokens=args.max_batch_tokens,
                               on_tokens=tokens_bar.update, on_step=step)
            results += ours
            if args.peer_python:
                # A fresh copy per run: the peers export into it, and a model rebuilt since must not meet old exports.
                with tempfile.TemporaryDirectory(prefix="precision-fidelity-peers-") as work:
                    results += measure_peers(model_dir, job.label, description, workload, ours[0].passes[0],
                                             python=args.peer_python, peers=args.peers, threads=threads,
                                             work=Path(work), on_step=step)
            workloads[job.label] = workload.source
            bar.update(1)
    head_dtypes = sorted({p.head_dtype for r in results for p in r.passes
                          if p.engine.startswith("packed") and p.engine != "packed float32"})
    notes = method_notes(args, built, time.monotonic() - started, head_dtypes)
    report.atomic_write(out / "precision_fidelity.md", markdown(results, context, workloads, notes))
    paths = [out / "precision_fidelity.md", *write_csvs(out, results, context)]
    print(results_table(results))
    print(f"\nCPU {context['cpu']}; {context['bf16_flags']}; {threads} torch threads; commit {context['commit']}; "
          f"{time.monotonic() - started:.0f} s")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def method_notes(args, built: list[str], seconds: float, head_dtypes: Sequence[str] = ()) -> list[str]:
    if list(head_dtypes) == ["bfloat16"]:
        head = ("In the bf16 engine the classification head runs in bf16 too, so the score itself is rounded to 8 "
                "significant bits: a score near 4 moves by up to 2^-6 = 0.016 from that alone, and pairs of a "
                "query can tie (counts above).")
    else:
        head = (f"The reduced engines' classification head ran in {' and '.join(head_dtypes) or 'an unknown dtype'}: "
                "only the encoder's arithmetic is reduced (a bf16 head would round the score itself to 8 "
                "significant bits).")
    return [
        "Random weights, not a trained reranker: the figures show what reduced precision does to this architecture's "
        "arithmetic at a given weight scale. Encoder x1 keeps transformers' init (std 0.02), where the [CLS] state "
        "differs little between pairs next to what all pairs share, so rounding noise is large next to the ranking "
        "signal (a pessimistic case); x2.5 (std 0.05) makes the state depend more on the pair. A trained model's "
        "fidelity is not pinned down by either; measure a real checkpoint with --model-dir when one is reachable.",
        f"The output projection is calibrated (affine, no ranking changes) on "
        f"{CALIBRATION_QUERIES * len(CALIBRATION_RANKS)} fixed pairs (the last {CALIBRATION_QUERIES} DL19 queries, "
        f"BM25 ranks {', '.join(map(str, CALIBRATION_RANKS))}) "
        f"to fp32 mean 0, std {args.score_std:g}; the std on the measured pairs is in the table. |d| scales with "
        "that choice; |d|/std and the rank figures do not. Centring takes a bias that cancels the projection's "
        "common part (the raw mean above); rounding error on that part is largely common to all pairs, so it moves "
        "|d| more than the rankings.",
        "int8: per token, each activation row is scaled to 127 steps by its own maximum, so a token with one "
        "large feature loses resolution on the others; per output channel likewise for weights. Int8 products "
        "are summed exactly in int32.",
        head,
        f"Engines load and score one at a time, torch threads {args.threads or report.usable_cores()}; "
        "the CPU was shared with other jobs, so the times are indicative only.",
        f"Whole run {seconds:.0f} s" + (f"; models built: {'; '.join(built)}" if built else "") + ".",
    ]


if __name__ == "__main__":
    sys.exit(main())
