"""KServe v2 through the gateway (gateway/kserve.py) in front of a real tritonserver.

Triton 2.51's HTTP frontend answers 500 to the malformed requests below; the gateway, which
deploy/nginx.conf puts in front of the ensemble's HTTP inference, answers 400 with a message.
Valid requests, JSON or binary (tritonclient.http's default), get Triton's answer.
"""

import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from triton_rerank.gateway.server import GatewayThread
from triton_rerank.gateway.settings import GatewaySettings
from triton_rerank.launcher.server import free_ports

INFER = "/v2/models/reranker/infer"
GENERATE = "/v2/models/reranker/generate"
QUERY = "what is panda?"
DOCUMENTS = ["hi", "The giant panda is a bear native to south central China.", "panda panda panda", "ünïcödé ✓"]


def infer_body(query: dict | None = None, documents: dict | None = None, **fields) -> bytes:
    """A KServe v2 JSON request with some tensor fields replaced."""
    q = {"name": "QUERY", "datatype": "BYTES", "shape": [1], "data": [QUERY]} | (query or {})
    d = {"name": "DOCUMENTS", "datatype": "BYTES", "shape": [2], "data": DOCUMENTS[:2]} | (documents or {})
    return json.dumps({"inputs": [q, d]} | fields).encode()


VALID = infer_body()
HEADER = "Inference-Header-Content-Length"

# (case, path, body, headers, Triton 2.51's status): the 500s reproduced, and the neighbouring faults that
# Triton already answers with 400 (for those the gateway keeps 400, with a clearer message).
CASES = [
    ("negative shape", INFER, infer_body(documents={"shape": [-1]}), {}, 500),
    ("negative QUERY shape", INFER, infer_body(query={"shape": [-1]}), {}, 500),
    ("float shape", INFER, infer_body(documents={"shape": [1.5]}), {}, 500),
    ("string shape", INFER, infer_body(documents={"shape": ["2"]}), {}, 500),
    ("shape not a list", INFER, infer_body(documents={"shape": 2}), {}, 500),
    ("numbers in a BYTES tensor", INFER, infer_body(documents={"data": [1, 2]}), {}, 500),
    ("number as QUERY", INFER, infer_body(query={"data": [7]}), {}, 500),
    ("null in a BYTES tensor", INFER, infer_body(documents={"data": ["a", None]}), {}, 500),
    ("boolean in a BYTES tensor", INFER, infer_body(documents={"data": [True, "b"]}), {}, 500),
    ("object in a BYTES tensor", INFER, infer_body(documents={"data": [{"a": 1}, "b"]}), {}, 500),
    ("strings in an FP32 tensor", INFER, infer_body(documents={"datatype": "FP32"}), {}, 500),
    ("strings in an INT32 tensor", INFER, infer_body(query={"datatype": "INT32"}), {}, 500),
    ("data not a list", INFER, infer_body(documents={"shape": [1], "data": "abc"}), {}, 500),
    ("input name a number", INFER, infer_body(documents={"name": 3}), {}, 500),
    ("datatype a number", INFER, infer_body(documents={"datatype": 3}), {}, 500),
    ("id a number", INFER, infer_body(id=5), {}, 500),
    ("parameters not an object", INFER, infer_body(parameters=[1]), {}, 500),
    ("outputs not a list", INFER, infer_body(outputs=3), {}, 500),
    ("output name a number", INFER, infer_body(outputs=[{"name": 3}]), {}, 500),
    ("no inputs", INFER, b"{}", {}, 500),
    ("body a JSON list", INFER, b"[1, 2]", {}, 500),
    ("body not JSON", INFER, b"{not json", {}, 500),
    ("header length with a number prefix", INFER, VALID, {HEADER: "20abc"}, 500),
    ("header length in exponent form", INFER, VALID, {HEADER: "1e2"}, 500),
    ("header length cutting the JSON", INFER, VALID, {HEADER: "10"}, 500),
    ("header length one short", INFER, VALID, {HEADER: str(len(VALID) - 1)}, 500),
    ("generate: numbers in DOCUMENTS", GENERATE, b'{"QUERY": "q", "DOCUMENTS": [1, 2]}', {}, 500),
    ("generate: number as QUERY", GENERATE, b'{"QUERY": 5, "DOCUMENTS": ["a"]}', {}, 500),
    ("generate: null in DOCUMENTS", GENERATE, b'{"QUERY": "q", "DOCUMENTS": [null]}', {}, 500),
    ("generate: body a JSON list", GENERATE, b"[1, 2]", {}, 500),
    ("generate: body not JSON", GENERATE, b"{x", {}, 500),
    ("too few elements for the shape", INFER, infer_body(documents={"shape": [3]}), {}, 400),
    ("too many elements for the shape", INFER, infer_body(documents={"shape": [1]}), {}, 400),
    ("header length larger than the body", INFER, VALID, {HEADER: str(len(VALID) + 1)}, 400),
    ("header length not a number", INFER, VALID, {HEADER: "abc"}, 400),
]


