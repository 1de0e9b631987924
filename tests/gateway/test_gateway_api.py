"""The gateway's dialects, limits and errors, on FastAPI's test client with a fake Triton."""

import asyncio

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from triton_rerank.client.errors import InvalidRequestError, RerankTimeoutError, ServerUnavailableError
from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway.app import GatewaySettings, create_app
from triton_rerank.gateway.limits import AdmissionLimiter

DOCUMENTS = ["hi", "The giant panda is a bear.", "pandas eat bamboo", "tie"]
LOGITS = {"hi": -2.0, "The giant panda is a bear.": 3.0, "pandas eat bamboo": 1.0, "tie": 1.0}


class FakeTriton:
    """Scores each document by a fixed table; token count = characters; can fail or be slow."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self, error=None, delay=0.0, ready=True):
        self.error, self.delay, self.ready = error, delay, ready
        self.calls = []
        self.options = []  # the keyword options of each call (ScoreOptions' fields but truncate)

    async def score(self, query, documents, truncate=None, **options):
        self.calls.append((query, list(documents), truncate))
        self.options.append(options)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        scores = np.array([LOGITS.get(d, 0.0) for d in documents], dtype=np.float32)
        return ScoredDocuments(scores, np.array([len(d) for d in documents], dtype=np.int32))

    async def is_ready(self, timeout=2.0):
        return self.ready

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def client_for(fake=None, **settings):
    fake = fake or FakeTriton()
    return TestClient(create_app(GatewaySettings(**settings), fake)), fake


def test_sglang_bare_list_sorted_with_raw_logits_and_meta_info():
    client, fake = client_for()
    response = client.post("/v1/rerank", json={"model": "BAAI/bge-reranker-v2-m3", "query": "what is panda?",
                                               "documents": DOCUMENTS})
    assert response.status_code == 200
    items = response.json()
    # Descending; the tie (documents 2 and 3, both 1.0) keeps input order.
    assert [i["index"] for i in items] == [1, 2, 3, 0]
    assert [i["score"] for i in items] == [3.0, 1.0, 1.0, -2.0]
    assert [i["document"] for i in items] == [DOCUMENTS[i["index"]] for i in items]
    assert list(items[0]) == ["score", "document", "index", "meta_info"]
    assert items[0]["meta_info"]["prompt_tokens"] == len(DOCUMENTS[1])
    # SGLang has no truncation field and never refuses a long document.
    assert fake.calls == [("what is panda?", DOCUMENTS, True)]
    assert fake.options[-1]["long_documents"] is None


def test_sglang_top_n_and_return_documents_false():
    client, _ = client_for()
    items = client.post("/v1/rerank", json={"query": "q", "documents": DOCUMENTS, "top_n": 2,
                                            "return_documents": False}).json()
    assert [i["index"] for i in items] == [1, 2]
    assert all("document" not in i for i in items)


def test_tei_sigmoid_unless_raw_scores_and_text_only_when_asked():
    client, fake = client_for()
    ranks = client.post("/rerank", json={"query": "q", "texts": DOCUMENTS}).json()
    assert [r["index"] for r in ranks] == [1, 2, 3, 0]
    assert ranks[0]["score"] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-15)
    assert all(set(r) == {"index", "score"} for r in ranks)
    raw = client.post("/rerank", json={"query": "q", "texts": DOCUMENTS, "raw_scores": True,
                                       "return_text": True}).json()
    assert [r["score"] for r in raw] == [3.0, 1.0, 1.0, -2.0]
    assert [r["text"] for r in raw] == [DOCUMENTS[r["index"]] for r in raw]
    # TEI's truncate defaults to false and reaches Triton as the `truncate` parameter.
    assert [call[2] for call in fake.calls] == [False, False]
    client.post("/rerank", json={"query": "q", "texts": ["a"], "truncate": True})
    assert fake.calls[-1][2] is True


@pytest.mark.parametrize(("direction", "sent"), [("Right", "right"), ("right", "right"), ("Left", "left"),
                                                ("left", "left")])
def test_tei_truncation_direction_reaches_the_ensemble(direction, sent):
    client, fake = client_for()
    response = client.post("/rerank", json={"query": "q", "texts": ["a"], "truncate": True,
                                            "truncation_direction": direction})
    assert response.status_code == 200
    assert fake.options[-1]["truncation_direction"] == sent and fake.calls[-1][2] is True


def test_tei_unknown_truncation_direction_is_refused_with_a_reason():
    client, fake = client_for()
    response = client.post("/rerank", json={"query": "q", "texts": ["a"], "truncation_direction": "Middle"})
    assert response.status_code == 422
    assert "must be 'Right' or 'Left'" in response.json()["error"]
    assert response.json()["error_type"] == "validation" and fake.calls == []


def test_cohere_results_relevance_and_usage():
    client, fake = client_for(served_model_name="bge")
    body = client.post("/v2/rerank", json={"model": "rerank-v3.5", "query": "q", "top_n": 3, "max_tokens_per_doc": 64,
                                           "documents": [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]]}).json()
    assert [r["index"] for r in body["results"]] == [1, 2, 3]
    assert body["results"][0]["relevance_score"] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-15)
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    tokens = sum(len(d) for d in DOCUMENTS)  # all documents count, not only the top_n returned
    assert body["meta"]["tokens"]["input_tokens"] == tokens and body["usage"]["total_tokens"] == tokens
    assert body["model"] == "rerank-v3.5" and body["id"]
    assert fake.calls[-1][1] == DOCUMENTS
    # max_tokens_per_doc shortens every document (Cohere always truncates): truncation asked for by name,
    # since the ensemble takes max_tokens_per_doc in no other mode, whatever the server's default.
    assert fake.options[-1]["max_tokens_per_doc"] == 64 and fake.calls[-1][2] is True
    assert fake.options[-1]["long_documents"] == "truncate"
    with_docs = client.post("/v2/rerank", json={"query": "q", "documents": ["hi"], "return_documents": True}).json()
    assert with_docs["results"][0]["document"] == {"text": "hi"} and with_docs["model"] == "bge"


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/rerank", {"query": "  ", "documents": ["a"]}, "query: query is empty"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents: List should have at least 1 item"),
    ("/v1/rerank", {"query": "q", "documents": "abc"}, "documents: Input should be a valid list"),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, "query: Input should be a valid string"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 7]}, "documents[1]: Input should be a valid string"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n: Input should be greater than or equal to 1"),
    ("/v1/rerank", {"documents": ["a"]}, "query: Field required"),
    ("/v2/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "documents[0]"),
])
def test_invalid_bodies_are_422_naming_the_field(path, body, expected):
    client, fake = client_for()
    response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["type"] == "validation" and response.json()["code"] == 422
    assert expected in response.json()["message"]
    assert fake.calls == []


def test_body_problems_are_explained():
    client, _ = client_for()
    not_json = client.post("/v1/rerank", content=b'{"query": ', headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["message"]
    form = client.post("/v1/rerank", content=b'{"query": "q", "documents": ["a"]}',
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and "Content-Type: application/json" in form.json()["message"]
    surrogate = client.post("/v1/rerank", content=b'{"query": "\\ud800", "documents": ["a"]}',
                            headers={"content-type": "application/json"})
    assert surrogate.status_code == 422 and "not valid Unicode" in surrogate.json()["message"]


def test_too_many_documents_is_413_naming_the_limit():
    client, fake = client_for(max_documents=3)
    response = client.post("/v1/rerank", json={"query": "q", "documents": DOCUMENTS})
    assert response.status_code == 413
    assert "4 documents" in response.json()["message"] and "limit is 3" in response.json()["message"]
    assert fake.calls == []


def test_oversize_body_is_413_before_parsing_declared_or_streamed():
    client, fake = client_for(max_body_bytes=200)
    big = {"query": "q", "documents": ["x" * 300]}
    declared = client.post("/v1/rerank", json=big)
    assert declared.status_code == 413 and "limit is 200 bytes" in declared.json()["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"query": "q", "texts": ["'
        yield b"x" * 300
        yield b'"]}'

    streamed = client.post("/rerank", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "limit is 200 bytes" in streamed.json()["error"]
    assert fake.calls == []
    assert client.post("/v1/rerank", json={"query": "q", "documents": ["small"]}).status_code == 200


@pytest.mark.parametrize(("error", "status", "kind"), [
    (InvalidRequestError("document 0 makes a pair of 900 tokens; send truncate=true"), 400, "invalid_request"),
    (ServerUnavailableError("Triton at fake:8001 (grpc) is unavailable: connection refused"), 503, "unavailable"),
    (RerankTimeoutError("Triton at fake:8001 (grpc) did not answer in time"), 504, "timeout"),
])
def test_triton_errors_map_to_http_statuses_with_the_message(error, status, kind):
    client, _ = client_for(FakeTriton(error=error))
    response = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert response.status_code == status
    assert response.json() == {"object": "error", "message": str(error), "type": kind, "code": status}
    if status == 503:
        assert response.headers["retry-after"] == "1"
    tei = client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert tei.status_code == status and tei.json() == {"error": str(error), "error_type": kind}


def test_api_key_is_enforced_on_the_rerank_routes():
    client, fake = client_for(api_key="s3cret")
    body = {"query": "q", "documents": ["a"]}
    missing = client.post("/v1/rerank", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["message"]
    assert client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert fake.calls == []
    ok = client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # Probes and scrapers carry no key.
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_health_follows_triton_readiness():
    client, fake = client_for()
    assert client.get("/health").json()["status"] == "ok"
    fake.ready = False
    response = client.get("/health")
    assert response.status_code == 503 and "not ready" in response.json()["message"]


def test_models_and_unknown_routes():
    client, _ = client_for(served_model_name="BAAI/bge-reranker-v2-m3")
    assert client.get("/v1/models").json()["data"][0]["id"] == "BAAI/bge-reranker-v2-m3"
    missing = client.get("/v1/embeddings")
    assert missing.status_code == 404 and "/v1/rerank" in missing.json()["message"]
    assert client.get("/v1/rerank").status_code == 405


def test_metrics_count_requests_errors_and_documents():
    client, _ = client_for()
    client.post("/v1/rerank", json={"query": "q", "documents": DOCUMENTS})
    client.post("/v1/rerank", json={"query": "", "documents": ["a"]})
    client.get("/not-a-route")
    text = client.get("/metrics").text
    assert 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="200"} 1.0' in text
    assert 'triton_rerank_gateway_errors_total{kind="validation",route="/v1/rerank"} 1.0' in text
    assert 'triton_rerank_gateway_errors_total{kind="not_found",route="other"} 1.0' in text
    assert 'triton_rerank_gateway_documents_total{route="/v1/rerank"} 4.0' in text
    assert 'triton_rerank_gateway_request_duration_seconds_count{route="/v1/rerank"} 2.0' in text


def test_openapi_schema_lists_every_dialect():
    client, _ = client_for()
    schema = client.get("/openapi.json").json()
    assert {"/v1/rerank", "/rerank", "/v2/rerank", "/health", "/v1/models", "/metrics"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["SGLangRerankRequest"]
    assert request["required"] == ["query", "documents"]


def test_overload_is_429_with_retry_after():
    async def scenario():
        fake = FakeTriton(delay=0.3)
        app = create_app(GatewaySettings(max_concurrency=1, max_queue=1), fake)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            body = {"query": "q", "documents": ["a"]}
            return await asyncio.gather(*(client.post("/v1/rerank", json=body) for _ in range(4)))

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429]  # one running, one queued, the rest refused at once
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["message"]


def test_admission_limiter_counts_running_and_waiting():
    async def scenario():
        limiter = AdmissionLimiter(max_concurrency=2, max_queue=0)
        async with limiter.admit(), limiter.admit():
            assert limiter.active == 2
            with pytest.raises(Exception, match="overloaded: 2 requests running and 0 waiting"):
                async with limiter.admit():
                    pass
        assert limiter.active == 0 and limiter.waiting == 0

    asyncio.run(scenario())


def test_gateway_thread_says_which_port_is_taken_and_leaves_the_other_free():
    import socket

    from triton_rerank.gateway.server import GatewayThread
    from triton_rerank.gateway.settings import GatewayStartError
    from triton_rerank.launcher.server import free_ports

    (free,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayStartError, match=f"cannot listen on 127.0.0.1:{port} .*--api-port"):
            GatewayThread(GatewaySettings(port=port, log_level="critical")).start()
        # The KServe port taken: the API port bound first is let go again.
        with pytest.raises(GatewayStartError, match=f"cannot listen on 127.0.0.1:{port} .*--http-port"):
            GatewayThread(GatewaySettings(port=free, kserve_port=port, log_level="critical")).start()
    with socket.create_server(("127.0.0.1", free)):
        pass


def test_serve_banner_prints_the_sglang_curl_without_the_api_key():
    from triton_rerank.launcher.serve import ready_banner
    from triton_rerank.launcher.server import ServerAddress

    banner = ready_banner(ServerAddress("0.0.0.0", 8000, 8001, 8002),
                          GatewaySettings(host="0.0.0.0", port=30000, api_key="s3cret",
                                          served_model_name="BAAI/bge-reranker-v2-m3"))
    curl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl"))
    assert curl.startswith("curl -s http://127.0.0.1:30000/v1/rerank -H 'Content-Type: application/json'")
    assert "Bearer <your api key>" in curl and "s3cret" not in banner
    assert '"model": "BAAI/bge-reranker-v2-m3"' in curl
