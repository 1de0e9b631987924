"""The gateway's body, host and connection limits, driven as ASGI calls (no server); metrics of a client that left.

tests/e2e/test_gateway_limits.py runs the same limits against a real uvicorn, over sockets.
"""

import asyncio
import functools
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from triton_rerank.cli import build_parser
from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway.app import GatewaySettings, create_app
from triton_rerank.gateway.command import gateway_settings
from triton_rerank.gateway.dialects.tei import TEIErrorBody
from triton_rerank.gateway.errors import ErrorShapes
from triton_rerank.gateway.kserve import KServeErrorBody
from triton_rerank.gateway.limits import TOO_MANY_BODY_CHUNKS, BodyBudget, BodyLimits, LimitedH11Protocol
from triton_rerank.gateway.settings import GatewayStartError, default_allowed_hosts

SHAPES = ErrorShapes({"/rerank": TEIErrorBody, "/v2/models/reranker/infer": KServeErrorBody})


class FakeTriton:
    where = "Triton at fake:8001 (grpc)"

    def __init__(self):
        self.calls = []

    async def score(self, query, documents, truncate=None, **options):
        self.calls.append(documents)
        return ScoredDocuments(np.zeros(len(documents), dtype=np.float32), np.ones(len(documents), dtype=np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def scope_for(path="/v1/rerank", method="POST", headers=(), extensions=None):
    scope = {"type": "http", "method": method, "path": path, "headers": [(k.encode(), v.encode()) for k, v in headers]}
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


class Echo:
    """The app behind the limits: reads the body, answers 200 with its length; can fail or check the budget."""

    def __init__(self, budget=None, error=None):
        self.budget, self.error = budget, error
        self.bodies = []
        self.held_while_answering = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        if self.budget is not None:
            self.held_while_answering.append(self.budget.used)
        if self.error:
            raise self.error
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(message["body"])).encode()})


async def call(app, scope, messages):
    """Runs one request; `messages` are what receive() returns in turn (an asyncio.Event: wait for it)."""
    pending = list(messages)
    sent = []

    async def receive():
        item = pending.pop(0)
        while isinstance(item, asyncio.Event):
            await item.wait()
            item = pending.pop(0)
        return item

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return None, {}, None
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], headers, json.loads(body) if headers.get("content-type") == "application/json" else body


def part(body: bytes, more=True):
    return {"type": "http.request", "body": body, "more_body": more}


DISCONNECT = {"type": "http.disconnect"}


def test_a_body_that_would_pass_the_shared_budget_is_503_and_the_bytes_come_back():
    async def scenario():
        budget = BodyBudget(100)
        echo = Echo(budget)
        limits = BodyLimits(echo, max_body_bytes=80, shapes=SHAPES, budget=budget)
        go_on = asyncio.Event()
        first = asyncio.create_task(call(limits, scope_for(), [part(b"a" * 60), go_on, part(b"a" * 10, more=False)]))
        await asyncio.sleep(0.01)
        assert budget.used == 60  # counted as it streams in, before the body is complete
        refused = await call(limits, scope_for("/rerank"), [part(b"b" * 30), part(b"b" * 20, more=False)])
        assert budget.used == 60  # the refused request's 30 bytes came back
        go_on.set()
        answered = await first
        return budget, echo, refused, answered

    budget, echo, (status, headers, body), answered = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert body["error_type"] == "overloaded" and "--max-buffered-bytes" in body["error"]  # TEI's shape on /rerank
    assert "limit of 100" in body["error"]
    assert answered[:2] == (200, {}) and echo.bodies == [b"a" * 70]
    assert echo.held_while_answering == [70]  # held until the request has been answered
    assert budget.used == 0


def test_a_declared_length_without_room_is_refused_before_reading():
    async def scenario():
        budget = BodyBudget(100)
        budget.take(60)
        limits = BodyLimits(Echo(), max_body_bytes=80, budget=budget)
        # No message to receive: reading one would fail the test.
        return await call(limits, scope_for(headers=[("content-length", "50")]), [])

    status, _, body = asyncio.run(scenario())
    assert status == 503 and body["type"] == "overloaded" and "holds 60 bytes" in body["message"]


