"""The routes every gateway has besides the dialects: GET /health, /v1/models and /metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from .errors import RETRY_AFTER_SECONDS, ErrorBody, GatewayError, error_responses
from .limits import require_api_key

router = APIRouter(tags=["service"])


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton-rerank"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    triton: str = Field(description="the Triton gRPC address the gateway forwards to")


@router.get("/health", summary="200 when Triton and the reranker model are ready", response_model=Health,
            responses={503: {"model": ErrorBody, "description": "Triton is not ready"}})
async def health(request: Request):
    gateway = request.app.state.gateway
    # Asked on every call (one cheap gRPC round trip), so a load balancer sees Triton's state, not ours.
    if not await gateway.scorer.is_ready():
        raise GatewayError(503, f"{gateway.scorer.where} is not reachable or the 'reranker' model is not ready",
                           "unavailable", {"Retry-After": RETRY_AFTER_SECONDS})
    return {"status": "ok", "triton": gateway.settings.triton_url}


@router.get("/v1/models", summary="the served model (OpenAI style)", response_model=ModelList,
            responses=error_responses(statuses=[401]), dependencies=[Depends(require_api_key)])
async def models(request: Request):
    gateway = request.app.state.gateway
    name = gateway.settings.served_model_name
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": gateway.started_at, "owned_by": "triton-rerank", "root": name}]}


@router.get("/metrics", summary="Prometheus metrics of the gateway",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request):
    registry = request.app.state.gateway.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
