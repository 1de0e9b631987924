"""Decoder rerankers behind the gateway: instructions reach the ensemble, and SGLang's route answers P(yes).

The backend is a fake that records the options it gets; the real ensemble is in
tests/e2e/test_decoder_reranker.py.
"""

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway.app import GatewaySettings, create_app

DOCUMENTS = ["hi", "The giant panda is a bear.", "pandas eat bamboo"]
LOGITS = [-2.0, 3.0, 0.5]


class FakeTriton:
    """Fixed logits; records the options of every call and how often it was asked its kind."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self, kind: str):
        self.kind = kind
        self.options = []
        self.kind_calls = 0

    async def score(self, query, documents, truncate=None, **options):
        self.options.append(options)
        scores = np.array(LOGITS[:len(documents)], dtype=np.float32)
        return ScoredDocuments(scores, np.full(len(documents), 7, dtype=np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        self.kind_calls += 1
        return self.kind

    async def close(self):
        pass


def client_for(kind: str) -> tuple[TestClient, FakeTriton]:
    fake = FakeTriton(kind)
    return TestClient(create_app(GatewaySettings(), fake)), fake


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(("kind", "expected"), [
    ("decoder", [sigmoid(x) for x in LOGITS]),  # P(yes), as SGLang answers for Qwen3-Reranker
    ("cross-encoder", LOGITS),  # the raw logit, as SGLang answers for bge rerankers
    ("auto", LOGITS),
])
def test_sglang_scores_are_p_yes_for_decoder_rerankers_only(kind, expected):
    client, fake = client_for(kind)
    for _ in range(2):
        body = client.post("/v1/rerank", json={"query": "q", "documents": DOCUMENTS}).json()
        assert {item["index"]: item["score"] for item in body} == pytest.approx(dict(enumerate(expected)), abs=1e-6)
    assert fake.kind_calls == 1  # read once, then remembered


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/rerank", {"query": "q", "documents": DOCUMENTS}, "instruct"),
    ("/rerank", {"query": "q", "texts": DOCUMENTS}, "instruction"),
    ("/v2/rerank", {"query": "q", "documents": DOCUMENTS}, "instruction"),
])
def test_each_route_passes_its_instruction_field_to_the_ensemble(path, body, field):
    client, fake = client_for("decoder")
    assert client.post(path, json=body).status_code == 200
    assert client.post(path, json=body | {field: "Find recipes"}).status_code == 200
    assert [options["instruction"] for options in fake.options] == [None, "Find recipes"]


def test_tei_and_cohere_keep_their_sigmoid_for_decoder_rerankers():
    client, _ = client_for("decoder")
    tei = client.post("/rerank", json={"query": "q", "texts": DOCUMENTS}).json()
    cohere = client.post("/v2/rerank", json={"query": "q", "documents": DOCUMENTS}).json()
    expected = {i: sigmoid(x) for i, x in enumerate(LOGITS)}
    assert {r["index"]: r["score"] for r in tei} == pytest.approx(expected, abs=1e-6)
    assert {r["index"]: r["relevance_score"] for r in cohere["results"]} == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("instruction", ['["a", "b"]', "[]", "3", '{"text": "x"}', '"\\ud800"'])
def test_an_instruction_that_is_not_a_string_is_refused_before_triton(instruction):
    client, fake = client_for("decoder")
    body = f'{{"query": "q", "documents": ["a", "b"], "instruct": {instruction}}}'
    response = client.post("/v1/rerank", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert "instruct" in response.text
    assert fake.options == []


def test_a_backend_that_cannot_say_its_kind_is_a_503_not_a_wrong_score():
    client, fake = client_for("decoder")

    async def down():
        raise ConnectionError("connection refused")

    fake.reranker_kind = down
    response = client.post("/v1/rerank", json={"query": "q", "documents": DOCUMENTS})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "cannot read the reranker's configuration" in response.json()["message"]
    assert fake.options == []
