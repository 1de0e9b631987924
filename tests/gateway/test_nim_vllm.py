"""NVIDIA's reranking NIM (POST /v1/ranking) and vLLM's score (POST /score, /v1/score), field by
field, on FastAPI's test client with a fake Triton (score = the document's length). Through the
real server: tests/e2e/test_gateway.py."""

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway.app import GatewaySettings, create_app

PASSAGES = ["hi", "The giant panda is a bear.", "pandas eat bamboo", "ab"]


class FakeTriton:
    """Score = the document's length as the logit; token count = length + the query's length."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self):
        self.calls = []

    async def score(self, query, documents, truncate=None, **options):
        self.calls.append((query, list(documents), truncate))
        lengths = np.array([len(d) for d in documents])
        return ScoredDocuments(lengths.astype(np.float32) / 4, (lengths + len(query)).astype(np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def client_for(**settings):
    fake = FakeTriton()
    return TestClient(create_app(GatewaySettings(served_model_name="bge", **settings), fake)), fake


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- NIM ------------------------------------------------------------------------------------------


def test_nim_ranks_every_passage_by_raw_logit():
    client, fake = client_for()
    answer = client.post("/v1/ranking", json={"model": "nvidia/llama-3.2-nv-rerankqa-1b-v2",
                                               "query": {"text": "panda"},
                                               "passages": [{"text": p} for p in PASSAGES]})
    assert answer.status_code == 200
    body = answer.json()
    assert list(body) == ["rankings"]
    assert body["rankings"] == [{"index": 1, "logit": 26 / 4}, {"index": 2, "logit": 17 / 4},
                                {"index": 0, "logit": 0.5}, {"index": 3, "logit": 0.5}]  # a tie keeps input order
    assert fake.calls == [("panda", PASSAGES, False)]  # truncate NONE (the default): refuse what does not fit


@pytest.mark.parametrize(("truncate", "expected"), [("END", True), ("NONE", False)])
def test_nim_truncate(truncate, expected):
    client, fake = client_for()
    client.post("/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": truncate})
    assert fake.calls[0][2] is expected


@pytest.mark.parametrize(("body", "where"), [
    ({"query": {"text": "q"}, "passages": []}, "passages"),
    ({"query": {"text": " "}, "passages": [{"text": "a"}]}, "query is empty"),
    ({"query": "q", "passages": [{"text": "a"}]}, "query"),
    ({"query": {"text": "q"}, "passages": ["a"]}, "passages[0]"),
    ({"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"}, "truncate"),
])
def test_nim_bad_requests_say_what_is_wrong(body, where):
    client, fake = client_for()
    answer = client.post("/v1/ranking", json=body)
    assert answer.status_code == 422 and where in answer.text, answer.text
    assert fake.calls == []


# --- vLLM -----------------------------------------------------------------------------------------


def test_vllm_one_query_many_texts_in_input_order_with_usage():
    client, fake = client_for()
    body = client.post("/score", json={"model": "BAAI/bge-reranker-v2-m3", "text_1": "q", "text_2": PASSAGES}).json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("score-") and body["object"] == "list" and isinstance(body["created"], int)
    assert body["model"] == "BAAI/bge-reranker-v2-m3"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"score"}
    np.testing.assert_allclose([d["score"] for d in body["data"]], [sigmoid(len(p) / 4) for p in PASSAGES],
                               rtol=1e-6)
    tokens = sum(len(p) + 1 for p in PASSAGES)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "chunks": 4}
    assert fake.calls == [("q", PASSAGES, False)]


def test_vllm_forms_activation_and_paths():
    client, fake = client_for()
    one = client.post("/v1/score", json={"text_1": "q", "text_2": "panda", "use_activation": False}).json()
    assert [d["score"] for d in one["data"]] == [5 / 4] and one["model"] == "bge"
    broadcast = client.post("/score", json={"text_1": ["q"], "text_2": ["a", "bb"]}).json()
    assert [d["index"] for d in broadcast["data"]] == [0, 1]
    # N:N, pairs by position: one ensemble request per distinct query, answers back in input order.
    fake.calls.clear()
    pairs = client.post("/score", json={"text_1": ["q1", "q22", "q1"], "text_2": ["aaaa", "b", "cc"],
                                        "use_activation": False}).json()
    assert [d["score"] for d in pairs["data"]] == [1.0, 0.25, 0.5]
    assert sorted(fake.calls) == [("q1", ["aaaa", "cc"], False), ("q22", ["b"], False)]
    assert pairs["usage"]["prompt_tokens"] == (4 + 2) + (2 + 2) + (1 + 3)


def test_vllm_truncation():
    client, fake = client_for()
    client.post("/score", json={"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": -1})
    assert fake.calls[-1][2] is True
    refused = client.post("/score", json={"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": 16})
    assert refused.status_code == 422 and "only -1" in refused.text


@pytest.mark.parametrize(("body", "where"), [
    ({"text_1": ["q1", "q2"], "text_2": ["a", "b", "c"]}, "text_1 holds 2 texts and text_2 3"),
    ({"text_1": [], "text_2": ["a"]}, "at least one text"),
    ({"text_1": "q", "text_2": []}, "at least one text"),
    ({"text_1": " ", "text_2": ["a"]}, "query is empty"),
    ({"text_2": ["a"]}, "text_1"),
])
def test_vllm_bad_requests_say_what_is_wrong(body, where):
    client, fake = client_for()
    answer = client.post("/score", json=body)
    assert answer.status_code == 422 and where in answer.text, answer.text
    assert fake.calls == []


def test_vllm_pairs_count_against_max_documents():
    client, fake = client_for(max_documents=3)
    answer = client.post("/score", json={"text_1": ["a", "b", "c", "d"], "text_2": ["1", "2", "3", "4"]})
    assert answer.status_code == 413 and "4 pairs in one request; the limit is 3" in answer.text
    assert fake.calls == []


def test_openapi_lists_the_new_routes():
    client, _ = client_for()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/ranking", "/score", "/v1/score"} <= set(paths)
