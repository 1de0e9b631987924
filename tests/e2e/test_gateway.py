"""The HTTP gateway end to end: `triton-rerank api` (uvicorn on a loopback port) in front of a real tritonserver."""

import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from triton_rerank.client import RerankClient
from triton_rerank.launcher.repository import RepositorySettings, render_model_repository
from triton_rerank.launcher.server import ServerAddress, TritonServer, free_ports, process_group_alive

# SGLang's rerank example (docs/supported_models/rerank_models.md), verbatim.
SEED_EXAMPLE = '''
import requests

url = "http://127.0.0.1:30000/v1/rerank"

payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "what is panda?",
    "documents": [
        "hi",
        "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, is a bear species endemic to China."
    ]
}

response = requests.post(url, json=payload)
response_json = response.json()

for item in response_json:
    print(f"Score: {item['score']:.2f} - Document: '{item['document']}'")
'''

QUERY = "what is panda?"
DOCUMENTS = [
    "hi",
    "The giant panda is a bear native to south central China.",
    "panda panda panda",
    "A search engine ranks documents by relevance to the query with a neural network model.",
    "bamboo forests in the mountains",
]
MAX_DOCUMENTS = 64
MAX_BODY_BYTES = 256 * 1024


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log: Path

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, timeout=60, **kwargs)


def start_gateway(triton_grpc_url: str, log: Path, *extra: str, env: dict | None = None) -> Gateway:
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "triton_rerank", "api", "--triton-url", triton_grpc_url,
               "--port", str(port), "--log-level", "warning", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    gateway = Gateway(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the gateway exited: {log.read_text()}"
        try:
            requests.get(gateway.url + "/openapi.json", timeout=2)
            return gateway
        except requests.ConnectionError:
            time.sleep(0.1)
    stop_gateway(gateway)
    raise AssertionError(f"the gateway did not start: {log.read_text()}")


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.send_signal(signal.SIGTERM)
    try:
        # uvicorn shuts down gracefully, then re-raises SIGTERM so that the exit status tells how it ended.
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM), gateway.log.read_text()
    finally:
        if gateway.process.poll() is None:
            os.killpg(gateway.process.pid, signal.SIGKILL)
    assert not process_group_alive(gateway.process.pid)


@pytest.fixture(scope="module")
def xlmr(server_pool):
    return server_pool.get("xlm-roberta")


@pytest.fixture(scope="module")
def gateway(xlmr, tmp_path_factory):
    running = start_gateway(xlmr.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log",
                            "--max-documents", str(MAX_DOCUMENTS), "--max-body-bytes", str(MAX_BODY_BYTES))
    yield running
    stop_gateway(running)


def ensemble(url: str, query: str, documents: list[str], truncate: bool = True, **parameters):
    """SCORES and TOKEN_COUNTS straight from the ensemble (no gateway), with these request parameters."""
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([x.encode() for x in documents], dtype=object))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", [q, d], parameters={"truncate": truncate, **parameters})
    return result.as_numpy("SCORES").reshape(-1), result.as_numpy("TOKEN_COUNTS").reshape(-1)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_the_seed_example_verbatim(gateway):
    code = SEED_EXAMPLE.replace("http://127.0.0.1:30000", gateway.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("Score: ") for line in lines), result.stdout
    assert {line.split(" - Document: ")[1] for line in lines} == {
        "'hi'", "'The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
        "is a bear species endemic to China.'"}


def test_sglang_ranking_equals_sorting_the_ensemble_scores(gateway, xlmr):
    scores, tokens = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    items = gateway.post("/v1/rerank", {"model": "BAAI/bge-reranker-v2-m3", "query": QUERY,
                                        "documents": DOCUMENTS}).json()
    order = np.argsort(-scores, kind="stable")
    assert [i["index"] for i in items] == order.tolist()
    assert [i["score"] for i in items] == [float(scores[i]) for i in order]  # the raw logit, exactly
    assert [i["document"] for i in items] == [DOCUMENTS[i] for i in order]
    assert [i["meta_info"]["prompt_tokens"] for i in items] == [int(tokens[i]) for i in order]


