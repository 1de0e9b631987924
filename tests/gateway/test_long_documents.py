"""The long-document extension on every dialect's route: `long_documents`, `chunk_overlap` and
`max_chunks_per_doc` in the body reach the ensemble's request parameters, bad values are refused in
the route's own error shape, and the windows scored show in the route's usage fields.

On FastAPI's test client with a fake Triton; through the real server: tests/e2e/test_gateway.py.
"""

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.client.triton_io import ScoreOptions
from triton_rerank.gateway.app import GatewaySettings, create_app

DOCUMENTS = ["hi", "pandas eat bamboo", "The giant panda is a bear native to China."]
WINDOW = 8  # the fake's window, in characters


class FakeTriton:
    """Logit = characters / 8; token count = characters. With long_documents=chunk a document makes one
    window per started 8 characters (at least one); else one window each."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self):
        self.sent = []  # the Triton request parameters of each call, as the client would send them

    async def score(self, query, documents, truncate=None, **options):
        # What the real client does with these keywords: validate them, and send these parameters.
        self.sent.append(ScoreOptions(truncate, **options).parameters())
        lengths = np.array([len(d) for d in documents])
        chunked = options.get("long_documents") == "chunk"
        windows = np.maximum(1, -(-lengths // WINDOW)) if chunked else np.ones(len(documents))
        return ScoredDocuments(lengths.astype(np.float32) / WINDOW, lengths.astype(np.int32),
                               windows.astype(np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def client_for(**settings):
    fake = FakeTriton()
    return TestClient(create_app(GatewaySettings(**settings), fake)), fake


def windows_of(document: str) -> int:
    return max(1, math.ceil(len(document) / WINDOW))


# Each route's body for DOCUMENTS, without the extension.
BODIES = {
    "/v1/rerank": {"query": "q", "documents": DOCUMENTS},
    "/rerank": {"query": "q", "texts": DOCUMENTS},
    "/v2/rerank": {"query": "q", "documents": DOCUMENTS},
    "/v1/ranking": {"query": {"text": "q"}, "passages": [{"text": d} for d in DOCUMENTS]},
    "/score": {"text_1": "q", "text_2": DOCUMENTS},
    "/v1/score": {"text_1": "q", "text_2": DOCUMENTS},
}
ROUTES = list(BODIES)
CHUNK = {"long_documents": "chunk", "chunk_overlap": 4, "max_chunks_per_doc": 6}


@pytest.mark.parametrize("route", ROUTES)
def test_the_extension_reaches_the_ensemble_on_every_route(route):
    client, fake = client_for()
    answer = client.post(route, json=BODIES[route] | CHUNK)
    assert answer.status_code == 200, answer.text
    # long_documents alone decides: no dialect default (TEI's or the NIM's refusal) goes with it.
    assert fake.sent == [CHUNK]


# (route, body fields, the ensemble's parameters): each dialect's own default for long documents, and
# how it combines with long_documents.
DEFAULTS = [
    ("/v1/rerank", {}, {"truncate": True}),  # SGLang never refuses
    ("/v1/rerank", {"long_documents": "error"}, {"long_documents": "error"}),
    ("/rerank", {}, {"truncate": False}),  # TEI's truncate defaults to false: refuse
    ("/rerank", {"truncate": True}, {"truncate": True}),
    ("/rerank", {"truncate": None, "long_documents": "chunk"}, {"long_documents": "chunk"}),
    ("/rerank", {"truncate": True, "long_documents": "chunk"}, {"long_documents": "chunk"}),
    ("/rerank", {"truncate": True, "truncation_direction": "Left", "long_documents": "truncate"},
     {"long_documents": "truncate", "truncation_direction": "left"}),
    ("/v2/rerank", {}, {"truncate": True}),  # Cohere never refuses
    ("/v2/rerank", {"long_documents": "chunk", "chunk_overlap": 0}, {"long_documents": "chunk", "chunk_overlap": 0}),
    # max_tokens_per_doc asks for truncation by name: the ensemble takes it in no other mode.
    ("/v2/rerank", {"max_tokens_per_doc": 5}, {"long_documents": "truncate", "max_tokens_per_doc": 5}),
    ("/v1/ranking", {}, {"truncate": False}),  # the NIM's truncate NONE
    ("/v1/ranking", {"truncate": "END"}, {"truncate": True}),
    ("/v1/ranking", {"long_documents": "chunk"}, {"long_documents": "chunk"}),
    ("/score", {}, {"truncate": False}),  # vLLM refuses without truncate_prompt_tokens
    ("/score", {"truncate_prompt_tokens": -1}, {"truncate": True}),
    ("/score", {"long_documents": "chunk", "max_chunks_per_doc": 2}, {"long_documents": "chunk",
                                                                      "max_chunks_per_doc": 2}),
    ("/score", {"chunk_overlap": 3}, {"truncate": False, "chunk_overlap": 3}),
]


@pytest.mark.parametrize(("route", "fields", "sent"), DEFAULTS)
def test_each_dialects_default_and_long_documents(route, fields, sent):
    client, fake = client_for()
    answer = client.post(route, json=BODIES[route] | fields)
    assert answer.status_code == 200, answer.text
    assert fake.sent == [sent]


def error_of(route: str, answer) -> tuple[int, str, str]:
    """(status, kind, message) of an error answer, checking it has the route's shape."""
    body = answer.json()
    if route == "/rerank":  # TEI's shape
        assert set(body) == {"error", "error_type"}, body
        return answer.status_code, body["error_type"], body["error"]
    assert set(body) == {"object", "message", "type", "code"} and body["code"] == answer.status_code, body
    return answer.status_code, body["type"], body["message"]


