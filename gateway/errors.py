"""JSON errors of the gateway: one exception type, the body shapes, and FastAPI's handlers.

Every failure becomes a JSON body whose message says what was wrong: SGLang's / OpenAI's shape
`{"object": "error", "message", "type", "code"}` (ErrorBody) unless the dialect of the path has its
own (TEI's /rerank: `{"error", "error_type"}`, declared in dialects/tei.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..client.errors import (
    InvalidRequestError,
    RerankError,
    RerankServerError,
    RerankTimeoutError,
    ServerUnavailableError,
)

log = logging.getLogger("triton_rerank.gateway")

RETRY_AFTER_SECONDS = "1"

# Triton 2.51 does not restart a Python-backend process (stub) that died: the requests it held, and
# those sent to it until the launcher's supervisor has reloaded its model (seconds), fail with
# INTERNAL "Stub process '<instance>' is not healthy." (in an ensemble: "in ensemble 'reranker',
# ..."; some paths of the backend say "Stub process is not healthy."). Sent again a moment later,
# the same request succeeds: for the caller that is an outage to wait out (503), not a fault of
# the model (502).
_STUB_DIED = re.compile(r"\bStub process (?:'[^']*' )?is not healthy\.?$")


class GatewayError(Exception):
    """An error answer: HTTP status, a message for the caller, a short machine-readable type."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


class ErrorShape(Protocol):
    """A body model of error answers (shown in the OpenAPI schema) and how an error fills it."""

    @classmethod
    def of(cls, error: GatewayError) -> dict: ...


class ErrorBody(BaseModel):
    """Errors of every route but /rerank (the shape of SGLang's and OpenAI's error responses)."""

    object: Literal["error"] = "error"
    message: str = Field(description="what was wrong, and how to fix it")
    type: str = Field(description="validation, invalid_request, unauthorized, payload_too_large, overloaded, "
                      "unavailable, timeout, backend, not_found, internal")
    code: int = Field(description="the HTTP status")

    @classmethod
    def of(cls, error: GatewayError) -> dict:
        return {"object": "error", "message": error.message, "type": error.kind, "code": error.status}


# The refusals every rerank route can answer, for the OpenAPI schema.
ERROR_STATUSES = {
    400: "Triton refused the request (INVALID_ARG), e.g. a too-long pair with truncation off",
    401: "missing or wrong API key",
    413: "too many documents, or the body is too large",
    422: "the body does not match the schema (types, empty query or documents)",
    429: "overloaded: too many requests running and waiting",
    503: "Triton is unreachable, not ready, or restarting (a backend process or the server)",
}


def error_responses(shape: type[ErrorShape] = ErrorBody, statuses: Iterable[int] = ERROR_STATUSES) -> dict:
    """FastAPI's `responses=` for the given refusals, documented in the given body shape."""
    return {status: {"model": shape, "description": ERROR_STATUSES[status]} for status in statuses}


class ErrorShapes:
    """Which body an error on each path gets: the shape of the path's dialect, else that of the
    longest matching prefix (KServe's under /v2/, where tritonclient reads {"error"}), else ErrorBody."""

    def __init__(self, by_path: Mapping[str, type[ErrorShape]] | None = None,
                 by_prefix: Mapping[str, type[ErrorShape]] | None = None):
        self.by_path = dict(by_path or {})
        self.by_prefix = sorted((by_prefix or {}).items(), key=lambda item: -len(item[0]))

    def shape(self, path: str) -> type[ErrorShape]:
        if path in self.by_path:
            return self.by_path[path]
        return next((shape for prefix, shape in self.by_prefix if path.startswith(prefix)), ErrorBody)

    def body(self, path: str, error: GatewayError) -> dict:
        return self.shape(path).of(error)

    def response(self, path: str, error: GatewayError) -> JSONResponse:
        return JSONResponse(self.body(path, error), status_code=error.status, headers=error.headers)


def from_client_error(error: RerankError) -> GatewayError:
    """What a failed call to Triton means for the HTTP caller."""
    if isinstance(error, InvalidRequestError):
        # Triton's INVALID_ARG (HTTP 400 on Triton's own endpoint) with Triton's message.
        return GatewayError(400, str(error), "invalid_request")
    if isinstance(error, ServerUnavailableError):
        # Triton is unreachable (not started yet, restarting after it ended) or refused the load.
        return GatewayError(503, str(error), "unavailable", {"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(error, RerankServerError) and _STUB_DIED.search(str(error)):
        return GatewayError(503, f"a backend process of Triton ended and is being restarted; retry the request "
                            f"({error})", "unavailable", {"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(error, RerankTimeoutError):
        return GatewayError(504, str(error), "timeout")
    # Anything else Triton failed (an error raised by a model, a missing model): retrying the same
    # request would fail the same way.
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


def install_error_handlers(app: FastAPI, shapes: ErrorShapes, operations: Iterable[str]) -> None:
    """JSON errors in each path's shape; `operations` ('POST /v1/rerank', ...) are listed on a 404 or 405."""
    routes = ", ".join(operations)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError):
        return shapes.response(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        message = describe_validation_errors(request, error)
        return shapes.response(request.url.path, GatewayError(422, message, "validation"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code in (404, 405):
            message += f" (routes: {routes})"
        return shapes.response(request.url.path,
                               GatewayError(error.status_code, message, kind, dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        # A bug of ours: log the traceback, answer JSON rather than Starlette's plain-text 500.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return shapes.response(request.url.path,
                               GatewayError(500, f"internal error: {type(error).__name__}: {error}", "internal"))
