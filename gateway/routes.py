"""The gateway's routes: each rerank dialect is a thin map onto the one ensemble call."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..client.ranking import rank
from .errors import GatewayError
from .limits import require_api_key
from .protocol import (
    CohereRerankRequest,
    CohereRerankResponse,
    ErrorBody,
    Health,
    ModelList,
    SGLangRerankItem,
    SGLangRerankRequest,
    TEIErrorBody,
    TEIRank,
    TEIRerankRequest,
)

router = APIRouter()

_ERRORS = {status: {"model": ErrorBody, "description": description} for status, description in {
    400: "Triton refused the request (INVALID_ARG), e.g. a too-long pair with truncation off",
    401: "missing or wrong API key",
    413: "too many documents, or the body is too large",
    422: "the body does not match the schema (types, empty query or documents)",
    429: "overloaded: too many requests running and waiting",
    503: "Triton is unreachable or not ready",
}.items()}
_TEI_ERRORS = {status: {"model": TEIErrorBody, "description": e["description"]} for status, e in _ERRORS.items()}
_AUTH = [Depends(require_api_key)]


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@router.post("/v1/rerank", tags=["rerank"], summary="SGLang's rerank", response_model=list[SGLangRerankItem],
             responses=_ERRORS, dependencies=_AUTH)
async def sglang_rerank(body: SGLangRerankRequest, request: Request):
    """Documents sorted by descending raw logit (ties keep input order), as SGLang's `/v1/rerank` answers."""
    started = time.perf_counter()
    scored = await request.app.state.gateway.score("/v1/rerank", body.query, body.documents, truncate=True)
    latency = time.perf_counter() - started
    request_id = _request_id("rerank")
    items = []
    for r in rank(scored, body.documents, body.top_n, body.return_documents):
        item = {"score": r.score}
        if body.return_documents:
            item["document"] = r.document
        item["index"] = r.index
        # The fields of SGLang's per-pair meta_info that mean something here (finish_reason does not).
        item["meta_info"] = {"id": f"{request_id}-{r.index}", "prompt_tokens": r.token_count,
                             "completion_tokens": 0, "e2e_latency": latency}
        items.append(item)
    return JSONResponse(items)


@router.post("/rerank", tags=["rerank"], summary="text-embeddings-inference's rerank", response_model=list[TEIRank],
             responses=_TEI_ERRORS, dependencies=_AUTH)
async def tei_rerank(body: TEIRerankRequest, request: Request):
    """Documents sorted by descending score: sigmoid of the logit, or the raw logit with `raw_scores`."""
    scored = await request.app.state.gateway.score("/rerank", body.query, body.texts, truncate=bool(body.truncate))
    ranks = []
    for r in rank(scored, body.texts, normalize=not body.raw_scores):
        item = {"index": r.index}
        if body.return_text:
            item["text"] = r.document
        item["score"] = r.score
        ranks.append(item)
    return JSONResponse(ranks)


@router.post("/v2/rerank", tags=["rerank"], summary="Cohere v2 / Jina rerank", response_model=CohereRerankResponse,
             responses=_ERRORS, dependencies=_AUTH)
async def cohere_rerank(body: CohereRerankRequest, request: Request):
    """Results sorted by descending relevance_score (sigmoid of the logit, 0..1), with token usage."""
    gateway = request.app.state.gateway
    texts = body.document_texts()
    scored = await gateway.score("/v2/rerank", body.query, texts, truncate=True)
    results = []
    for r in rank(scored, texts, body.top_n, normalize=True):
        result = {"index": r.index, "relevance_score": r.score}
        if body.return_documents:
            result["document"] = {"text": r.document}
        results.append(result)
    tokens = scored.total_tokens
    return JSONResponse({
        "id": str(uuid.uuid4()),
        "model": body.model or gateway.settings.served_model_name,
        "results": results,
        "meta": {"api_version": {"version": "2"}, "tokens": {"input_tokens": tokens, "output_tokens": 0}},
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
    })


@router.get("/health", tags=["service"], summary="200 when Triton and the reranker model are ready",
            response_model=Health, responses={503: {"model": ErrorBody, "description": "Triton is not ready"}})
async def health(request: Request):
    gateway = request.app.state.gateway
    # Asked on every call (one cheap gRPC round trip), so a load balancer sees Triton's state, not ours.
    if not await gateway.scorer.is_ready():
        raise GatewayError(503, f"{gateway.scorer.where} is not reachable or the 'reranker' model is not ready",
                           "unavailable", {"Retry-After": "1"})
    return {"status": "ok", "triton": gateway.settings.triton_url}


@router.get("/v1/models", tags=["service"], summary="the served model (OpenAI style)", response_model=ModelList,
            responses={401: _ERRORS[401]}, dependencies=_AUTH)
async def models(request: Request):
    gateway = request.app.state.gateway
    name = gateway.settings.served_model_name
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": gateway.started_at, "owned_by": "triton-rerank", "root": name}]}


@router.get("/metrics", tags=["service"], summary="Prometheus metrics of the gateway",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request):
    registry = request.app.state.gateway.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