def test_sglang_top_n_and_return_documents(gateway, xlmr):
    scores, _ = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    items = gateway.post("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                        "return_documents": False}).json()
    assert [i["index"] for i in items] == np.argsort(-scores, kind="stable")[:2].tolist()
    assert all("document" not in i for i in items)


def test_tei_sigmoid_raw_scores_and_return_text(gateway, xlmr):
    scores, _ = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    order = np.argsort(-scores, kind="stable").tolist()
    ranks = gateway.post("/rerank", {"query": QUERY, "texts": DOCUMENTS}).json()
    assert [r["index"] for r in ranks] == order
    assert all("text" not in r for r in ranks)
    for r in ranks:
        assert r["score"] == pytest.approx(sigmoid(float(scores[r["index"]])), rel=1e-12)
    raw = gateway.post("/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "return_text": True,
                                   "truncate": True, "truncation_direction": "Right"}).json()
    assert [r["score"] for r in raw] == [float(scores[i]) for i in order]
    assert [r["text"] for r in raw] == [DOCUMENTS[i] for i in order]


def test_tei_truncate_false_is_triton_invalid_arg_as_400(gateway):
    long_document = "panda " * 2000
    refused = gateway.post("/rerank", {"query": QUERY, "texts": ["short", long_document]})
    assert refused.status_code == 400
    assert "document 1" in refused.json()["error"] and "truncate" in refused.json()["error"]
    cut = gateway.post("/rerank", {"query": QUERY, "texts": ["short", long_document], "truncate": True})
    assert cut.status_code == 200


def test_left_truncation_and_max_tokens_per_doc_end_to_end(gateway, xlmr):
    # The start and the end of the long document differ: which one is kept changes its score.
    documents = ["hi", "the giant panda lives in china " * 200 + "a search engine ranks web pages " * 200]
    right, right_tokens = ensemble(xlmr.grpc_url, QUERY, documents)
    left, left_tokens = ensemble(xlmr.grpc_url, QUERY, documents, truncation_direction="left")
    assert left_tokens.tolist() == right_tokens.tolist() and left[0] == right[0] and left[1] != right[1]
    # TEI's truncation_direction: Left, through the gateway, is the ensemble's left truncation.
    ranks = gateway.post("/rerank", {"query": QUERY, "texts": documents, "truncate": True, "raw_scores": True,
                                     "truncation_direction": "Left"}).json()
    assert {r["index"]: r["score"] for r in ranks} == {0: float(left[0]), 1: float(left[1])}
    # Cohere's max_tokens_per_doc: every document keeps at most 8 tokens, as the ensemble does it.
    short, short_tokens = ensemble(xlmr.grpc_url, QUERY, documents, max_tokens_per_doc=8)
    assert short_tokens[1] < right_tokens[1] and short_tokens[0] == right_tokens[0]
    body = gateway.post("/v2/rerank", {"query": QUERY, "documents": documents, "max_tokens_per_doc": 8}).json()
    assert body["usage"]["total_tokens"] == int(short_tokens.sum())
    assert {r["index"]: r["relevance_score"] for r in body["results"]} == pytest.approx(
        {i: sigmoid(float(x)) for i, x in enumerate(short)}, rel=1e-12)


def test_cohere_results_top_n_and_usage(gateway, xlmr):
    scores, tokens = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    body = gateway.post("/v2/rerank", {"model": "rerank-v3.5", "query": QUERY, "top_n": 3,
                                       "documents": DOCUMENTS, "max_tokens_per_doc": 4096}).json()
    order = np.argsort(-scores, kind="stable")[:3].tolist()
    assert [r["index"] for r in body["results"]] == order
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(sigmoid(float(scores[r["index"]])), rel=1e-12)
    assert body["meta"]["tokens"]["input_tokens"] == body["usage"]["total_tokens"] == int(tokens.sum())


def test_nim_ranking_is_the_ensembles_raw_logits_sorted(gateway, xlmr):
    scores, _ = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    body = gateway.post("/v1/ranking", {"model": "nvidia/llama-3.2-nv-rerankqa-1b-v2", "query": {"text": QUERY},
                                        "passages": [{"text": d} for d in DOCUMENTS], "truncate": "END"}).json()
    order = np.argsort(-scores, kind="stable").tolist()
    assert body == {"rankings": [{"index": i, "logit": float(scores[i])} for i in order]}
    # truncate NONE (the NIM's default) refuses a passage that does not fit; END cuts it.
    long_passage = {"text": "panda " * 2000}
    refused = gateway.post("/v1/ranking", {"query": {"text": QUERY}, "passages": [{"text": "a"}, long_passage]})
    assert refused.status_code == 400 and "document 1" in refused.json()["message"]
    cut = gateway.post("/v1/ranking", {"query": {"text": QUERY}, "passages": [long_passage], "truncate": "END"})
    assert cut.status_code == 200 and len(cut.json()["rankings"]) == 1


