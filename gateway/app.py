"""The HTTP gateway: SGLang's, TEI's, Cohere's, NVIDIA NIM's and vLLM's rerank APIs over the `reranker` ensemble.

    triton-rerank api --triton-url 127.0.0.1:8001 --host 127.0.0.1 --port 30000

A FastAPI app (uvicorn serves it) holding one tritonclient.grpc.aio connection. The modules:

    dialects/      one module per dialect: its bodies and its thin route (DIALECTS lists them)
    kserve.py      KServe v2 infer/generate of the ensemble, validated (kserve_protocol.py: the bodies)
    kserve_metadata.py  KServe v2 health and metadata, asked of Triton's HTTP frontend (when its address is set)
    dialect.py     what a dialect builds on: its router (API key, tag, error responses), present()
    ensemble.py    the one ensemble call behind the limits, counted in the metrics; the ranking
    protocol.py    the request fields the dialects share (checked text, top_n, the long-document options)
    service.py     GET /health, /v1/models, /metrics
    errors.py      GatewayError, the error body shapes and FastAPI's handlers
    limits.py      refusals before any work: body size, held bytes, slow or chunk-flooding bodies, Host, load,
                   API key; the uvicorn connection that counts chunks and times request heads
    metrics.py     Prometheus metrics; settings.py the settings; command.py and server.py the CLI
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..client.rerank_client import AsyncRerankClient
from . import kserve, kserve_metadata, service
from .dialect import Dialect
from .dialects import DIALECTS
from .ensemble import GatewayState, Scorer
from .errors import ErrorShapes, install_error_handlers
from .limits import AdmissionLimiter, AllowedHosts, BodyBudget, BodyLimits
from .metrics import GatewayMetrics, MetricsMiddleware
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]


def create_app(settings: GatewaySettings, scorer: Scorer | None = None,
               dialects: Sequence[Dialect] = DIALECTS) -> FastAPI:
    """The gateway app; `scorer` defaults to a gRPC AsyncRerankClient on settings.triton_url."""
    owns_scorer = scorer is None
    if scorer is None:
        # No retries and no splitting here: the caller gets 503 at once and decides; the document
        # count is already bounded by max_documents, and one request keeps TOKEN_COUNTS exact.
        scorer = AsyncRerankClient(settings.triton_url, "grpc", retries=0, max_documents_per_request=None,
                                   timeout=settings.request_timeout, channel_max_age=settings.triton_channel_max_age)
    metrics = GatewayMetrics()
    budget = BodyBudget(settings.max_buffered_bytes)
    metrics.buffered_bytes.set_function(lambda: budget.used)
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
    # Routes that inflate a compressed body count the inflated bytes against the same budget.
    app.state.body_budget = budget
    # The KServe routes are not a dialect (kserve.py says why) but are set up like one.
    fronts = [*dialects, kserve.front]
    routers = [front.router for front in fronts] + [kserve.other_models, service.router]
    if settings.triton_http_url is not None:
        routers.append(kserve_metadata.router)
    for router in routers:
        app.include_router(router)
    routes = [route for router in routers for route in router.routes]
    # Any other path under /v2/ is KServe's (a Triton route the gateway does not serve): its shape.
    shapes = ErrorShapes({path: front.error_shape for front in fronts for path in front.paths},
                         by_prefix={"/v2/": kserve.front.error_shape})
    operations = [f"{method} {route.path}" for route in routes for method in sorted(route.methods)]
    install_error_handlers(app, shapes, [*operations, f"GET {app.docs_url}"])
    app.add_middleware(BodyLimits, max_body_bytes=settings.max_body_bytes, shapes=shapes, budget=budget,
                       body_timeout=settings.body_timeout)
    # Outside BodyLimits: a request to a wrong host is refused before a byte of its body is read.
    app.add_middleware(AllowedHosts, allowed_hosts=settings.allowed_hosts, shapes=shapes)
    # Added last: outermost, so it sees every status.
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       routes=[route.path for route in routes] + [app.openapi_url, app.docs_url])
    return app
