"""Prometheus metrics of the gateway: requests, latency and errors by route, documents, load.

Each app gets its own CollectorRegistry, so several gateways in one process (tests, or serve's
in-process gateway) never collide on metric names. Route labels are the gateway's own routes
(create_app passes them) or "other", so random paths cannot blow up label cardinality.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# nginx's status for a request whose client went away before it was answered: no answer was sent.
CLIENT_CLOSED = 499

_ERROR_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                408: "request_timeout", 413: "payload_too_large", 422: "validation", 429: "overloaded",
                CLIENT_CLOSED: "client_closed", 502: "backend", 503: "unavailable", 504: "timeout"}


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("triton_rerank_gateway_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "triton_rerank_gateway_request_duration_seconds", "time from request to response, by route",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.errors = Counter("triton_rerank_gateway_errors", "error answers (4xx, 5xx), by route and kind",
                              ["route", "kind"], registry=self.registry)
        self.documents = Counter("triton_rerank_gateway_documents", "documents scored, by route", ["route"],
                                 registry=self.registry)
        self.tokens = Counter("triton_rerank_gateway_tokens", "tokens of the scored pairs, by route", ["route"],
                              registry=self.registry)
        self.in_flight = Gauge("triton_rerank_gateway_in_flight_requests", "requests being answered",
                               registry=self.registry)
        self.buffered_bytes = Gauge("triton_rerank_gateway_buffered_request_bytes",
                                    "bytes of request bodies held or announced by Content-Length, over all connections "
                                    "(--max-buffered-bytes)",
                                    registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            kind = _ERROR_KINDS.get(status, "internal" if status >= 500 else "client_error")
            self.errors.labels(route, kind).inc()


class MetricsMiddleware:
    """ASGI middleware that times every HTTP request and counts it with its final status.

    A request whose client left before it was answered is counted as 499 "client_closed" (nginx's
    status for it), not as the 500 an unanswered request would otherwise be, nor as the status of an
    answer nobody received: the gateway did not fail, its client gave up (often a client timeout
    while Triton was busy). Noticed when the app reads http.disconnect (the client left while
    sending), or when the answer starts and the server already knows the connection is gone.
    """

    def __init__(self, app, metrics: GatewayMetrics, routes: Iterable[str]):
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = None
        client_left = False
        started = time.perf_counter()

        async def receive_and_note_disconnect():
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                client_left = True
            return message

        async def send_and_note_status(message):
            nonlocal status, client_left
            if message["type"] == "http.response.start":
                status = message["status"]
                client_left = client_left or await _already_disconnected(receive)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_and_note_disconnect, send_and_note_status)
        finally:
            self.metrics.in_flight.dec()
            if client_left:
                status = CLIENT_CLOSED
            elif status is None:  # the app raised: Starlette's error middleware answers 500
                status = 500
            self.metrics.observe(route, status, time.perf_counter() - started)


async def _already_disconnected(receive) -> bool:
    """Whether the server already has http.disconnect for the request, without waiting (as Starlette's
    Request.is_disconnected asks). Once the answer starts, whatever else receive() holds is not needed."""
    with anyio.CancelScope() as scope:
        scope.cancel()  # a receive() that would wait is cancelled at once
        return (await receive())["type"] == "http.disconnect"
    return False