def test_declared_lengths_are_taken_whole_so_bodies_that_fit_are_not_refused_half_way():
    """Five 40-byte bodies start at once against a 100-byte budget and stream in 10 bytes at a time.

    Were the bytes taken only as they arrive, all five would pass the check on their heads and then all
    be refused part way, once together they held 100 bytes; taken whole, two are read and three refused.
    """
    async def scenario():
        budget = BodyBudget(100)
        echo = Echo(budget)
        limits = BodyLimits(echo, max_body_bytes=80, budget=budget)
        go_on = asyncio.Event()
        pieces = [part(b"x" * 10), go_on, part(b"x" * 10), part(b"x" * 10), part(b"x" * 10, more=False)]
        requests = [asyncio.create_task(call(limits, scope_for(headers=[("content-length", "40")]), list(pieces)))
                    for _ in range(5)]
        await asyncio.sleep(0.01)
        held_while_streaming = budget.used
        go_on.set()
        results = await asyncio.gather(*requests)
        return held_while_streaming, results, echo, budget.used

    held_while_streaming, results, echo, used = asyncio.run(scenario())
    assert held_while_streaming == 80  # two bodies' declared lengths, before their bytes came in
    assert sorted(status for status, _, _ in results) == [200, 200, 503, 503, 503]
    assert echo.bodies == [b"x" * 40] * 2
    assert echo.held_while_answering == [80, 40]  # each held until answered, then given back
    assert used == 0


def test_a_chunked_body_is_counted_against_the_budget_as_it_streams_in():
    async def scenario():
        budget = BodyBudget(100)
        limits = BodyLimits(Echo(budget), max_body_bytes=200, budget=budget)
        go_on = asyncio.Event()
        task = asyncio.create_task(call(limits, scope_for(), [part(b"x" * 30), go_on, part(b"x" * 90, more=False)]))
        await asyncio.sleep(0.01)
        held = budget.used
        go_on.set()
        return held, await task, budget.used

    held, (status, _, body), used = asyncio.run(scenario())
    assert held == 30 and status == 503 and body["type"] == "overloaded" and used == 0


@pytest.mark.parametrize("ending", ["disconnect", "app error", "too large"])
def test_the_bytes_come_back_however_the_request_ends(ending):
    async def scenario():
        budget = BodyBudget(1000)
        limits = BodyLimits(Echo(budget, error=RuntimeError("bug") if ending == "app error" else None),
                            max_body_bytes=100, budget=budget)
        messages = {"disconnect": [part(b"x" * 40), DISCONNECT],
                    "app error": [part(b"x" * 40), part(b"y", more=False)],
                    "too large": [part(b"x" * 40), part(b"y" * 70, more=False)]}[ending]
        try:
            result = await call(limits, scope_for(), messages)
        except RuntimeError:
            result = "raised"
        return budget.used, result

    used, result = asyncio.run(scenario())
    assert used == 0
    if ending == "disconnect":
        assert result == (None, {}, None)  # nobody to answer
    elif ending == "app error":
        assert result == "raised"
    else:
        assert result[0] == 413 and "--max-body-bytes" in result[2]["message"]


def test_a_slow_body_is_408_and_closes_the_connection():
    async def scenario():
        budget = BodyBudget(1000)
        limits = BodyLimits(Echo(), max_body_bytes=100, budget=budget, body_timeout=0.2)
        never = asyncio.Event()
        started = time.monotonic()
        result = await call(limits, scope_for(), [part(b"x" * 10), never])
        return result, time.monotonic() - started, budget.used

    (status, headers, body), seconds, used = asyncio.run(scenario())
    assert status == 408 and headers["connection"] == "close" and 0.2 <= seconds < 2
    assert body["type"] == "request_timeout" and "within 0.2 s (--body-timeout)" in body["message"]
    assert used == 0


