"""What the gateway refuses before any work: oversize bodies, too much concurrent load, a wrong API key."""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import RETRY_AFTER_SECONDS, ErrorShapes, GatewayError

_BODYLESS_METHODS = {"GET", "HEAD", "OPTIONS", "DELETE"}


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over max_body_bytes, decided before any JSON parsing.

    A declared Content-Length over the limit is refused without reading the body; otherwise the
    body is read and counted as it streams in (chunked uploads declare no length, and a declared
    length may lie), then handed to the app in one piece. The refusal has the error shape of the path.
    """

    def __init__(self, app, max_body_bytes: int, shapes: ErrorShapes | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.shapes = shapes or ErrorShapes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, send, int(declared))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, send, size, streamed=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect can come

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send, size: int, streamed: bool = False) -> None:
        seen = f"more than {self.max_body_bytes}" if streamed else str(size)
        message = (f"the request body is {seen} bytes; the limit is {self.max_body_bytes} bytes "
                   f"(--max-body-bytes): send fewer or shorter documents per request")
        body = self.shapes.body(scope["path"], GatewayError(413, message, "payload_too_large"))
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


class AdmissionLimiter:
    """At most max_concurrency requests in Triton at once, max_queue more waiting; beyond that 429.

    Refusing at once, rather than queueing without bound, keeps latency bounded under overload
    and tells load balancers and clients (Retry-After) to back off.
    """

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self.active = 0
        self.waiting = 0

    @asynccontextmanager
    async def admit(self):
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise GatewayError(
                429, f"overloaded: {self.active} requests running and {self.waiting} waiting "
                f"(--max-concurrency {self.max_concurrency}, --max-queue {self.max_queue}); retry shortly",
                "overloaded", {"Retry-After": RETRY_AFTER_SECONDS})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()


_bearer = HTTPBearer(auto_error=False, description="the gateway's --api-key, when it was started with one")


async def require_api_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """FastAPI dependency: with --api-key set, the request must carry `Authorization: Bearer <key>`."""
    expected = request.app.state.gateway.settings.api_key
    if not expected:
        return
    # compare_digest: the time taken does not reveal how much of a guessed key was right.
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise GatewayError(401, "missing or wrong API key: send the header 'Authorization: Bearer <api key>'",
                           "unauthorized", {"WWW-Authenticate": "Bearer"})
