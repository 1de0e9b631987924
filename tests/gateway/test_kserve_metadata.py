"""KServe v2 health and metadata through the gateway (gateway/kserve_metadata.py), against a
stand-in for Triton's HTTP frontend (a real HTTP server on loopback that records what it is asked).

The same routes through `serve` and the real tritonserver: tests/e2e/test_server_restart.py."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from triton_rerank.gateway.app import GatewaySettings, create_app
from triton_rerank.launcher.server import free_ports


class NoScorer:
    """The gateway's gRPC side, never called by these routes."""

    where = "nowhere"

    async def score(self, query, documents, truncate=None, **options):
        raise AssertionError("a read must not reach the ensemble")

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


class TritonHTTP(ThreadingHTTPServer):
    """Answers every GET with {"path": <path asked>}; /v2/health/ready with 400 (not ready), as Triton does."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.asked.append(("GET", self.path))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(400 if self.path == "/v2/health/ready" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802
                server.asked.append(("POST", self.path))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def triton_http():
    server = TritonHTTP()
    yield server
    server.shutdown()
    server.server_close()


def gateway(triton_http_url):
    return TestClient(create_app(GatewaySettings(triton_http_url=triton_http_url), NoScorer()))


@pytest.mark.parametrize("path", [
    "/v2/health/live", "/v2", "/v2/models/reranker", "/v2/models/reranker/versions/1",
    "/v2/models/reranker/ready", "/v2/models/tokenizer/versions/1/ready",
])
def test_reads_are_answered_by_triton_unchanged(triton_http, path):
    answer = gateway(triton_http.url).get(path)
    assert answer.status_code == 200 and answer.json() == {"path": path}
    assert answer.headers["content-type"] == "application/json"
    assert triton_http.asked == [("GET", path)]


def test_triton_statuses_pass_through(triton_http):
    answer = gateway(triton_http.url).get("/v2/health/ready")
    assert answer.status_code == 400 and answer.json() == {"path": "/v2/health/ready"}


def test_a_model_name_stays_one_path_segment(triton_http):
    # %3F is a "?" in the name, %20 a space: sent on quoted, never as a query string or a new segment.
    answer = gateway(triton_http.url).get("/v2/models/x%3Fy%20z/ready")
    assert answer.status_code == 200
    assert triton_http.asked == [("GET", "/v2/models/x%3Fy%20z/ready")]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/stats", 403),
    ("GET", "/v2/models/reranker/stats", 404),
    ("GET", "/v2/models/tokenizer/config", 404),  # the steps' configurations stay closed
    ("GET", "/v2/models/cross_encoder/versions/1/config", 404),
    ("POST", "/v2/repository/index", 404),
    ("POST", "/v2/repository/models/reranker/unload", 404),
    ("GET", "/v2/systemsharedmemory/status", 404),
    ("POST", "/v2/systemsharedmemory/region/r/register", 404),
    ("GET", "/v2/trace/setting", 404),
    ("GET", "/v2/logging", 404),
    ("POST", "/v2/health/ready", 405),
    ("GET", "/v2/models/reranker/../../repository/index", 404),
])
def test_nothing_else_of_tritons_http_api_is_forwarded(triton_http, method, path, status):
    answer = gateway(triton_http.url).request(method, path, content=b"{}" if method == "POST" else None)
    assert answer.status_code == status, answer.text
    assert triton_http.asked == []


@pytest.mark.parametrize("path", ["/v2/models/reranker/config", "/v2/models/reranker/versions/1/config"])
def test_the_ensembles_configuration_is_forwarded(triton_http, path):
    # The service's contract, with reranker_kind (what SCORES mean), which RerankClient.reranker_kind reads.
    answer = gateway(triton_http.url).get(path)
    assert answer.status_code == 200 and answer.json() == {"path": path}
    assert triton_http.asked == [("GET", path)]


def test_unreachable_triton_is_a_503_with_retry_after():
    (port,) = free_ports(1)  # nothing listens there
    answer = gateway(f"127.0.0.1:{port}").get("/v2/health/live")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "Triton is not reachable" in answer.json()["error"]


def test_without_tritons_http_address_the_reads_are_not_served(triton_http):
    assert gateway(None).get("/v2/health/live").status_code == 404
    assert triton_http.asked == []


def test_what_is_not_served_under_v2_is_refused_in_kserves_shape(triton_http):
    client = gateway(triton_http.url)
    answer = client.get("/v2/models/tokenizer/config")
    # {"error": ...}: what tritonclient reads (tests/e2e/test_server_restart.py asks it for real).
    assert answer.status_code == 404 and list(answer.json()) == ["error"]
    assert "GET /v2/models/tokenizer/config: Not Found" in answer.json()["error"]
    # Cohere's /v2/rerank keeps its own shape; a path outside /v2/ keeps the gateway's.
    assert "message" in client.post("/v2/rerank", json={}).json()
    assert "message" in client.get("/nowhere").json()
    assert triton_http.asked == []