BAD_VALUES = [
    ({"long_documents": "split"}, "long_documents: Input should be 'truncate', 'chunk' or 'error'"),
    ({"long_documents": "CHUNK"}, "long_documents: Input should be"),
    ({"long_documents": True}, "long_documents"),
    ({"chunk_overlap": -1}, "chunk_overlap: Input should be greater than or equal to 0"),
    ({"chunk_overlap": "32"}, "chunk_overlap: Input should be a valid integer"),
    ({"chunk_overlap": True}, "chunk_overlap: Input should be a valid integer"),
    ({"chunk_overlap": 2.5}, "chunk_overlap: Input should be a valid integer"),
    ({"max_chunks_per_doc": 0}, "max_chunks_per_doc: Input should be greater than or equal to 1"),
    ({"max_chunks_per_doc": None, "chunk_overlap": [1]}, "chunk_overlap: Input should be a valid integer"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("fields", "expected"), BAD_VALUES, ids=[str(f) for f, _ in BAD_VALUES])
def test_bad_values_are_refused_in_the_routes_shape_naming_the_field(route, fields, expected):
    client, fake = client_for()
    status, kind, message = error_of(route, client.post(route, json=BODIES[route] | fields))
    # A body that does not fit the schema is 422 on every route, as its other fields are.
    assert (status, kind) == (422, "validation") and expected in message, message
    assert fake.sent == []


# Options that each fit the schema but contradict each other: 400, saying which.
CONTRADICTIONS = [
    ("/rerank", {"truncate": False, "long_documents": "chunk"}, "contradict each other"),
    ("/v1/ranking", {"truncate": "NONE", "long_documents": "truncate"}, "contradict each other"),
    ("/score", {"truncate_prompt_tokens": -1, "long_documents": "error"}, "contradict each other"),
    ("/v2/rerank", {"max_tokens_per_doc": 8, "long_documents": "chunk"}, "send one of the two"),
    ("/v2/rerank", {"max_tokens_per_doc": 8, "long_documents": "error"}, "max_tokens_per_doc"),
]


@pytest.mark.parametrize(("route", "fields", "expected"), CONTRADICTIONS)
def test_contradicting_options_are_400_in_the_routes_shape(route, fields, expected):
    client, fake = client_for()
    status, kind, message = error_of(route, client.post(route, json=BODIES[route] | fields))
    assert (status, kind) == (400, "invalid_request") and expected in message, message
    assert fake.sent == []


def test_sglang_meta_info_has_each_pairs_windows():
    client, _ = client_for()
    items = client.post("/v1/rerank", json=BODIES["/v1/rerank"] | CHUNK | {"top_n": 2}).json()
    assert [i["index"] for i in items] == [2, 1]
    assert [i["meta_info"]["chunks"] for i in items] == [windows_of(DOCUMENTS[2]), windows_of(DOCUMENTS[1])] == [6, 3]
    assert [i["meta_info"]["prompt_tokens"] for i in items] == [len(DOCUMENTS[2]), len(DOCUMENTS[1])]
    # Not chunked: one window each, and SGLang's fields as before.
    plain = client.post("/v1/rerank", json=BODIES["/v1/rerank"]).json()
    assert {i["meta_info"]["chunks"] for i in plain} == {1}
    assert list(plain[0]["meta_info"]) == ["id", "prompt_tokens", "completion_tokens", "e2e_latency", "chunks"]


def test_cohere_meta_has_the_windows_of_every_document():
    client, _ = client_for()
    body = client.post("/v2/rerank", json=BODIES["/v2/rerank"] | CHUNK | {"top_n": 1}).json()
    assert len(body["results"]) == 1
    # Every document's windows, not only the top_n returned; the token fields as before.
    assert body["meta"]["chunks"] == sum(windows_of(d) for d in DOCUMENTS) == 10
    assert body["meta"]["tokens"] == {"input_tokens": sum(len(d) for d in DOCUMENTS), "output_tokens": 0}
    assert body["meta"]["api_version"] == {"version": "2"}
    assert set(body["usage"]) == {"total_tokens", "prompt_tokens"}
    assert client.post("/v2/rerank", json=BODIES["/v2/rerank"]).json()["meta"]["chunks"] == len(DOCUMENTS)


def test_vllm_usage_has_the_windows_of_every_pair():
    client, fake = client_for()
    body = client.post("/v1/score", json=BODIES["/v1/score"] | CHUNK).json()
    assert body["usage"]["chunks"] == sum(windows_of(d) for d in DOCUMENTS)
    tokens = sum(len(d) for d in DOCUMENTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "chunks": 10}
    # N:N with two queries: two ensemble requests, their windows added up.
    pairs = client.post("/score", json={"text_1": ["q1", "q2", "q1"], "text_2": DOCUMENTS, **CHUNK}).json()
    assert len(fake.sent) == 3 and pairs["usage"]["chunks"] == 10
    # A pair's score is its best window's: what the ensemble answers, sigmoid as usual.
    assert pairs["data"][2]["score"] == pytest.approx(1 / (1 + math.exp(-len(DOCUMENTS[2]) / WINDOW)), rel=1e-12)


def test_nim_and_tei_answers_keep_their_shape_and_tei_reports_usage_in_headers():
    """Neither has a usage field in its body: chunking changes no field. TEI reports usage in headers."""
    client, _ = client_for()
    nim = client.post("/v1/ranking", json=BODIES["/v1/ranking"] | CHUNK)
    assert list(nim.json()) == ["rankings"] and all(set(r) == {"index", "logit"} for r in nim.json()["rankings"])
    tei = client.post("/rerank", json=BODIES["/rerank"] | CHUNK)
    assert all(set(r) == {"index", "score"} for r in tei.json())
    assert tei.headers["x-compute-chunks"] == str(sum(windows_of(d) for d in DOCUMENTS)) == "10"
    assert tei.headers["x-compute-tokens"] == str(sum(len(d) for d in DOCUMENTS))
    assert int(tei.headers["x-total-time"]) >= 0
    assert client.post("/rerank", json=BODIES["/rerank"]).headers["x-compute-chunks"] == str(len(DOCUMENTS))


def test_the_schema_documents_the_extension_and_the_window_counts():
    client, _ = client_for()
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for request in ("SGLangRerankRequest", "TEIRerankRequest", "CohereRerankRequest", "NIMRankingRequest",
                    "VLLMScoreRequest"):
        properties = schemas[request]["properties"]
        for name in ("long_documents", "chunk_overlap", "max_chunks_per_doc"):
            assert len(properties[name].get("description", "")) > 40, (request, name)
            assert name not in schemas[request].get("required", [])
        modes = next(option for option in properties["long_documents"]["anyOf"] if option.get("type") == "string")
        assert modes["enum"] == ["truncate", "chunk", "error"]
    assert "chunks" in schemas["CohereMeta"]["properties"] and "chunks" in schemas["VLLMUsage"]["properties"]
    assert "chunks" in schemas["SGLangRerankItem"]["properties"]["meta_info"]["description"]