def test_a_body_the_connection_marked_as_too_many_chunks_is_400():
    async def scenario():
        limits = BodyLimits(Echo(), max_body_bytes=100, shapes=SHAPES)
        scope = scope_for("/v2/models/reranker/infer", extensions={TOO_MANY_BODY_CHUNKS: 65536})
        return await call(limits, scope, [part(b"x")])

    status, headers, body = asyncio.run(scenario())
    assert status == 400 and headers["connection"] == "close"
    assert body == {"error": "the request body came in more than 65536 chunks (--max-body-chunks): send it in "
                    "fewer, larger chunks, or with a Content-Length"}  # KServe's shape on its path


def test_bodyless_methods_pass_untouched():
    async def scenario():
        budget = BodyBudget(10)
        return await call(BodyLimits(Echo(budget), max_body_bytes=5, budget=budget),
                          scope_for(method="GET"), [part(b"x" * 50, more=False)])

    assert asyncio.run(scenario())[0] == 200


def client_for(**settings):
    fake = FakeTriton()
    return TestClient(create_app(GatewaySettings(**settings), fake)), fake


@pytest.mark.parametrize(("path", "body", "refusal"), [
    ("/v1/rerank", {"query": "q", "documents": ["a"]}, lambda m: {"object": "error", "message": m,
                                                                  "type": "invalid_request", "code": 400}),
    ("/rerank", {"query": "q", "texts": ["a"]}, lambda m: {"error": m, "error_type": "invalid_request"}),
    ("/v2/models/reranker/generate", {"QUERY": "q", "DOCUMENTS": ["a"]}, lambda m: {"error": m}),
])
def test_a_host_not_allowed_is_400_in_the_path_shape(path, body, refusal):
    client, fake = client_for(allowed_hosts=default_allowed_hosts("127.0.0.1"))
    response = client.post(path, json=body, headers={"host": "rebound.example:30000"})
    message = ("the Host header 'rebound.example:30000' is not one this gateway answers to (--allowed-hosts): "
               "call it by the address it is bound to, or add the name to --allowed-hosts")
    assert response.status_code == 400 and response.json() == refusal(message)
    assert fake.calls == []
    for host in ("127.0.0.1:30000", "localhost", "LOCALHOST:30000", "[::1]:30000"):
        assert client.post(path, json=body, headers={"host": host}).status_code == 200, host
    assert client.get("/health", headers={"host": "rebound.example"}).status_code == 400


def test_allowed_host_patterns():
    client, _ = client_for(allowed_hosts=("rerank.example.com", "*.internal"))
    body = {"query": "q", "documents": ["a"]}
    for host, status in [("rerank.example.com", 200), ("a.b.internal:8080", 200), ("internal", 400),
                         ("example.com", 400), ("127.0.0.1", 400)]:
        assert client.post("/v1/rerank", json=body, headers={"host": host}).status_code == status, host
    anything, _ = client_for()  # in-process gateways answer any host unless told
    assert anything.post("/v1/rerank", json=body, headers={"host": "whatever"}).status_code == 200


def test_default_allowed_hosts_follow_the_bound_address():
    assert default_allowed_hosts("0.0.0.0") == ("*",) and default_allowed_hosts("::") == ("*",)
    assert default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "[::1]")
    assert default_allowed_hosts("10.1.2.3") == ("10.1.2.3", "localhost", "127.0.0.1", "[::1]")
    assert default_allowed_hosts("::1") == ("[::1]", "localhost", "127.0.0.1")
    assert default_allowed_hosts("Rerank.Local") == ("rerank.local", "localhost", "127.0.0.1", "[::1]")


