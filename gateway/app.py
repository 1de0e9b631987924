"""The HTTP gateway: SGLang's /v1/rerank, TEI's /rerank and Cohere's /v2/rerank over the `reranker` ensemble.

    triton-rerank api --triton-url 127.0.0.1:8001 --host 127.0.0.1 --port 30000

A FastAPI app (uvicorn serves it) holding one tritonclient.grpc.aio connection. Each dialect is
a thin map onto the ensemble's QUERY/DOCUMENTS -> SCORES/TOKEN_COUNTS (gateway_routes.py);
bodies are in api_models.py, refusals (size, load, API key) in gateway_limits.py, errors in
gateway_errors.py, Prometheus metrics in gateway_metrics.py.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import FastAPI

from ..client.errors import RerankError
from ..client.ranking import ScoredDocuments
from ..client.rerank_client import AsyncRerankClient
from .errors import GatewayError, from_client_error, install_error_handlers
from .limits import AdmissionLimiter, BodySizeLimit
from .metrics import GatewayMetrics, MetricsMiddleware
from .routes import router


@dataclass
class GatewaySettings:
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str = "reranker"  # what /v1/models lists
    max_documents: int = 1000  # per request; more -> 413
    max_body_bytes: int = 16 * 1024 * 1024  # more -> 413
    max_concurrency: int = 64  # requests in Triton at once
    max_queue: int = 256  # requests waiting for a slot; more -> 429
    request_timeout: float = 300.0  # seconds for one call to Triton; more -> 504
    log_level: str = "info"


class Scorer(Protocol):
    """What the gateway needs from its backend (AsyncRerankClient; a fake in unit tests)."""

    where: str

    async def score(self, query: str, documents: list[str], truncate: bool = True) -> ScoredDocuments: ...

    async def is_ready(self, timeout: float = 2.0) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class GatewayState:
    settings: GatewaySettings
    scorer: Scorer
    limiter: AdmissionLimiter
    metrics: GatewayMetrics
    started_at: int = field(default_factory=lambda: int(time.time()))

    async def score(self, route: str, query: str, documents: list[str], truncate: bool) -> ScoredDocuments:
        """The ensemble's answer, or a GatewayError that says why not."""
        limit = self.settings.max_documents
        if len(documents) > limit:
            raise GatewayError(413, f"{len(documents)} documents in one request; the limit is {limit} "
                               "(--max-documents): split the list (the Python client does it for you)",
                               "payload_too_large")
        async with self.limiter.admit():
            try:
                scored = await self.scorer.score(query, documents, truncate)
            except RerankError as error:
                raise from_client_error(error) from error
        self.metrics.documents.labels(route).inc(len(documents))
        self.metrics.tokens.labels(route).inc(scored.total_tokens)
        return scored


def create_app(settings: GatewaySettings, scorer: Scorer | None = None) -> FastAPI:
    """The gateway app; `scorer` defaults to a gRPC AsyncRerankClient on settings.triton_url."""
    owns_scorer = scorer is None
    if scorer is None:
        # No retries and no splitting here: the caller gets 503 at once and decides; the document
        # count is already bounded by max_documents, and one request keeps TOKEN_COUNTS exact.
        scorer = AsyncRerankClient(settings.triton_url, "grpc", retries=0, max_documents_per_request=None,
                                   timeout=settings.request_timeout)
    metrics = GatewayMetrics()
    state = GatewayState(settings, scorer, AdmissionLimiter(settings.max_concurrency, settings.max_queue), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_scorer:
            await scorer.close()

    app = FastAPI(
        title="triton-rerank gateway",
        version="0.1.0",
        summary="SGLang, text-embeddings-inference and Cohere rerank APIs over the Triton `reranker` ensemble",
        lifespan=lifespan,
    )
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it sees every status
    return app
