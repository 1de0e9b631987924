"""The dialect extension point: a dialect is one module (a Dialect and its route) named in DIALECTS."""

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway import service
from triton_rerank.gateway.app import GatewaySettings, create_app
from triton_rerank.gateway.dialect import Dialect, present
from triton_rerank.gateway.dialects import DIALECTS
from triton_rerank.gateway.ensemble import rerank
from triton_rerank.gateway.protocol import Documents, Query, RerankRequest

DOCUMENTS = ["hi", "The giant panda is a bear.", "pandas eat bamboo", "tie"]


class FakeTriton:
    """Scores a document by its length; token count = characters."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self):
        self.calls = []

    async def score(self, query, documents, truncate=None, **options):
        self.calls.append((query, list(documents), truncate))
        lengths = np.array([len(d) for d in documents])
        return ScoredDocuments(lengths.astype(np.float32), lengths.astype(np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


class ToyError(BaseModel):
    """Errors of /v1/toy."""

    detail: str

    @classmethod
    def of(cls, error) -> dict:
        return {"detail": f"{error.kind}: {error.message}"}


class ToyRequest(RerankRequest):
    question: Query
    passages: Documents


toy = Dialect(ToyError)


@toy.post("/v1/toy", summary="a toy dialect")
async def toy_rank(body: ToyRequest, request: Request):
    ranking = await rerank(request, body.question, body.passages, return_documents=False, normalize=True)
    return JSONResponse({"ranked": [present(i=r.index, p=r.score, text=r.document) for r in ranking.results],
                         "tokens": ranking.total_tokens})


def toy_client(**settings):
    fake = FakeTriton()
    return TestClient(create_app(GatewaySettings(**settings), fake, dialects=[*DIALECTS, toy])), fake


def test_dialects_own_distinct_routes():
    paths = [path for dialect in DIALECTS for path in dialect.paths]
    assert paths == ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/ranking", "/score", "/v1/score"]
    assert not set(paths) & {route.path for route in service.router.routes}


def test_a_new_dialect_gets_the_ensemble_limits_errors_metrics_and_schema():
    client, fake = toy_client(max_documents=4, max_body_bytes=500)
    body = client.post("/v1/toy", json={"question": "q", "passages": DOCUMENTS}).json()
    assert [r["i"] for r in body["ranked"]] == [1, 2, 3, 0] and "text" not in body["ranked"][0]
    assert body["tokens"] == sum(len(d) for d in DOCUMENTS)
    # It says nothing about long documents: truncate None, the server's default.
    assert fake.calls == [("q", DOCUMENTS, None)]
    # Its own error shape on every refusal: validation, the document limit, the body size, the method.
    assert client.post("/v1/toy", json={"question": " ", "passages": ["a"]}).json() == {
        "detail": "validation: question: query is empty: send the search query to rank the documents against"}
    assert client.post("/v1/toy", json={"question": "q", "passages": ["a"] * 5}).json()["detail"].startswith(
        "payload_too_large: 5 documents")
    too_big = client.post("/v1/toy", json={"question": "q", "passages": ["x" * 600]})
    assert too_big.status_code == 413 and too_big.json()["detail"].startswith("payload_too_large: the request body")
    not_allowed = client.get("/v1/toy")
    assert not_allowed.status_code == 405 and not_allowed.json()["detail"].startswith("method_not_allowed")
    # The other dialects keep theirs; unknown routes list the new one.
    assert "error_type" in client.post("/rerank", json={"query": "q", "texts": []}).json()
    assert "POST /v1/toy" in client.get("/nope").json()["message"]
    # Counted under its route; documented like the other rerank routes.
    metrics = client.get("/metrics").text
    assert 'triton_rerank_gateway_requests_total{route="/v1/toy",status="200"} 1.0' in metrics
    assert 'triton_rerank_gateway_documents_total{route="/v1/toy"} 4.0' in metrics
    operation = client.get("/openapi.json").json()["paths"]["/v1/toy"]["post"]
    assert operation["tags"] == ["rerank"]
    assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ToyError"}


def test_a_new_dialect_requires_the_api_key():
    client, fake = toy_client(api_key="s3cret")
    body = {"question": "q", "passages": ["a"]}
    refused = client.post("/v1/toy", json=body)
    assert refused.status_code == 401 and refused.json()["detail"].startswith("unauthorized")
    assert client.post("/v1/toy", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert len(fake.calls) == 1