@pytest.mark.parametrize(("settings", "expected"), [
    ({"max_body_bytes": 100, "max_buffered_bytes": 50}, "--max-buffered-bytes (50) is below --max-body-bytes (100)"),
    ({"body_timeout": 0}, "--body-timeout must be positive"),
    ({"allowed_hosts": ("ex*ample.com",)}, "'ex*ample.com' is not a host name"),
    ({"allowed_hosts": ()}, "--allowed-hosts is empty"),
])
def test_limits_that_do_not_fit_together_are_refused_at_start(settings, expected):
    with pytest.raises(GatewayStartError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        GatewaySettings(**settings)


def test_the_command_line_sets_every_limit():
    args = build_parser().parse_args([
        "api", "--host", "10.0.0.5", "--max-buffered-bytes", "1000000000", "--max-body-chunks", "100",
        "--body-timeout", "7", "--header-timeout", "3", "--keep-alive-timeout", "65", "--max-connections", "50",
        "--max-header-bytes", "32768"])
    settings = gateway_settings(args, "t:8001", args.host, args.port, "info", default_model_name="reranker")
    assert (settings.max_buffered_bytes, settings.max_body_chunks, settings.body_timeout, settings.header_timeout,
            settings.keep_alive_timeout, settings.max_connections, settings.max_header_bytes) == (
        1000000000, 100, 7.0, 3.0, 65.0, 50, 32768)
    assert settings.allowed_hosts == ("10.0.0.5", "localhost", "127.0.0.1", "[::1]")
    listed = build_parser().parse_args(["api", "--allowed-hosts", "rerank.example.com, *.internal,::1"])
    assert gateway_settings(listed, "t:8001", listed.host, listed.port, "info", "reranker").allowed_hosts == (
        "rerank.example.com", "*.internal", "[::1]")
    # Unless told, the held bytes follow the body size: a larger body limit alone still starts.
    larger = build_parser().parse_args(["api", "--max-body-bytes", "100000000"])
    assert gateway_settings(larger, "t:8001", "127.0.0.1", 1, "info", "reranker").max_buffered_bytes == 400000000
    assert GatewaySettings().max_buffered_bytes == 64 * 1024 * 1024
    exposed = build_parser().parse_args(["api", "--host", "0.0.0.0"])
    assert gateway_settings(exposed, "t:8001", "0.0.0.0", 1, "info", "reranker").allowed_hosts == ("*",)
    # serve takes the same options for its gateway.
    serve = build_parser().parse_args(["serve", "--model-path", "m", "--max-body-chunks", "9", "--allowed-hosts", "*"])
    assert serve.max_body_chunks == 9 and serve.allowed_hosts == "*"


def test_api_reports_limits_that_do_not_fit(capsys):
    from triton_rerank.cli import main

    assert main(["api", "--max-body-bytes", "100", "--max-buffered-bytes", "10"]) == 2
    assert "error: --max-buffered-bytes (10) is below --max-body-bytes (100)" in capsys.readouterr().err


def test_uvicorn_runs_the_limited_connection_with_the_settings():
    from triton_rerank.gateway.server import uvicorn_server

    config = uvicorn_server(GatewaySettings(max_body_chunks=7, header_timeout=2.5, keep_alive_timeout=9,
                                            max_connections=33, max_header_bytes=4096)).config
    assert isinstance(config.http, functools.partial) and config.http.func is LimitedH11Protocol
    assert config.http.keywords == {"max_body_chunks": 7, "header_timeout": 2.5}
    assert (config.timeout_keep_alive, config.limit_concurrency, config.h11_max_incomplete_event_size) == (9, 33, 4096)


def test_a_client_that_leaves_mid_body_is_499_not_500():
    async def scenario():
        app = create_app(GatewaySettings(), FakeTriton())
        result = await call(app, scope_for(headers=[("host", "127.0.0.1"), ("content-type", "application/json")])
                            | {"query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 1)},
                            [part(b'{"query": '), DISCONNECT])
        return app, result

    app, result = asyncio.run(scenario())
    assert result == (None, {}, None)
    text = TestClient(app).get("/metrics").text
    assert 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="499"} 1.0' in text
    assert 'triton_rerank_gateway_errors_total{kind="client_closed",route="/v1/rerank"} 1.0' in text
    assert 'status="500"' not in text
    assert "triton_rerank_gateway_buffered_request_bytes 0.0" in text