@pytest.fixture(scope="module")
def xlmr(server_pool):
    return server_pool.get("xlm-roberta")


def gateway_in_process(server):
    """The gateway in this process (uvicorn in a thread), a gRPC client of the server: its URL while in use."""
    (port,) = free_ports(1)
    thread = GatewayThread(GatewaySettings(triton_url=server.grpc_url, port=port, log_level="warning")).start()
    yield f"http://127.0.0.1:{port}"
    thread.stop()


@pytest.fixture(scope="module")
def gateway(xlmr):
    yield from gateway_in_process(xlmr)


def post(url: str, path: str, body: bytes, headers: dict) -> requests.Response:
    return requests.post(url + path, data=body, headers={"Content-Type": "application/json", **headers}, timeout=60)


@pytest.mark.parametrize(("case", "path", "body", "headers", "triton_status"), CASES, ids=[c[0] for c in CASES])
def test_triton_status_and_the_gateways_400(xlmr, gateway, case, path, body, headers, triton_status):
    direct = post(f"http://{xlmr.http_url}", path, body, headers)
    # What Triton answers, for the record: if this changes, a newer Triton validates these itself.
    assert direct.status_code == triton_status, (direct.status_code, direct.text)
    fronted = post(gateway, path, body, headers)
    assert fronted.status_code == 400, fronted.text
    assert fronted.headers["content-type"] == "application/json"
    assert set(fronted.json()) == {"error"} and len(fronted.json()["error"]) > 20


def test_triton_and_the_gateway_keep_serving(xlmr, gateway):
    assert requests.get(f"http://{xlmr.http_url}/v2/health/ready", timeout=10).status_code == 200
    assert post(gateway, INFER, VALID, {}).status_code == 200


def direct_scores(url: str, documents: list[str], truncate: bool = True):
    """SCORES and TOKEN_COUNTS from tritonclient.http straight to Triton."""
    query = httpclient.InferInput("QUERY", [1], "BYTES")
    query.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    docs = httpclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    docs.set_data_from_numpy(np.array([d.encode() for d in documents], dtype=object))
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", [query, docs], parameters={"truncate": truncate}, request_id="r-1")
    return result.as_numpy("SCORES"), result.as_numpy("TOKEN_COUNTS")


