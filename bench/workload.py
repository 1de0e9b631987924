"""Benchmark workloads: what every benchmark feeds its contenders, and what that work costs.

- Token-level workloads (the GPU check): DL19 pairs tokenized, or synthetic ids with DL19-like
  lengths; batch plans of the padded baselines; parameter and FLOP counts of an encoder config.
- Requests of the serving benchmark (`triton-rerank bench`): (query, documents) lists that every
  contender receives, from the DL19 file (one request per query, its first `docs_per_request`
  BM25 candidates, as a search system sends its top-k) or synthetic (queries and documents of
  whole vocabulary words, each one token for a WordPiece vocabulary such as bert-base-uncased).

The DL19 file is ../shared/data/msmarco-dl19-bm25top100.jsonl:
`{"qid","query","candidates":[{"docid","text",...}]}` per line.

Everything here is a pure function of token lengths, token ids, texts and config dicts. Nothing
heavy is imported (`tokenizers` only inside `load_workload`), so the GPU check's parent process,
which must never import torch, and the unit tests use this module directly.

The packed encoder's micro-batches are not planned here: the benchmarks use the server's
`triton_rerank.serving.scoring.plan_micro_batches`, so they measure what the server does.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# Files looked up in the data folder; each one missing is replaced (synthetic lengths, built-in config).
DL19_FILE = "msmarco-dl19-bm25top100.jsonl"
TOKENIZER_FILE = "tokenizers/xlm-roberta/tokenizer.json"
CONFIG_FILE = "configs/bge-reranker-v2-m3.json"
DL19_PAIRS = 4300  # 43 queries x BM25 top 100; also the size of the synthetic stand-in

# config.json of BAAI/bge-reranker-v2-m3, used when the shared data folder is absent.
BGE_RERANKER_V2_M3_CONFIG: dict[str, Any] = {
    "architectures": ["XLMRobertaForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "classifier_dropout": None,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "id2label": {"0": "LABEL_0"},
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "label2id": {"LABEL_0": 0},
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 8194,
    "model_type": "xlm-roberta",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    "type_vocab_size": 1,
    "vocab_size": 250002,
}
# Smoke mode (--device cpu): same vocabulary and layout, tiny depth/width (head_dim stays 64).
TINY_CONFIG_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "intermediate_size": 256,
}


# --------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """The data folder to use: the one given, else the first default that exists, else None."""
    if data_dir:
        path = Path(data_dir).expanduser()
        return path if path.is_dir() else None
    for cand in (DEFAULT_DATA_DIR, Path.cwd() / ".gpu-data", REPO_ROOT / ".gpu-data", REPO_ROOT / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def load_model_config(data_dir: Path | None, tiny: bool) -> tuple[dict, str]:
    """The bge-reranker-v2-m3 config (from the data folder, else built in) and where it came from."""
    cfg, source = dict(BGE_RERANKER_V2_M3_CONFIG), "built-in bge-reranker-v2-m3"
    if data_dir is not None and (data_dir / CONFIG_FILE).is_file():
        cfg, source = json.loads((data_dir / CONFIG_FILE).read_text()), str(data_dir / CONFIG_FILE)
    if tiny:
        cfg.update(TINY_CONFIG_OVERRIDES)
        source += " (tiny smoke overrides)"
    return cfg, source


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Tokenized (query, passage) pairs, in file order."""

    input_ids: list[list[int]]
    type_ids: list[list[int]]
    lengths: list[int]
    pair_ids: list[tuple[str, str]]
    truncated_flags: list[bool] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def truncated(self) -> int:
        return int(sum(self.truncated_flags))

    def subset(self, indices: Sequence[int]) -> Workload:
        idx = list(indices)
        return Workload(
            input_ids=[self.input_ids[i] for i in idx],
            type_ids=[self.type_ids[i] for i in idx],
            lengths=[self.lengths[i] for i in idx],
            pair_ids=[self.pair_ids[i] for i in idx],
            truncated_flags=[self.truncated_flags[i] for i in idx] if self.truncated_flags else [],
            source=self.source,
        )


