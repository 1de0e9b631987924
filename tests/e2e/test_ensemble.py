"""The `reranker` ensemble through a real tritonserver, over HTTP and gRPC."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

QUERY = "what is panda?"
DOCUMENTS = [
    "hi",
    "The giant panda is a bear native to south central China.",
    "panda panda panda",
    "A search engine ranks documents by relevance to the query with a neural network model.",
]


def make_inputs(module, query, documents):
    q = module.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = module.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([doc.encode() for doc in documents], dtype=object))
    return [q, d]


def rerank_http(url, query, documents, parameters=None):
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", make_inputs(httpclient, query, documents), parameters=parameters)
    return result.as_numpy("SCORES").reshape(-1), result.as_numpy("TOKEN_COUNTS").reshape(-1)


def rerank_grpc(url, query, documents, parameters=None):
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", make_inputs(grpcclient, query, documents), parameters=parameters)
    return result.as_numpy("SCORES").reshape(-1), result.as_numpy("TOKEN_COUNTS").reshape(-1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_scores_match_transformers(triton_server, reference_scores, protocol):
    call = rerank_http if protocol == "http" else rerank_grpc
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    scores, token_counts = call(url, QUERY, DOCUMENTS)
    expected = reference_scores(triton_server.model_dir, QUERY, DOCUMENTS)
    assert scores.dtype == np.float32 and scores.shape == (len(DOCUMENTS),)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
    # Distinct documents give distinct scores: the order is not an accident of equal values.
    assert len(set(np.round(scores, 5))) == len(DOCUMENTS)
    assert token_counts.shape == (len(DOCUMENTS),)
    assert np.all(token_counts[1:] > token_counts[0])


def test_long_document_is_truncated_to_the_model_limit(triton_server, reference_scores):
    long_document = "the giant panda eats bamboo in the mountain forest " * 120
    scores, token_counts = rerank_grpc(triton_server.grpc_url, QUERY, [long_document, "hi"])
    assert token_counts[0] == 512  # the tiny models' limit: truncated, not refused
    expected = reference_scores(triton_server.model_dir, QUERY, [long_document, "hi"], max_length=512)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


def test_truncate_false_refuses_a_too_long_pair(xlmr_server):
    long_document = "panda " * 2000
    with pytest.raises(InferenceServerException) as error:
        rerank_http(xlmr_server.http_url, QUERY, ["short", long_document], parameters={"truncate": False})
    assert error.value.status() == "400"
    assert "document 1" in error.value.message()


def test_concurrent_requests_of_different_lengths_share_executions(xlmr_server, reference_scores):
    requests = [(f"query number {i} about pandas", ["bamboo forest " * (1 + i % 7)] * (1 + i % 5) + ["hi"])
                for i in range(16)]
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        before = client.get_inference_statistics("cross_encoder", as_json=True)["model_stats"][0]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: rerank_grpc(xlmr_server.grpc_url, *r), requests))
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        after = client.get_inference_statistics("cross_encoder", as_json=True)["model_stats"][0]
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    assert inferences == 16
    assert executions < 16, f"16 requests took {executions} cross_encoder executions: no dynamic batching"
    for (query, documents), (scores, _) in zip(requests, results, strict=True):
        np.testing.assert_allclose(scores, reference_scores(xlmr_server.model_dir, query, documents), atol=1e-4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_empty_documents_is_invalid_argument_and_server_stays_up(xlmr_server, protocol):
    before, _ = rerank_grpc(xlmr_server.grpc_url, QUERY, DOCUMENTS)
    call = rerank_http if protocol == "http" else rerank_grpc
    url = xlmr_server.http_url if protocol == "http" else xlmr_server.grpc_url
    with pytest.raises(InferenceServerException) as error:
        call(url, QUERY, [])
    expected_status = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    assert error.value.status() == expected_status
    assert "DOCUMENTS is empty" in error.value.message()
    with httpclient.InferenceServerClient(xlmr_server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("reranker")
    after, _ = rerank_grpc(xlmr_server.grpc_url, QUERY, DOCUMENTS)
    np.testing.assert_array_equal(before, after)


def test_empty_query_is_invalid_argument(xlmr_server):
    with pytest.raises(InferenceServerException) as error:
        rerank_http(xlmr_server.http_url, "   ", ["a document"])
    assert error.value.status() == "400" and "QUERY is empty" in error.value.message()


def test_generate_endpoint_maps_json_lists(xlmr_server):
    import requests

    body = {"QUERY": QUERY, "DOCUMENTS": DOCUMENTS[:3]}
    response = requests.post(f"http://{xlmr_server.http_url}/v2/models/reranker/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    expected, _ = rerank_http(xlmr_server.http_url, QUERY, DOCUMENTS[:3])
    np.testing.assert_allclose(response.json()["SCORES"], expected, atol=1e-6)


def test_perf_analyzer_smoke(xlmr_server, tmp_path):
    from triton_rerank.bench.perf_analyzer import (
        perf_analyzer_binary,
        perf_analyzer_environment,
        write_input_data,
    )

    data = write_input_data(tmp_path / "input.json", [(QUERY, DOCUMENTS[:4]), ("bamboo", ["bamboo forest"] * 8)])
    csv = tmp_path / "perf.csv"
    command = [
        str(perf_analyzer_binary()), "-m", "reranker", "-u", xlmr_server.grpc_url, "-i", "grpc",
        "--input-data", str(data), "--concurrency-range", "1:2", "--measurement-interval", "1000",
        # A smoke run, not a measurement: accept any variation between windows, so a busy
        # machine cannot fail it on stability.
        "--stability-percentage", "999", "--max-trials", "10", "-f", str(csv),
    ]
    result = subprocess.run(command, env=perf_analyzer_environment(tmp_path / "libs"), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second")
    throughputs = [float(row.split(",")[1]) for row in rows[1:]]
    assert len(throughputs) == 2 and all(t > 0 for t in throughputs)
    assert json.loads(data.read_text())["data"][1]["DOCUMENTS"]["shape"] == [8]


@pytest.mark.parametrize(("engine", "attention_backend"), [("packed", "triton"), ("hf", "")])
def test_other_scoring_engines_through_the_server(tiny_model_dirs, start_extra_server, reference_scores,
                                                  engine, attention_backend):
    """The Triton-kernel attention (interpreted on CPU) and the transformers reference, served."""
    running = start_extra_server(tiny_model_dirs["xlm-roberta"], "xlm-roberta", engine=engine,
                                 attention_backend=attention_backend)
    scores, _ = rerank_grpc(running.grpc_url, QUERY, DOCUMENTS[:3])
    np.testing.assert_allclose(scores, reference_scores(running.model_dir, QUERY, DOCUMENTS[:3]), atol=1e-4)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v2/repository/index"), ("GET", "/v2/systemsharedmemory/status"),
     ("POST", "/v2/repository/models/reranker/unload"), ("GET", "/v2/trace/setting"), ("GET", "/v2/logging")],
)
def test_admin_apis_are_closed(xlmr_server, method, path):
    import requests

    response = requests.request(method, f"http://{xlmr_server.http_url}{path}", timeout=10)
    assert response.status_code == 403, response.text
    with httpclient.InferenceServerClient(xlmr_server.http_url) as client:
        assert client.is_model_ready("reranker")


def test_admin_apis_are_closed_over_grpc(xlmr_server):
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("reranker")
        assert client.is_model_ready("reranker")
