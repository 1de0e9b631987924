"""Turning the ensemble's per-document scores into a ranking: shared by the client and the gateway.

The ensemble returns one raw logit and one token count per document, in input order. Ranking is
a stable sort on the raw logit (ties keep input order), so the order is the same whether the
caller wants raw scores or sigmoid-normalized ones: the sigmoid saturates to 1.0 in float64 for
large logits, and sorting after it would break those ties arbitrarily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoredDocuments:
    """What the ensemble returned for one query and its documents, in input order."""

    scores: np.ndarray  # float32 raw logits, shape [N] (a chunked document's: its best window's)
    token_counts: np.ndarray  # int32 tokens scored for each document (all its windows), shape [N]
    chunk_counts: np.ndarray | None = None  # int32 windows scored for each document, shape [N]; None = 1 each

    def __post_init__(self):
        if self.chunk_counts is None:
            object.__setattr__(self, "chunk_counts", np.ones(len(self.scores), dtype=np.int32))

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def total_chunks(self) -> int:
        """(query, window) pairs scored: the documents, plus the extra windows of chunked ones."""
        return int(self.chunk_counts.sum())

    @classmethod
    def concatenate(cls, parts: Sequence[ScoredDocuments]) -> ScoredDocuments:
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("scores", "token_counts", "chunk_counts")))


@dataclass(frozen=True)
class RerankResult:
    """One document of a ranking: its position in the request, its score and (optionally) its text."""

    index: int
    score: float
    document: str | None
    token_count: int
    chunk_count: int = 1  # windows scored (more than 1 only for a chunked long document)

    def as_dict(self) -> dict:
        return {"index": self.index, "score": self.score, "document": self.document, "token_count": self.token_count,
                "chunk_count": self.chunk_count}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function in float64, written so that neither branch overflows."""
    x = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def ranking_order(scores: np.ndarray, top_n: int | None = None) -> np.ndarray:
    """Indices of the documents by descending score; ties keep input order; at most top_n of them."""
    # Negating keeps a stable ascending sort stable for the descending order we want.
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order if top_n is None else order[:top_n]


def rank(scored: ScoredDocuments, documents: Sequence[str], top_n: int | None = None,
         return_documents: bool = True, normalize: bool = False) -> list[RerankResult]:
    """RerankResults sorted by descending score (raw logit, or its sigmoid when normalize)."""
    values = sigmoid(scored.scores) if normalize else scored.scores.astype(np.float64)
    return [
        RerankResult(
            index=int(i),
            score=float(values[i]),
            document=documents[i] if return_documents else None,
            token_count=int(scored.token_counts[i]),
            chunk_count=int(scored.chunk_counts[i]),
        )
        for i in ranking_order(scored.scores, top_n)
    ]


def chunk_bounds(count: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) bounds that cut `count` documents into requests of at most chunk_size."""
    if not chunk_size or count <= chunk_size:
        return [(0, count)]
    return [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]