def load_dl19(path: str | Path) -> list[dict]:
    """Records of a DL19-format JSONL file: {"qid","query","candidates":[{"docid","text",...}]}."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def dl19_pairs(records: Sequence[dict], max_pairs: int | None = None) -> list[tuple[str, str, str, str]]:
    """(qid, docid, query, passage) for every candidate, in file order, at most max_pairs."""
    out = []
    for rec in records:
        for cand in rec["candidates"]:
            out.append((str(rec["qid"]), str(cand["docid"]), rec["query"], cand["text"]))
            if max_pairs is not None and len(out) >= max_pairs:
                return out
    return out


def tokenize_pairs(tokenizer, records: Sequence[dict], max_length: int = 512, max_pairs: int | None = None) -> Workload:
    """Tokenize DL19 records into pairs with the tokenizer's pair template.

    Truncation is "only_second" (the passage is cut, the query kept), as in the server's
    `PairTokenizer`; unlike the server, which refuses such a request, a pair whose query alone
    does not fit falls back to "longest_first" so that a benchmark never stops on one odd query.
    The tokenizer's truncation/padding settings are changed (no padding, truncation to max_length).
    """
    pairs = dl19_pairs(records, max_pairs)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="only_second")
    texts = [(q, d) for _, _, q, d in pairs]
    try:
        encodings = tokenizer.encode_batch(texts)
    except Exception:  # a query longer than max_length: go pair by pair
        encodings = []
        for text in texts:
            try:
                encodings.append(tokenizer.encode(*text))
            except Exception:
                tokenizer.enable_truncation(max_length, strategy="longest_first")
                encodings.append(tokenizer.encode(*text))
                tokenizer.enable_truncation(max_length, strategy="only_second")
    input_ids = [list(e.ids) for e in encodings]
    return Workload(
        input_ids=input_ids,
        type_ids=[list(e.type_ids) for e in encodings],
        lengths=[len(ids) for ids in input_ids],
        pair_ids=[(qid, docid) for qid, docid, _, _ in pairs],
        truncated_flags=[bool(e.overflowing) for e in encodings],
        source="dl19",
    )


def synthetic_lengths(n: int, seed: int = 0, max_length: int = 512, mean: float = 100.0) -> list[int]:
    """DL19-like pair lengths (log-normal around `mean` tokens) when the data file is absent."""
    rng = random.Random(seed)
    mu = math.log(mean) - 0.5 * 0.35**2
    return [max(8, min(max_length, int(rng.lognormvariate(mu, 0.35)))) for _ in range(n)]


def synthetic_workload(n: int, vocab_size: int, seed: int = 0, max_length: int = 512) -> Workload:
    """Random token ids with DL19-like lengths; ids avoid 0..3 (special tokens) except <s>/</s>."""
    rng = random.Random(seed)
    lengths = synthetic_lengths(n, seed, max_length)
    ids = [[0] + [rng.randrange(4, vocab_size) for _ in range(n_tok - 2)] + [2] for n_tok in lengths]
    return Workload(
        input_ids=ids,
        type_ids=[[0] * len(x) for x in ids],
        lengths=lengths,
        pair_ids=[("synthetic", str(i)) for i in range(n)],
        source="synthetic",
    )


def load_workload(data_dir: Path | None, max_length: int, vocab_size: int, n_synthetic: int = DL19_PAIRS) -> Workload:
    """DL19 pairs tokenized with the XLM-R tokenizer, else synthetic ids with DL19-like lengths."""
    if data_dir is not None and (data_dir / DL19_FILE).is_file() and (data_dir / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(data_dir / TOKENIZER_FILE))
        wl = tokenize_pairs(tok, load_dl19(data_dir / DL19_FILE), max_length=max_length)
        # The smoke model keeps the real vocabulary; a config from the data folder might not.
        if tok.get_vocab_size() > vocab_size:
            wl.input_ids = [[t % vocab_size for t in ids] for ids in wl.input_ids]
        return wl
    return synthetic_workload(n_synthetic, vocab_size, max_length=max_length)


def spread_indices(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return [(i * n_total) // n for i in range(n)]


def attention_cases(
    lengths: Sequence[int], device: str, quick: bool, seed: int = 0, source: str = "dl19"
) -> list[tuple[str, list[int]]]:
    """Named packs of sequence lengths for the attention benchmark (random draws from `lengths`).

    The first case is the main one (also run in bf16); "*_pack*" cases count toward the target.
    """
    rng = random.Random(seed)
    pool = list(lengths)
    if device != "cuda":
        # Interpreted kernels: a few short sequences are all the smoke run can afford.
        return [(f"{source}_pack8", [min(n, 96) for n in rng.sample(pool, min(8, len(pool)))])]
    cases = [(f"{source}_pack128", rng.sample(pool, min(128, len(pool))))]
    if not quick:
        cases.append((f"{source}_pack256", rng.sample(pool, min(256, len(pool)))))
        cases.append(("uniform512_x32", [512] * 32))
    return cases


# --------------------------------------------------------------------------------------------
# Batching and packing
# --------------------------------------------------------------------------------------------


def fixed_size_batches(lengths: Sequence[int], batch_size: int, sort: bool = False) -> list[list[int]]:
    """Batches of `batch_size` pairs in workload order (or sorted by length), the padded-batch baseline."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_token_count(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens a padded forward processes: each batch is padded to its longest pair."""
    return int(sum(len(b) * max(lengths[i] for i in b) for b in batches if len(b)))


def cu_seqlens_of(lengths: Sequence[int]) -> list[int]:
    """Cumulative sequence offsets [0, l0, l0+l1, ...] of sequences packed back to back."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def length_groups(lengths: Sequence[int], bucket: int = 1) -> dict[int, list[int]]:
    """Indices grouped by length rounded up to a multiple of `bucket` (1: identical lengths)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        key = int(math.ceil(n / bucket) * bucket)
        groups.setdefault(key, []).append(i)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------------------------
# Parameter and FLOP counting
# --------------------------------------------------------------------------------------------


