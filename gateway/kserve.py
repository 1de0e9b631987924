"""KServe v2 inference of the `reranker` ensemble through the gateway, answering 4xx where Triton answers 500.

    POST /v2/models/reranker[/versions/1]/infer      KServe v2 JSON, or JSON plus binary tensors
    POST /v2/models/reranker[/versions/1]/generate   Triton's generate extension

deploy/nginx.conf sends these paths here instead of to Triton, and `triton-rerank serve` serves
the gateway on its public HTTP port (Triton's own HTTP frontend on loopback; kserve_metadata.py
answers the reads), so that the documented front validates them (kserve_protocol.py) before the
ensemble sees them; valid requests go through the same ensemble call as the dialects (limits,
admission, API key, metrics) and come back in Triton's response shapes. Errors are KServe's `{"error": "..."}`, which tritonclient reads.

Not a dialect (dialects/): those are JSON bodies that FastAPI validates and rankings they answer;
this is Triton's tensor protocol, whose body may be binary and whose answer is the raw tensors.
It builds on the same Dialect router (API key, error shape by path) and create_app registers it
beside the dialects. Its routes are left out of /openapi.json: KServe's own specification
describes them, and the binary form has no JSON schema. Other models' infer paths answer 404.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ..client.triton_io import MODEL_NAME
from .dialect import Dialect
from .ensemble import GatewayState, score_options
from .errors import RETRY_AFTER_SECONDS, GatewayError
from .kserve_protocol import (
    HEADER_LENGTH,
    MODEL_VERSION,
    RerankCall,
    TensorError,
    generate_response,
    infer_response,
    read_generate_request,
    read_infer_request,
)


class KServeErrorBody(BaseModel):
    """Errors of the KServe routes (KServe v2's and Triton's shape)."""

    error: str

    @classmethod
    def of(cls, error: GatewayError) -> dict:
        return {"error": error.message}


front = Dialect(KServeErrorBody)

_MODEL = f"/v2/models/{MODEL_NAME}"
_VERSION = f"{_MODEL}/versions/{MODEL_VERSION}"


@front.post(f"{_MODEL}/infer", include_in_schema=False)
@front.post(f"{_VERSION}/infer", include_in_schema=False)
async def infer(request: Request):
    """KServe v2 inference: SCORES [1, N] FP32, TOKEN_COUNTS and CHUNK_COUNTS [1, N] INT32, as JSON data or binary."""
    gateway: GatewayState = request.app.state.gateway
    async with _decoded_body(request, gateway.settings.max_body_bytes) as body:
        call = _read(lambda: read_infer_request(body, request.headers.get(HEADER_LENGTH),
                                                gateway.settings.max_documents))
        payload, header_length = infer_response(call, await _score(request, call))
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


@front.post(f"{_MODEL}/generate", include_in_schema=False)
@front.post(f"{_VERSION}/generate", include_in_schema=False)
async def generate(request: Request):
    """Triton's generate extension: {"QUERY": "...", "DOCUMENTS": [...]} -> {"SCORES": [...], ...}."""
    gateway: GatewayState = request.app.state.gateway
    async with _decoded_body(request, gateway.settings.max_body_bytes) as body:
        call = _read(lambda: read_generate_request(body))
        return JSONResponse(generate_response(await _score(request, call)))


def _read(parse) -> RerankCall:
    try:
        return parse()
    except TensorError as error:
        kind = "payload_too_large" if error.status == 413 else "invalid_request"
        raise GatewayError(error.status, str(error), kind) from None


async def _score(request: Request, call: RerankCall):
    gateway: GatewayState = request.app.state.gateway
    options = score_options(**call.options)
    return await gateway.score(request.scope["route"].path, call.query, call.documents, options)


# Triton takes gzip and deflate request bodies (tritonclient's request_compression_algorithm).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


@asynccontextmanager
async def _decoded_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body, decompressed when it is sent gzip or deflate; never more than `limit` bytes of it.

    The inflated bytes are held against the gateway's shared body budget (--max-buffered-bytes)
    until the request is answered: a small compressed body must not get around that cap.
    """
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        yield body
        return
    data = _inflate(body, encoding, limit)
    budget = getattr(request.app.state, "body_budget", None)
    if budget is not None and not budget.take(len(data)):
        raise GatewayError(503, f"overloaded: the gateway holds {budget.used} bytes of request bodies, near its "
                           f"limit of {budget.limit} (--max-buffered-bytes); retry shortly", "overloaded",
                           {"Retry-After": RETRY_AFTER_SECONDS})
    try:
        yield data
    finally:
        if budget is not None:
            budget.give_back(len(data))


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding not in _WBITS:
        raise GatewayError(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed, "
                           "gzip or deflate", "unsupported_media_type")
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        # Bounded: a small compressed body must not expand past the body size limit in memory.
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise GatewayError(400, f"the body is not valid {encoding} data ({error})", "invalid_request") from None
    if len(data) > limit:
        raise GatewayError(413, f"the decompressed request body is more than {limit} bytes; the limit is {limit} "
                           "bytes (--max-body-bytes): send fewer or shorter documents per request", "payload_too_large")
    if not inflater.eof:
        raise GatewayError(400, f"the {encoding} body is cut short", "invalid_request")
    return data


# Any other model or version: 404 in KServe's shape, so that tritonclient reads the reason.
other_models = APIRouter()


@other_models.post("/v2/models/{model}/infer", include_in_schema=False)
@other_models.post("/v2/models/{model}/generate", include_in_schema=False)
@other_models.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
@other_models.post("/v2/models/{model}/versions/{version}/generate", include_in_schema=False)
async def not_served(request: Request):
    model, version = request.path_params["model"], request.path_params.get("version")
    asked = f"model '{model}'" + (f" version {version}" if version is not None else "")
    return JSONResponse({"error": f"{asked} is not served here: the gateway answers KServe v2 inference only for "
                         f"'{MODEL_NAME}' version {MODEL_VERSION} ({_MODEL}/infer, {_MODEL}/generate)"},
                        status_code=404)
