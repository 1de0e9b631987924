"""JSON errors of the gateway: one exception type, the dialect's body shape, and FastAPI's handlers.

Every failure becomes a JSON body whose message says what was wrong: SGLang's / OpenAI's shape
`{"object": "error", "message", "type", "code"}` everywhere, except on TEI's /rerank, whose clients
read `{"error", "error_type"}`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..client.errors import (
    InvalidRequestError,
    RerankError,
    RerankTimeoutError,
    ServerUnavailableError,
)

log = logging.getLogger("triton_rerank.gateway")

TEI_PATHS = {"/rerank"}
RETRY_AFTER_SECONDS = "1"


class GatewayError(Exception):
    """An error answer: HTTP status, a message for the caller, a short machine-readable type."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


def error_body(path: str, status: int, message: str, kind: str) -> dict:
    if path in TEI_PATHS:
        return {"error": message, "error_type": kind}
    return {"object": "error", "message": message, "type": kind, "code": status}


def error_response(path: str, error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(path, error.status, error.message, error.kind), status_code=error.status,
                        headers=error.headers)


def from_client_error(error: RerankError) -> GatewayError:
    """What a failed call to Triton means for the HTTP caller."""
    if isinstance(error, InvalidRequestError):
        # Triton's INVALID_ARG (HTTP 400 on Triton's own endpoint) with Triton's message.
        return GatewayError(400, str(error), "invalid_request")
    if isinstance(error, ServerUnavailableError):
        return GatewayError(503, str(error), "unavailable", {"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(error, RerankTimeoutError):
        return GatewayError(504, str(error), "timeout")
    return GatewayError(502, str(error), "backend")


def describe_validation_errors(request: Request, error: RequestValidationError) -> str:
    """One line per problem, naming the field: 'documents[2]: Input should be a valid string'."""
    content_type = request.headers.get("content-type", "")
    parts = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        field = ""
        for p in loc:
            field += f"[{p}]" if p.isdigit() else (f".{p}" if field else p)
        message = str(item.get("msg", "invalid"))
        kind = item.get("type", "")
        if kind == "json_invalid":  # its loc is a character position, not a field
            detail = (item.get("ctx") or {}).get("error", "")
            message = f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON"
            field = ""
        elif not field and "json" not in content_type.lower():
            message = (f"send the body as a JSON object with 'Content-Type: application/json' "
                       f"(got content-type {content_type or 'none'!r})")
        elif not field:
            message = f"the body must be a JSON object: {message}"
        message = message.removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts) or "the request body is invalid"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError):
        return error_response(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        message = describe_validation_errors(request, error)
        return error_response(request.url.path, GatewayError(422, message, "validation"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code in (404, 405):
            message += " (routes: POST /v1/rerank, POST /rerank, POST /v2/rerank, GET /health, GET /v1/models, " \
                       "GET /metrics, GET /docs)"
        return error_response(request.url.path,
                              GatewayError(error.status_code, message, kind, dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        # A bug of ours: log the traceback, answer JSON rather than Starlette's plain-text 500.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path,
                              GatewayError(500, f"internal error: {type(error).__name__}: {error}", "internal"))