def test_valid_json_request_equals_triton(xlmr, gateway):
    scores, tokens = direct_scores(xlmr.http_url, DOCUMENTS)
    body = infer_body(documents={"shape": [len(DOCUMENTS)], "data": DOCUMENTS}, id="r-1",
                      parameters={"truncate": True})
    ours = post(gateway, "/v2/models/reranker/versions/1/infer", body, {})
    theirs = post(f"http://{xlmr.http_url}", "/v2/models/reranker/versions/1/infer", body, {})
    assert ours.status_code == theirs.status_code == 200
    answer, triton = ours.json(), theirs.json()
    assert {k: answer[k] for k in ("id", "model_name", "model_version")} == {
        k: triton[k] for k in ("id", "model_name", "model_version")}
    # Triton lists the outputs in no fixed order; each has the same name, datatype and shape.
    by_name = {o["name"]: o for o in triton["outputs"]}
    assert [o["name"] for o in answer["outputs"]] == ["SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"]
    assert set(by_name) == {"SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"}
    for output in answer["outputs"]:
        assert {k: output[k] for k in ("datatype", "shape")} == {k: by_name[output["name"]][k] for k in ("datatype", "shape")}
    np.testing.assert_allclose(answer["outputs"][0]["data"], scores.reshape(-1), atol=1e-6, rtol=0)
    assert answer["outputs"][1]["data"] == tokens.reshape(-1).tolist()
    assert answer["outputs"][2]["data"] == by_name["CHUNK_COUNTS"]["data"] == [1] * len(DOCUMENTS)


