"""Requests of the serving benchmark: (query, documents) lists that every contender receives.

Two sources:
- the DL19 JSONL file of ../shared/data (`{"qid","query","candidates":[{"text",...}]}`): one
  request per query, its first `docs_per_request` candidates (BM25 order), as a search system
  sends its top-k to the reranker;
- a synthetic generator: queries and documents of a chosen number of tokens, made of whole words
  of the model's vocabulary (each one token for a WordPiece vocabulary such as bert-base-uncased).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .workload import load_dl19


@dataclass(frozen=True)
class Request:
    query: str
    documents: tuple[str, ...]


@dataclass
class RequestSet:
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
