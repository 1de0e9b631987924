"""The one call every dialect makes: the `reranker` ensemble behind the gateway's limits, and the ranking.

A dialect's route calls `rerank(request, query, documents, ...)` and gets the documents ranked
(raw logits, or their sigmoid), the tokens of every pair scored (for usage fields) and the time
the ensemble took; what it answers is only a matter of field names.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request

from ..client.errors import InvalidRequestError, RerankError
from ..client.ranking import RerankResult, ScoredDocuments, rank
from ..client.triton_io import ScoreOptions
from .errors import RETRY_AFTER_SECONDS, GatewayError, from_client_error
from .limits import AdmissionLimiter
from .metrics import GatewayMetrics
from .settings import GatewaySettings

DEFAULT_OPTIONS = ScoreOptions()


class Scorer(Protocol):
    """What the gateway needs from its backend (AsyncRerankClient; a fake in unit tests)."""

    where: str

    async def score(self, query: str, documents: list[str], truncate: bool | None = None,
                    **options) -> ScoredDocuments: ...

    async def is_ready(self, timeout: float = 2.0) -> bool: ...

    async def reranker_kind(self) -> str: ...

    async def close(self) -> None: ...


@dataclass
class GatewayState:
    """What the routes share (app.state.gateway): settings, the backend, the admission limiter, metrics."""

    settings: GatewaySettings
    scorer: Scorer
    limiter: AdmissionLimiter
    metrics: GatewayMetrics
    started_at: int = field(default_factory=lambda: int(time.time()))
    _kind: str | None = None  # the ensemble's reranker_kind, once read

    async def reranker_kind(self) -> str:
        """What the ensemble's SCORES are ("decoder": logit(yes) - logit(no); "cross-encoder"; "auto" when
        it does not say), read from Triton once. A failure to ask is a 503, as any call to a Triton that
        is not answering."""
        if self._kind is None:
            try:
                self._kind = await self.scorer.reranker_kind()
            except RerankError as error:
                raise from_client_error(error) from error
            except Exception as error:  # tritonclient raises its own types for a server that is down
                raise GatewayError(503, f"cannot read the reranker's configuration from Triton ({error})",
                                   "unavailable", {"Retry-After": RETRY_AFTER_SECONDS}) from error
        return self._kind

    async def score(self, route: str, query: str, documents: list[str],
                    options: ScoreOptions = DEFAULT_OPTIONS) -> ScoredDocuments:
        """The ensemble's answer, or a GatewayError that says why not."""
        limit = self.settings.max_documents
        if len(documents) > limit:
            raise GatewayError(413, f"{len(documents)} documents in one request; the limit is {limit} "
                               "(--max-documents): split the list (the Python client does it for you)",
                               "payload_too_large")
        async with self.limiter.admit():
            try:
                scored = await self.scorer.score(query, documents, **dataclasses.asdict(options))
            except RerankError as error:
                raise from_client_error(error) from error
        self.metrics.documents.labels(route).inc(len(documents))
        self.metrics.tokens.labels(route).inc(scored.total_tokens)
        return scored


@dataclass(frozen=True)
class Ranking:
    results: list[RerankResult]  # by descending score (ties keep input order), at most top_n
    total_tokens: int  # of every pair scored, not only the top_n returned
    seconds: float  # how long the ensemble took
    total_chunks: int = 0  # (query, window) pairs scored: the documents, plus extra windows of chunked ones


def score_options(truncate: bool | None = None, **options) -> ScoreOptions:
    """The options (ScoreOptions' fields), or a 400 saying why they do not go together."""
    try:
        return ScoreOptions(truncate, **options)
    except InvalidRequestError as error:
        raise GatewayError(400, str(error), "invalid_request") from None


async def rerank(request: Request, query: str, documents: list[str], *, truncate: bool | None = None,
                 top_n: int | None = None, return_documents: bool = True, normalize: bool = False,
                 **options) -> Ranking:
    """The documents ranked for the query: raw logits, or their sigmoid (0..1) when normalize.

    Results carry the document's text only when return_documents. options are ScoreOptions'
    fields (long_documents, chunk_overlap, ...); truncate None leaves long documents to the
    server's default. The route's path labels the document and token counters.
    """
    gateway: GatewayState = request.app.state.gateway
    started = time.perf_counter()
    scored = await gateway.score(request.scope["route"].path, query, documents, score_options(truncate, **options))
    seconds = time.perf_counter() - started
    return Ranking(rank(scored, documents, top_n, return_documents, normalize), scored.total_tokens, seconds,
                   scored.total_chunks)
