"""What the gateway refuses before any work: wrong hosts, oversize, slow or flooding bodies, too much load,
a wrong API key.

    Host not in --allowed-hosts            400   AllowedHosts, before the body is read
    body over --max-body-bytes             413   BodyLimits: declared, or counted as it streams in
    bodies held past --max-buffered-bytes  503   BodyLimits; Retry-After; a body is held until its request ends
    body slower than --body-timeout        408   BodyLimits
    body in more than --max-body-chunks    400   counted by LimitedH11Protocol as h11 parses the chunks
    requests over --max-concurrency and --max-queue   429   AdmissionLimiter, Retry-After

These answer in the error shape of the path; the body refusals close the connection, so that the
rest of the body is never read. Below the app, uvicorn (with LimitedH11Protocol) answers in plain
text: 503 beyond --max-connections, 400 for a head over --max-header-bytes; and it closes a
connection whose head is slower than --header-timeout, or that carries no request for
--keep-alive-timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
import h11
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import RETRY_AFTER_SECONDS, ErrorShapes, GatewayError
from .settings import BUFFERED_BODIES

_BODYLESS_METHODS = {"GET", "HEAD", "OPTIONS", "DELETE"}

# The scope extension LimitedH11Protocol sets when a chunked body passed the chunk limit (its value).
TOO_MANY_BODY_CHUNKS = "triton_rerank.too_many_body_chunks"


class BodyBudget:
    """Bytes of request bodies the gateway holds at once, over all connections, and their limit.

    One event loop takes and gives back, so no lock is needed. A body is held from its head (a
    declared Content-Length, whole) or its first byte (a chunked one) until its request has been
    answered (the app parses and forwards it), hence the whole request. A head whose body never
    comes holds its length for at most --body-timeout (then 408).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


class BodyLimits:
    """ASGI middleware: the body is read (and counted) here, whole, before the app sees a byte of it.

    A declared Content-Length over max_body_bytes, or one the budget has no room for now, is refused
    without reading the body; one that fits is taken from the budget whole, at once. Every chunk is
    counted as it streams in against max_body_bytes and, past what was taken (a chunked upload
    declares no length), against the shared budget, within body_timeout for the whole body. Then the
    app gets it in one piece. The refusal has the error shape of the path.

    503 rather than 429 when the budget is spent: the client did nothing wrong (it may have sent one
    request), the gateway is momentarily full, and a load balancer may hand the request to another
    replica, as it does on uvicorn's 503 when --max-connections is reached.
    """

    def __init__(self, app, max_body_bytes: int, shapes: ErrorShapes | None = None,
                 budget: BodyBudget | None = None, body_timeout: float = 30.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.shapes = shapes or ErrorShapes()
        self.budget = budget or BodyBudget(BUFFERED_BODIES * max_body_bytes)
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        reserved = 0  # a declared length is taken whole before its first byte
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_body_bytes:
                await self._refuse(scope, send, self._too_large(int(declared)))
                return
            # Taken now, not as the bytes arrive: many bodies each let in and then each refused half
            # way, when together they fill the budget, would leave every one of them refused.
            if not self.budget.take(int(declared)):
                await self._refuse(scope, send, self._no_room())
                return
            reserved = int(declared)
        held = reserved  # bytes taken from the budget; given back however the request ends
        received = 0
        try:
            chunks = []
            try:
                with anyio.fail_after(self.body_timeout):
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return  # the client left; nobody to answer
                        chunk_limit = scope.get("extensions", {}).get(TOO_MANY_BODY_CHUNKS)
                        if chunk_limit is not None:
                            raise GatewayError(
                                400, f"the request body came in more than {chunk_limit} chunks (--max-body-chunks): "
                                "send it in fewer, larger chunks, or with a Content-Length", "invalid_request")
                        chunk = message.get("body", b"")
                        if received + len(chunk) > self.max_body_bytes:
                            raise self._too_large(None)
                        received += len(chunk)
                        beyond = max(0, received - held)  # a chunked body; h11 ends a declared one at its length
                        if beyond and not self.budget.take(beyond):
                            raise self._no_room()
                        held += beyond
                        chunks.append(chunk)
                        if not message.get("more_body", False):
                            break
            except TimeoutError:
                await self._refuse(scope, send, GatewayError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout): "
                    "send it faster, or send less per request", "request_timeout"))
                return
            except GatewayError as error:
                await self._refuse(scope, send, error)
                return
            body = b"".join(chunks)
            del chunks
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: only http.disconnect can come

            await self.app(scope, replay, send)
        finally:
            self.budget.give_back(held)

    def _too_large(self, declared: int | None) -> GatewayError:
        seen = f"more than {self.max_body_bytes}" if declared is None else str(declared)
        return GatewayError(413, f"the request body is {seen} bytes; the limit is {self.max_body_bytes} bytes "
                            f"(--max-body-bytes): send fewer or shorter documents per request", "payload_too_large")

    def _no_room(self) -> GatewayError:
        return GatewayError(
            503, f"overloaded: the gateway holds {self.budget.used} bytes of request bodies, near its limit of "
            f"{self.budget.limit} (--max-buffered-bytes); retry shortly", "overloaded",
            {"Retry-After": RETRY_AFTER_SECONDS})

    async def _refuse(self, scope, send, error: GatewayError) -> None:
        await send_error(scope, send, self.shapes, error)