def encoder_param_counts(cfg: dict) -> dict[str, int]:
    """Parameter counts of a BERT/XLM-R sequence-classification model from its config.json."""
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    labels = int(cfg.get("num_labels") or len(cfg.get("id2label") or {0: 0}))
    per_layer = (
        4 * h * h + 4 * h  # q, k, v, attention output projections (+ biases)
        + 2 * h  # attention output LayerNorm
        + 2 * h * inter + inter + h  # FFN up/down (+ biases)
        + 2 * h  # output LayerNorm
    )
    embedding = (
        int(cfg["vocab_size"]) * h
        + int(cfg["max_position_embeddings"]) * h
        + int(cfg.get("type_vocab_size", 2)) * h
        + 2 * h  # embedding LayerNorm
    )
    head = h * h + h + h * labels + labels  # dense + out_proj (XLM-R) / pooler + classifier (BERT)
    non_embedding = layers * per_layer
    return {
        "per_layer": per_layer,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "head": head,
        "total": non_embedding + embedding + head,
    }


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int) -> float:
    """FLOPs of non-causal attention over packed sequences: QK^T and PV, 4 * sum(L^2) * H * D."""
    return 4.0 * float(sum(int(n) * int(n) for n in lengths)) * heads * head_dim


def encoder_flops(lengths: Sequence[int], cfg: dict) -> float:
    """Useful FLOPs of a cross-encoder forward over pairs of the given lengths (no padding).

    Per pair of L tokens: 2 * non-embedding params * L (every token through every layer's
    matmuls) + per layer 4 * L^2 * hidden (attention scores and weighted sum) + the
    classification head on one token (2 * head params).
    """
    counts = encoder_param_counts(cfg)
    h = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    tokens = float(sum(int(n) for n in lengths))
    sq = float(sum(int(n) * int(n) for n in lengths))
    return 2.0 * counts["non_embedding"] * tokens + layers * 4.0 * sq * h + 2.0 * counts["head"] * len(lengths)


# --------------------------------------------------------------------------------------------
# Requests of the serving benchmark
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One rerank request: a query and the documents to score against it."""

    query: str
    documents: tuple[str, ...]


@dataclass
class RequestSet:
    """The requests every contender of one benchmark run receives, and where they came from."""

    requests: list[Request]
    source: str  # e.g. "dl19 (43 queries x top 20)" or "synthetic (q=16, d=96 tokens, 20 docs)"

    @property
    def num_pairs(self) -> int:
        return sum(len(r.documents) for r in self.requests)

    @property
    def docs_per_request(self) -> int:
        return max((len(r.documents) for r in self.requests), default=0)

    def as_tuples(self) -> list[tuple[str, list[str]]]:
        return [(r.query, list(r.documents)) for r in self.requests]


def dl19_requests(path: str | Path, docs_per_request: int = 20, max_queries: int | None = None) -> RequestSet:
    """One request per DL19 query: the query and its first `docs_per_request` candidates."""
    records = load_dl19(path)[: max_queries or None]
    requests = [Request(r["query"], tuple(c["text"] for c in r["candidates"][:docs_per_request]))
                for r in records if r["candidates"]]
    return RequestSet(requests, f"dl19 ({len(requests)} queries x top {docs_per_request})")


_WORD = re.compile(r"^[a-z]{3,}$")


def vocabulary_words(tokenizer_json: str | Path) -> list[str]:
    """Whole lowercase words of a tokenizer's vocabulary (no '##' pieces, no special tokens)."""
    model = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]
    vocab = model.get("vocab", {})
    words = vocab.keys() if isinstance(vocab, dict) else (piece for piece, _ in vocab)
    out = sorted(w.lstrip("\u2581") for w in words if _WORD.match(w.lstrip("\u2581")))
    if not out:
        raise ValueError(f"{tokenizer_json} has no plain words to build synthetic text from")
    return out


def synthetic_requests(words: list[str], num_requests: int, docs_per_request: int, query_tokens: int,
                       doc_tokens: int, seed: int = 0) -> RequestSet:
    """Requests of `query_tokens`-word queries and `doc_tokens`-word documents (random vocabulary words)."""
    if min(num_requests, docs_per_request, query_tokens, doc_tokens) < 1:
        raise ValueError("synthetic requests need positive counts and lengths")
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    requests = [Request(text(query_tokens), tuple(text(doc_tokens) for _ in range(docs_per_request)))
                for _ in range(num_requests)]
    return RequestSet(requests, f"synthetic ({num_requests} requests, query {query_tokens} / document "
                                f"{doc_tokens} words, {docs_per_request} docs)")


def parse_synthetic(spec: str) -> dict[str, int]:
    """'q=16,d=128,n=20,r=40' -> {query_tokens, doc_tokens, docs_per_request, num_requests}."""
    keys = {"q": "query_tokens", "d": "doc_tokens", "n": "docs_per_request", "r": "num_requests"}
    out = {"query_tokens": 16, "doc_tokens": 96, "docs_per_request": 20, "num_requests": 40}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in keys or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad synthetic workload item {part!r}: use q=QUERY_TOKENS,d=DOC_TOKENS,"
                             "n=DOCS_PER_REQUEST,r=REQUESTS with positive integers")
        out[keys[key.strip()]] = int(value)
    return out