def test_tritonclient_http_through_the_gateway_equals_triton(xlmr, gateway):
    """tritonclient.http's default request (binary tensors both ways) and the generate extension."""
    scores, tokens = direct_scores(xlmr.http_url, DOCUMENTS, truncate=False)
    fronted_scores, fronted_tokens = direct_scores(gateway.removeprefix("http://"), DOCUMENTS, truncate=False)
    assert fronted_scores.dtype == np.float32 and fronted_scores.shape == scores.shape == (1, len(DOCUMENTS))
    np.testing.assert_allclose(fronted_scores, scores, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(fronted_tokens, tokens)
    generated = post(gateway, GENERATE, json.dumps({"QUERY": QUERY, "DOCUMENTS": DOCUMENTS}).encode(), {}).json()
    np.testing.assert_allclose(generated["SCORES"], scores.reshape(-1), atol=1e-6, rtol=0)
    assert generated["TOKEN_COUNTS"] == tokens.reshape(-1).tolist()


def test_tritons_own_refusals_keep_their_message(gateway):
    """A pair too long with truncate off: Triton's INVALID_ARG, as 400 with its message."""
    body = infer_body(documents={"shape": [1], "data": ["panda " * 2000]}, parameters={"truncate": False})
    refused = post(gateway, INFER, body, {})
    assert refused.status_code == 400
    assert "document 0" in refused.json()["error"] and "truncate" in refused.json()["error"]


# Longer than the tiny model's 512-token window, in words of its vocabulary; start and end differ.
LONG_DOCUMENT = "river water city " * 500 + "the giant panda lives in the bamboo forest " * 220
CHUNKED = [DOCUMENTS[0], LONG_DOCUMENT, DOCUMENTS[1]]
CHUNK_PARAMETERS = {"long_documents": "chunk", "chunk_overlap": 16}


# Chunking is compared on the BERT server, whose test tokenizer keeps whole words: its long documents
# make many windows of few characters each (tests/e2e/test_long_documents.py covers XLM-R).
@pytest.fixture(scope="module")
def bert(server_pool):
    return server_pool.get("bert")


@pytest.fixture(scope="module")
def bert_gateway(bert):
    yield from gateway_in_process(bert)


def test_chunked_json_request_equals_triton(bert, bert_gateway):
    body = infer_body(documents={"shape": [len(CHUNKED)], "data": CHUNKED}, id="c-1", parameters=CHUNK_PARAMETERS)
    ours = post(bert_gateway, INFER, body, {})
    theirs = post(f"http://{bert.http_url}", INFER, body, {})
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    answer, triton = ours.json(), theirs.json()
    assert answer["id"] == triton["id"] == "c-1"
    by_name = {o["name"]: o for o in triton["outputs"]}
    assert [o["name"] for o in answer["outputs"]] == ["SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"]
    assert set(by_name) == {"SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"}
    for output in answer["outputs"]:
        theirs_ = by_name[output["name"]]
        assert {k: output[k] for k in ("datatype", "shape")} == {k: theirs_[k] for k in ("datatype", "shape")}
        if output["name"] == "SCORES":
            np.testing.assert_allclose(output["data"], theirs_["data"], atol=1e-5, rtol=0)
        else:
            assert output["data"] == theirs_["data"], output["name"]
    windows = by_name["CHUNK_COUNTS"]["data"]
    assert windows[0] == windows[2] == 1 and windows[1] >= 5  # the comparison covers a chunked document


def chunked_outputs(url: str, outputs: list[str], binary: bool):
    """tritonclient.http asking for some outputs only, as binary tensors or JSON."""
    query = httpclient.InferInput("QUERY", [1], "BYTES")
    query.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    docs = httpclient.InferInput("DOCUMENTS", [len(CHUNKED)], "BYTES")
    docs.set_data_from_numpy(np.array([d.encode() for d in CHUNKED], dtype=object))
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", [query, docs], outputs=requested, parameters=CHUNK_PARAMETERS)
    # Triton lists the outputs in no fixed order; the gateway in the order asked.
    assert sorted(o["name"] for o in result.get_response()["outputs"]) == sorted(outputs)
    return [result.as_numpy(name) for name in outputs]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("outputs", [["CHUNK_COUNTS"], ["CHUNK_COUNTS", "SCORES"], ["TOKEN_COUNTS", "CHUNK_COUNTS"]])
def test_chunk_counts_asked_for_alone_equal_triton(bert, bert_gateway, outputs, binary):
    # Triton 2.51 refuses a request for one tokenizer-step output alone (CHUNK_COUNTS or TOKEN_COUNTS:
    # "unexpected deadlock"); the gateway answers it. Triton's tensors come from a request for all three.
    everything = ["SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"]
    theirs = dict(zip(everything, chunked_outputs(bert.http_url, everything, binary), strict=True))
    ours = chunked_outputs(bert_gateway.removeprefix("http://"), outputs, binary)
    for name, mine in zip(outputs, ours, strict=True):
        triton = theirs[name]
        assert mine.dtype == triton.dtype and mine.shape == triton.shape == (1, len(CHUNKED)), name
        np.testing.assert_allclose(mine, triton, atol=1e-5 if name == "SCORES" else 0, rtol=0)
    assert theirs["CHUNK_COUNTS"][0, 1] >= 5


def test_chunked_generate_equals_triton(bert, bert_gateway):
    body = json.dumps({"QUERY": QUERY, "DOCUMENTS": CHUNKED, **CHUNK_PARAMETERS}).encode()
    ours = post(bert_gateway, GENERATE, body, {}).json()
    theirs = post(f"http://{bert.http_url}", GENERATE, body, {}).json()
    # Triton's answer also has sequence_id, sequence_start and sequence_end, which mean nothing for the ensemble.
    assert set(ours) == {"model_name", "model_version", "SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"} < set(theirs)
    assert ours["CHUNK_COUNTS"] == theirs["CHUNK_COUNTS"] and ours["CHUNK_COUNTS"][1] >= 5
    assert ours["TOKEN_COUNTS"] == theirs["TOKEN_COUNTS"]
    np.testing.assert_allclose(ours["SCORES"], theirs["SCORES"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [INFER, GENERATE])
def test_an_overlap_as_long_as_the_window_is_400_from_both(bert, bert_gateway, path):
    """Triton refuses it (INVALID_ARG); the gateway passes Triton's message on."""
    if path == INFER:
        body = infer_body(documents={"shape": [len(CHUNKED)], "data": CHUNKED},
                          parameters={"long_documents": "chunk", "chunk_overlap": 100000})
    else:
        body = json.dumps({"QUERY": QUERY, "DOCUMENTS": CHUNKED, "long_documents": "chunk",
                           "chunk_overlap": 100000}).encode()
    theirs = post(f"http://{bert.http_url}", path, body, {})
    ours = post(bert_gateway, path, body, {})
    assert theirs.status_code == ours.status_code == 400, (theirs.text, ours.text)
    assert "chunk_overlap" in theirs.json()["error"] and "chunk_overlap" in ours.json()["error"]