async def send_error(scope, send, shapes: ErrorShapes, error: GatewayError) -> None:
    """The error answer in the shape of the path, from ASGI middleware, closing the connection.

    Closed because the request's body is left unread: uvicorn would otherwise read and drop all of it
    to reuse the connection.
    """
    payload = json.dumps(shapes.body(scope["path"], error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


_HOST_ALLOWED = "triton_rerank.host_allowed"


async def _mark_host_allowed(scope, receive, send) -> None:
    scope[_HOST_ALLOWED] = True


class AllowedHosts:
    """ASGI middleware: 400 for a Host header not in allowed_hosts, in the error shape of the path.

    A service bound to loopback is reachable from a browser on the same machine: a web page whose
    DNS name is rebound to 127.0.0.1 could call it as its own origin, but its requests carry that
    name in Host. Starlette's TrustedHostMiddleware decides (its patterns: "example.com",
    "*.example.com", "*"); only its plain-text refusal is replaced.
    """

    def __init__(self, app, allowed_hosts: Sequence[str], shapes: ErrorShapes | None = None):
        self.app = app
        self.shapes = shapes or ErrorShapes()
        self.check = TrustedHostMiddleware(_mark_host_allowed, allowed_hosts=list(allowed_hosts), www_redirect=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.check.allow_any:
            await self.app(scope, receive, send)
            return

        async def drop_plain_text_refusal(message):
            pass

        await self.check(scope, receive, drop_plain_text_refusal)
        if scope.pop(_HOST_ALLOWED, False):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        await send_error(scope, send, self.shapes, GatewayError(
            400, f"the Host header {host!r} is not one this gateway answers to (--allowed-hosts): call it by "
            "the address it is bound to, or add the name to --allowed-hosts", "invalid_request"))


class LimitedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection (h11), with the limits uvicorn has no option for.

    Heads: --max-header-bytes for a whole request head, not only for the part h11 buffers (see
    _LimitedConnection).

    Chunks: uvicorn hands the app what arrived since the app last read, so 1,000,000 one-byte
    chunks reach it as a few dozen messages, after h11 took the event loop for over ten seconds to
    parse them. Counted here as h11 parses them, the chunks of one body stop at max_body_chunks: the
    connection reads no more, marks the request's scope (TOO_MANY_BODY_CHUNKS) and wakes the app,
    and BodyLimits answers 400; the connection is closed after that answer.

    Slow heads: a request head must be complete header_timeout seconds after its first byte, and a
    new connection must start a request within the keep-alive timeout, as uvicorn asks of an idle
    kept-alive one; otherwise the connection is closed. uvicorn times neither, so a client sending
    its headers a byte at a time (slowloris) would hold a connection slot for ever.
    """

    def __init__(self, *args, max_body_chunks: int, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        # h11's own default when uvicorn is not told one (server.py always tells it).
        max_head = self.config.h11_max_incomplete_event_size or 16 * 1024
        self.conn = _LimitedConnection(max_head, max_body_chunks, self._too_many_chunks)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        reading_a_head = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if reading_a_head and self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)
        elif not reading_a_head:
            self._cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        # h11 cannot answer a request it has not read the head of: closing is the answer.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _too_many_chunks(self) -> None:
        self.scope.setdefault("extensions", {})[TOO_MANY_BODY_CHUNKS] = self.conn.max_chunks
        if self.cycle.response_complete:  # answered without reading the body: only the connection is left
            self.transport.close()
        else:
            self.cycle.keep_alive = False  # the rest of the body is never read: close after the answer
            self.cycle.message_event.set()  # wake a receive() that waits for more body


class _LimitedConnection(h11.Connection):
    """h11's server connection, bounding the request head and the chunks of a body.

    h11 bounds only the part of a head it buffers while waiting for the rest: a whole head that
    arrives in one read (up to 256 KiB) would pass. Here it is measured once parsed; over max_head,
    uvicorn answers its 400 for a malformed request. At the chunk past max_chunks of a body it stops
    for good (PAUSED: uvicorn reads no more from the socket).
    """

    def __init__(self, max_head: int, max_chunks: int, on_too_many):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.max_chunks = max_chunks
        self.on_too_many = on_too_many
        self.chunks = 0
        self.stopped = False

    def next_event(self):
        if self.stopped:
            return h11.PAUSED
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.chunks = 0
            size = len(event.method) + len(event.target) + sum(len(name) + len(value) + 4
                                                               for name, value in event.headers)
            if size > self.max_head:
                raise h11.RemoteProtocolError(f"request head over {self.max_head} bytes", error_status_hint=431)
        elif isinstance(event, h11.Data) and event.chunk_start:
            self.chunks += 1
            if self.chunks > self.max_chunks:
                self.stopped = True
                self.on_too_many()
                return h11.PAUSED
        return event


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