def test_vllm_score_forms_equal_the_ensemble(gateway, xlmr):
    scores, tokens = ensemble(xlmr.grpc_url, QUERY, DOCUMENTS)
    body = gateway.post("/score", {"model": "BAAI/bge-reranker-v2-m3", "text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
    for d in body["data"]:
        assert d["score"] == pytest.approx(sigmoid(float(scores[d["index"]])), rel=1e-12) and d["object"] == "score"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == int(tokens.sum())
    # N:N: each pair as the ensemble scores it alone (two queries: two ensemble requests).
    other = "where do pandas live?"
    other_scores, _ = ensemble(xlmr.grpc_url, other, DOCUMENTS[:2])
    pairs = gateway.post("/v1/score", {"text_1": [QUERY, other, other], "text_2": [DOCUMENTS[0], *DOCUMENTS[:2]],
                                       "use_activation": False}).json()
    np.testing.assert_allclose([d["score"] for d in pairs["data"]], [scores[0], *other_scores], atol=1e-5)
    refused = gateway.post("/score", {"text_1": QUERY, "text_2": ["panda " * 2000]})
    assert refused.status_code == 400 and "truncate" in refused.json()["message"]
    assert gateway.post("/score", {"text_1": QUERY, "text_2": ["panda " * 2000],
                                   "truncate_prompt_tokens": -1}).status_code == 200


# Far longer than the tiny models' 512-token window, in words of their tokenizers' vocabulary; its
# start and end differ, so that its windows score differently.
LONG_DOCUMENT = "river water city " * 500 + "the giant panda lives in the bamboo forest " * 220
CHUNKED_DOCUMENTS = ["hi", LONG_DOCUMENT, "The giant panda is a bear native to south central China."]
CHUNK = {"long_documents": "chunk"}


# Chunking is compared on the BERT server, whose test tokenizer keeps whole words: its long documents
# make many windows of few characters each (tests/e2e/test_long_documents.py covers XLM-R).
@pytest.fixture(scope="module")
def bert(server_pool):
    return server_pool.get("bert")


@pytest.fixture(scope="module")
def bert_gateway(bert, tmp_path_factory):
    running = start_gateway(bert.grpc_url, tmp_path_factory.mktemp("gateway") / "bert-gateway.log")
    yield running
    stop_gateway(running)


@pytest.fixture(scope="module")
def chunked(bert):
    """The Python client's answer for CHUNKED_DOCUMENTS scored with long_documents=chunk, on the same server."""
    with RerankClient(bert.grpc_url) as client:
        scored = client.score(QUERY, CHUNKED_DOCUMENTS, long_documents="chunk")
        truncated = client.score(QUERY, CHUNKED_DOCUMENTS, long_documents="truncate")
    # What the comparisons below rely on: only the long document is chunked, into several windows,
    # and its score is its best window's (the first window is what truncation scores).
    assert scored.chunk_counts[[0, 2]].tolist() == [1, 1] and scored.chunk_counts[1] >= 5
    assert scored.token_counts[1] > 2 * truncated.token_counts[1]
    assert scored.scores[1] >= truncated.scores[1] - 1e-5
    return scored


def by_index(items, score: str = "score") -> dict[int, float]:
    return {item["index"]: item[score] for item in items}


def test_sglang_chunked_long_document_equals_the_client(bert_gateway, chunked):
    items = bert_gateway.post("/v1/rerank", {"query": QUERY, "documents": CHUNKED_DOCUMENTS, **CHUNK}).json()
    scores = by_index(items)
    np.testing.assert_allclose([scores[i] for i in range(3)], chunked.scores, atol=1e-5, rtol=0)
    assert {i["index"]: i["meta_info"]["chunks"] for i in items} == dict(enumerate(chunked.chunk_counts.tolist()))
    assert {i["index"]: i["meta_info"]["prompt_tokens"] for i in items} == dict(
        enumerate(chunked.token_counts.tolist()))


def test_tei_chunked_long_document_equals_the_client(bert_gateway, chunked):
    # No truncate: TEI's default (refuse) does not contradict long_documents.
    answer = bert_gateway.post("/rerank", {"query": QUERY, "texts": CHUNKED_DOCUMENTS, **CHUNK})
    # Usage in TEI's response headers, the windows with it.
    assert answer.headers["x-compute-chunks"] == str(chunked.total_chunks)
    assert answer.headers["x-compute-tokens"] == str(chunked.total_tokens)
    scores = by_index(answer.json())
    np.testing.assert_allclose([scores[i] for i in range(3)], [sigmoid(float(x)) for x in chunked.scores],
                               atol=1e-5, rtol=0)
    refused = bert_gateway.post("/rerank", {"query": QUERY, "texts": CHUNKED_DOCUMENTS, "truncate": False, **CHUNK})
    assert refused.status_code == 400 and "contradict" in refused.json()["error"]


def test_cohere_chunked_long_document_equals_the_client(bert_gateway, chunked):
    body = bert_gateway.post("/v2/rerank", {"query": QUERY, "documents": CHUNKED_DOCUMENTS, "top_n": 1, **CHUNK}).json()
    assert [r["index"] for r in body["results"]] == [int(np.argmax(chunked.scores))]
    result = body["results"][0]
    assert result["relevance_score"] == pytest.approx(sigmoid(float(chunked.scores[result["index"]])), abs=1e-5)
    # Every document's windows and tokens, not only the top_n returned.
    assert body["meta"]["chunks"] == chunked.total_chunks
    assert body["meta"]["tokens"]["input_tokens"] == body["usage"]["total_tokens"] == chunked.total_tokens


def test_nim_chunked_long_document_equals_the_client(bert_gateway, chunked):
    body = bert_gateway.post("/v1/ranking", {"query": {"text": QUERY}, "passages": [{"text": d} for d in CHUNKED_DOCUMENTS],
                                        **CHUNK}).json()
    logits = by_index(body["rankings"], "logit")
    np.testing.assert_allclose([logits[i] for i in range(3)], chunked.scores, atol=1e-5, rtol=0)


def test_vllm_chunked_long_document_equals_the_client(bert_gateway, chunked):
    body = bert_gateway.post("/score", {"text_1": QUERY, "text_2": CHUNKED_DOCUMENTS, **CHUNK}).json()
    np.testing.assert_allclose([d["score"] for d in body["data"]], [sigmoid(float(x)) for x in chunked.scores],
                               atol=1e-5, rtol=0)
    assert body["usage"]["chunks"] == chunked.total_chunks
    assert body["usage"]["prompt_tokens"] == chunked.total_tokens


CHUNK_BODIES = {
    "/v1/rerank": {"query": QUERY, "documents": CHUNKED_DOCUMENTS},
    "/rerank": {"query": QUERY, "texts": CHUNKED_DOCUMENTS},
    "/v2/rerank": {"query": QUERY, "documents": CHUNKED_DOCUMENTS},
    "/v1/ranking": {"query": {"text": QUERY}, "passages": [{"text": d} for d in CHUNKED_DOCUMENTS]},
    "/v1/score": {"text_1": QUERY, "text_2": CHUNKED_DOCUMENTS},
}


@pytest.mark.parametrize("path", list(CHUNK_BODIES))
def test_an_overlap_as_long_as_the_window_is_the_ensembles_400(bert_gateway, path):
    answer = bert_gateway.post(path, CHUNK_BODIES[path] | {"long_documents": "chunk", "chunk_overlap": 100000})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error" if path == "/rerank" else "message"]
    assert "chunk_overlap" in message, message
    # A value the schema refuses never reaches Triton: 422, naming the field.
    negative = bert_gateway.post(path, CHUNK_BODIES[path] | {"long_documents": "chunk", "chunk_overlap": -1})
    assert negative.status_code == 422 and "chunk_overlap" in negative.text


def test_64_concurrent_requests_all_correct(gateway, xlmr):
    requests_ = [(f"query {i} about pandas", [f"bamboo {j} " * (1 + (i + j) % 5) for j in range(1 + i % 6)] + ["hi"])
                 for i in range(64)]
    expected = [ensemble(xlmr.grpc_url, q, docs)[0] for q, docs in requests_]
    dialects = ["/v1/rerank", "/rerank", "/v2/rerank"]

    def call(i):
        query, documents = requests_[i]
        path = dialects[i % 3]
        body = {"query": query, ("texts" if path == "/rerank" else "documents"): documents, "raw_scores": True}
        response = requests.post(gateway.url + path, json=body, timeout=120)
        assert response.status_code == 200, response.text
        if path == "/v2/rerank":  # sigmoid scores: back to logits to compare
            return [(r["index"], math.log(r["relevance_score"] / (1 - r["relevance_score"])))
                    for r in response.json()["results"]]
        return [(item["index"], item["score"]) for item in response.json()]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(call, range(64)))
    for answer, scores in zip(answers, expected, strict=True):
        indices, got = zip(*answer, strict=True)
        assert sorted(indices) == list(range(len(scores)))
        assert list(got) == sorted(got, reverse=True)
        # Batched with other requests, a score may differ from the lone request's in the last bits.
        np.testing.assert_allclose(got, scores[list(indices)], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("body", "status", "expected"), [
    ({"query": "", "documents": ["a"]}, 422, "query is empty"),
    ({"query": "q", "documents": []}, 422, "documents: List should have at least 1 item"),
    ({"query": ["q"], "documents": ["a"]}, 422, "query: Input should be a valid string"),
    ({"query": "q", "documents": [1, 2]}, 422, "documents[0]: Input should be a valid string"),
    ({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}, 413, f"the limit is {MAX_DOCUMENTS}"),
    ({"query": "q", "documents": ["x" * (MAX_BODY_BYTES + 1)]}, 413, f"the limit is {MAX_BODY_BYTES} bytes"),
])
def test_errors_are_4xx_json_saying_what_was_wrong(gateway, body, status, expected):
    response = gateway.post("/v1/rerank", body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert expected in response.json()["message"]
    # And the gateway keeps serving.
    assert gateway.post("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS[:2]}).status_code == 200


def test_health_models_and_metrics(gateway):
    assert requests.get(gateway.url + "/health", timeout=10).json()["status"] == "ok"
    assert requests.get(gateway.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "reranker"
    metrics = requests.get(gateway.url + "/metrics", timeout=10).text
    assert 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="200"}' in metrics
    assert 'triton_rerank_gateway_errors_total{kind="validation",route="/v1/rerank"}' in metrics


def test_api_key_is_enforced_when_set(xlmr, tmp_path):
    keyed = start_gateway(xlmr.grpc_url, tmp_path / "keyed.log", env={"TRITON_RERANK_API_KEY": "k-123"})
    try:
        body = {"query": QUERY, "documents": DOCUMENTS[:2]}
        assert keyed.post("/v1/rerank", body).status_code == 401
        assert keyed.post("/v1/rerank", body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert keyed.post("/v2/rerank", body).status_code == 401
        assert keyed.post("/v1/rerank", body, headers={"Authorization": "Bearer k-123"}).status_code == 200
        assert requests.get(keyed.url + "/health", timeout=10).status_code == 200
    finally:
        stop_gateway(keyed)


def test_unreachable_triton_is_503_and_the_gateway_reconnects(tiny_model_dirs, tmp_path):
    """No Triton yet: 503 JSON. Triton starts on that port: the same gateway answers, no restart."""
    http, grpc, metrics = free_ports(3)
    address = ServerAddress("127.0.0.1", http, grpc, metrics)
    lone = start_gateway(address.grpc_url, tmp_path / "lone.log")
    server = None
    try:
        health = requests.get(lone.url + "/health", timeout=10)
        assert health.status_code == 503 and "not reachable" in health.json()["message"]
        down = lone.post("/v1/rerank", {"query": QUERY, "documents": ["a"]})
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert "unavailable" in down.json()["message"]

        repository = render_model_repository(
            RepositorySettings(model_path=str(tiny_model_dirs["bert"]), device="cpu"), tmp_path / "repository")
        server = TritonServer(repository, tmp_path, address, extra_args=["--exit-timeout-secs=3"]).start()
        server.wait_ready(180)
        deadline = time.monotonic() + 30
        while requests.get(lone.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not reconnect to Triton within 30 s"
            time.sleep(0.2)
        assert lone.post("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}).status_code == 200
    finally:
        stop_gateway(lone)
        if server is not None:
            server.stop()


OPERATIONS = [("POST", "/v1/rerank"), ("POST", "/rerank"), ("POST", "/v2/rerank"), ("POST", "/v1/ranking"),
              ("POST", "/score"), ("POST", "/v1/score"), ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def gateway_schema(gateway):
    return schemathesis.openapi.from_url(gateway.url + "/openapi.json")


def test_the_served_schema_has_every_route(gateway_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in gateway_schema.get_all_operations()}
    assert served == set(OPERATIONS)


# schemathesis' own pytest integration (from_fixture) does not run on pytest 9 yet, so each operation's
# strategy is driven by hypothesis here: valid bodies (positive) and invalid ones (negative).
@pytest.mark.parametrize(("method", "path", "mode"), [
    *[(m, p, "positive") for m, p in OPERATIONS], *[(m, p, "negative") for m, p in OPERATIONS if m == "POST"]])
def test_schemathesis_finds_no_server_error(gateway_schema, method, path, mode):
    operation = gateway_schema[path][method]

    @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def no_server_error(case):
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    no_server_error()
