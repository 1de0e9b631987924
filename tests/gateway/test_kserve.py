"""The gateway's KServe v2 routes (gateway/kserve.py), on FastAPI's test client with a fake Triton.

Every malformed request is a 400 (or 413) with KServe's {"error": ...} body naming what was
wrong; valid ones, JSON or binary, round-trip through tritonclient.http's own encoder and parser.
"""

import asyncio
import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from fastapi.testclient import TestClient

from triton_rerank.client.errors import InvalidRequestError, ServerUnavailableError
from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.client.triton_io import ScoreOptions
from triton_rerank.gateway.app import GatewaySettings, create_app
from triton_rerank.gateway.dialects import DIALECTS

INFER = "/v2/models/reranker/infer"
GENERATE = "/v2/models/reranker/generate"
QUERY = {"name": "QUERY", "datatype": "BYTES", "shape": [1], "data": ["what is panda?"]}
DOCUMENTS = {"name": "DOCUMENTS", "datatype": "BYTES", "shape": [3], "data": ["hi", "panda", "bamboo"]}


class FakeTriton:
    """Score = -(index + 1) / 4 (exact in float32); token count = characters; with long_documents=chunk a
    document of c characters makes 1 + c // 4 windows (else 1); can fail."""

    where = "Triton at fake:8001 (grpc)"

    def __init__(self, error=None, delay=0.0):
        self.error, self.delay = error, delay
        self.calls = []
        self.options = []

    async def score(self, query, documents, truncate=None, **options):
        self.calls.append((query, list(documents), truncate))
        self.options.append(options)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        scores = -(np.arange(len(documents), dtype=np.float32) + 1) / 4
        chunked = options.get("long_documents") == "chunk"
        windows = np.array([1 + len(d) // 4 if chunked else 1 for d in documents], dtype=np.int32)
        return ScoredDocuments(scores, np.array([len(d) for d in documents], dtype=np.int32), windows)

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def client_for(fake=None, **settings):
    fake = fake or FakeTriton()
    return TestClient(create_app(GatewaySettings(**settings), fake)), fake


def request(**changes):
    """A valid infer request with some fields replaced (DOCUMENTS_x / QUERY_x change one tensor field)."""
    query, documents = dict(QUERY), dict(DOCUMENTS)
    body = {"inputs": [query, documents]}
    for key, value in changes.items():
        if key.startswith(("QUERY_", "DOCUMENTS_")):
            tensor, field = key.split("_", 1)
            (query if tensor == "QUERY" else documents)[field] = value
        else:
            body[key] = value
    return body


def binary_bytes(*texts: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + t for t in texts)


def with_binary_documents(*texts: bytes, size: int | None = None, shape: int | None = None) -> tuple[bytes, dict]:
    """A binary-extension request: JSON header, then DOCUMENTS as length-prefixed elements."""
    data = binary_bytes(*texts)
    documents = {"name": "DOCUMENTS", "datatype": "BYTES", "shape": [len(texts) if shape is None else shape],
                 "parameters": {"binary_data_size": len(data) if size is None else size}}
    header = json.dumps({"inputs": [QUERY, documents]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def post_raw(client, path, body: bytes, headers=None):
    return client.post(path, content=body, headers=headers or {})


# The inputs Triton 2.51 answers with 500, and others it takes wrongly or answers vaguely: each a 400
# here, with a message that names the field. (tests/e2e/test_kserve_front.py sends the 500 ones to both.)
MALFORMED = [
    ("negative shape", request(DOCUMENTS_shape=[-1]), "inputs[1] (DOCUMENTS).shape[0]: Input should be greater than or equal to 0"),
    ("negative query shape", request(QUERY_shape=[-1]), "inputs[0] (QUERY).shape[0]"),
    ("float shape", request(DOCUMENTS_shape=[3.0]), "DOCUMENTS).shape[0]: Input should be a valid integer"),
    ("boolean shape", request(DOCUMENTS_shape=[True]), "DOCUMENTS).shape[0]: Input should be a valid integer"),
    ("string shape", request(DOCUMENTS_shape=["3"]), "DOCUMENTS).shape[0]: Input should be a valid integer"),
    ("shape not a list", request(DOCUMENTS_shape=3), "DOCUMENTS).shape: Input should be a valid list"),
    ("numbers in BYTES", request(DOCUMENTS_data=[1, 2, 3]), "inputs[1] (DOCUMENTS).data[0]: Input should be a valid string"),
    ("number as query", request(QUERY_data=[7]), "inputs[0] (QUERY).data[0]: Input should be a valid string"),
    ("null in BYTES", request(DOCUMENTS_data=["a", None, "c"]), "DOCUMENTS).data[1]: Input should be a valid string"),
    ("boolean in BYTES", request(DOCUMENTS_data=[True, "b", "c"]), "DOCUMENTS).data[0]"),
    ("object in BYTES", request(DOCUMENTS_data=[{"text": "a"}, "b", "c"]), "DOCUMENTS).data[0]"),
    ("nested lists in BYTES", request(DOCUMENTS_data=[["a"], ["b"], ["c"]]), "DOCUMENTS).data[0]"),
    ("data not a list", request(DOCUMENTS_data="abc"), "DOCUMENTS).data: Input should be a valid list"),
    ("lone surrogate", request(QUERY_data=["\ud800"]), "QUERY).data[0]: is not valid Unicode"),
    ("FP32 datatype with strings", request(DOCUMENTS_datatype="FP32"), "DOCUMENTS).datatype: Input should be 'BYTES'"),
    ("INT32 datatype", request(QUERY_datatype="INT32"), "QUERY).datatype: Input should be 'BYTES'"),
    ("datatype not a string", request(DOCUMENTS_datatype=3), "DOCUMENTS).datatype"),
    ("unknown input", request(inputs=[QUERY, DOCUMENTS, {**QUERY, "name": "X"}]),
     "inputs[2] (X).name: Input should be 'QUERY' or 'DOCUMENTS'"),
    ("name not a string", request(DOCUMENTS_name=3), "inputs[1].name"),
    ("input not an object", request(inputs=[QUERY, "DOCUMENTS"]), "inputs[1]: should be a JSON object"),
    ("missing DOCUMENTS", request(inputs=[QUERY]), "missing input DOCUMENTS"),
    ("QUERY twice", request(inputs=[QUERY, QUERY, DOCUMENTS]), "input QUERY is given 2 times"),
    ("too few elements", request(DOCUMENTS_shape=[4]), "DOCUMENTS: shape [4] holds 4 elements, but data has 3"),
    ("too many elements", request(DOCUMENTS_shape=[2]), "DOCUMENTS: shape [2] holds 2 elements, but data has 3"),
    ("two queries", request(QUERY_shape=[2], QUERY_data=["a", "b"]), "takes one query string (shape [1])"),
    ("two-dimensional documents", request(DOCUMENTS_shape=[1, 3]), "is not one-dimensional"),
    ("scalar shape", request(QUERY_shape=[]), "QUERY: shape [] is not one-dimensional"),
    ("empty documents", request(DOCUMENTS_shape=[0], DOCUMENTS_data=[]), "DOCUMENTS is empty"),
    ("no data", request(DOCUMENTS_data=None), "neither is set"),
    ("shared memory", request(DOCUMENTS_parameters={"shared_memory_region": "r"}),
     "DOCUMENTS).parameters.shared_memory_region: unknown field"),
    ("id not a string", request(id=5), "id: Input should be a valid string"),
    ("parameters not an object", request(parameters=[1]), "parameters: should be a JSON object"),
    ("truncate a string", request(parameters={"truncate": "maybe"}), "parameters.truncate: Input should be a valid boolean"),
    ("truncate a number", request(parameters={"truncate": 1}), "parameters.truncate: Input should be a valid boolean"),
    ("unknown parameter", request(parameters={"priority": 1}), "parameters.priority: unknown field"),
    ("unknown output", request(outputs=[{"name": "LOGITS"}]),
     "outputs[0].name: Input should be 'SCORES', 'TOKEN_COUNTS' or 'CHUNK_COUNTS'"),
    ("output name not a string", request(outputs=[{"name": 3}]), "outputs[0].name"),
    ("outputs not a list", request(outputs=3), "outputs: Input should be a valid list"),
    ("output twice", request(outputs=[{"name": "SCORES"}, {"name": "SCORES"}]), "output SCORES is requested 2 times"),
    ("classification", request(outputs=[{"name": "SCORES", "parameters": {"classification": 2}}]),
     "outputs[0].parameters.classification: unknown field"),
    ("no inputs", {}, "inputs: Field required"),
    ("unknown top-level field", request(model="reranker"), "model: unknown field"),
    ("body a list", [QUERY, DOCUMENTS], "the request must be a JSON object, got list"),
    ("many errors", request(DOCUMENTS_shape=[9], DOCUMENTS_data=list(range(9))), "and 4 more"),
]


@pytest.mark.parametrize(("name", "body", "expected"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_json_requests_are_400_saying_what_is_wrong(name, body, expected):
    client, fake = client_for()
    response = client.post(INFER, content=json.dumps(body))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"} and expected in response.json()["error"], response.json()
    assert fake.calls == []


VALID_HEADER = json.dumps(request()).encode()
# The binary tensor extension and plain-body faults: (body, headers, expected message).
MALFORMED_BODIES = [
    ("not JSON", b"{not json", {}, "the body is not valid JSON"),
    ("empty body", b"", {}, "the body is not valid JSON"),
    ("not UTF-8", b'{"inputs": "\xff"}', {}, "the body is not valid JSON"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, {}, "nests JSON arrays or objects too deeply"),
    ("header length larger than the body", VALID_HEADER, {"Inference-Header-Content-Length": "100000"},
     f"Inference-Header-Content-Length is 100000, but the body has {len(VALID_HEADER)} bytes"),
    ("header length not a number", VALID_HEADER, {"Inference-Header-Content-Length": "abc"},
     "Inference-Header-Content-Length must be the JSON header's length in bytes, got 'abc'"),
    ("header length with a number prefix", VALID_HEADER, {"Inference-Header-Content-Length": "20abc"}, "got '20abc'"),
    ("header length in exponent form", VALID_HEADER, {"Inference-Header-Content-Length": "1e2"}, "got '1e2'"),
    ("header length negative", VALID_HEADER, {"Inference-Header-Content-Length": "-5"}, "got '-5'"),
    ("header length empty", VALID_HEADER, {"Inference-Header-Content-Length": ""}, "got ''"),
    ("header length zero", VALID_HEADER, {"Inference-Header-Content-Length": "0"}, "at least 1"),
    ("header length cutting the JSON", VALID_HEADER, {"Inference-Header-Content-Length": "10"},
     "the inference header is not valid JSON"),
    ("bytes after the JSON that no input claims", VALID_HEADER + b"\0\0\0\0",
     {"Inference-Header-Content-Length": str(len(VALID_HEADER))}, "4 bytes after the binary tensors belong to no input"),
    ("binary_data_size without binary data", json.dumps(request(DOCUMENTS_data=None, DOCUMENTS_parameters={
        "binary_data_size": 100})).encode(), {}, "binary_data_size is 100, but only 0 bytes"),
    ("both data and binary_data_size", json.dumps(request(DOCUMENTS_parameters={"binary_data_size": 0})).encode(), {},
     "not both"),
    ("negative binary_data_size", json.dumps(request(DOCUMENTS_parameters={"binary_data_size": -1})).encode(), {},
     "binary_data_size: Input should be greater than or equal to 0"),
]


def _binary_case(name, texts, size=None, shape=None, tail=b""):
    body, headers = with_binary_documents(*texts, size=size, shape=shape)
    return name, body + tail, headers


MALFORMED_BODIES += [
    (*_binary_case("binary element cut short", [b"hi", b"panda"], size=len(binary_bytes(b"hi", b"panda")) - 2),
     "DOCUMENTS[1]: its length says 5 bytes, but only 3 are left"),
    (*_binary_case("binary length prefix cut", [b"hi"], size=len(binary_bytes(b"hi")) + 2, shape=2, tail=b"\0\0"),
     "DOCUMENTS[1]: the binary data ends inside its 4-byte length"),
    (*_binary_case("binary element count above the shape", [b"a", b"b", b"c"], shape=2),
     "DOCUMENTS: shape holds 2 elements, but its binary data has more"),
    (*_binary_case("binary element count below the shape", [b"a", b"b"], shape=3),
     "DOCUMENTS: shape holds 3 elements, but its binary data has 2"),
    (*_binary_case("binary element not UTF-8", [b"ok", b"\xff\xfe"]), "DOCUMENTS[1] is not valid UTF-8"),
]


@pytest.mark.parametrize(("name", "body", "headers", "expected"), MALFORMED_BODIES,
                         ids=[case[0] for case in MALFORMED_BODIES])
def test_malformed_bodies_and_binary_parts_are_400(name, body, headers, expected):
    client, fake = client_for()
    response = post_raw(client, INFER, body, headers)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"], response.json()
    assert fake.calls == []


def test_valid_json_request_gets_triton_shaped_json_outputs():
    client, fake = client_for()
    response = client.post("/v2/models/reranker/versions/1/infer",
                           json=request(id="req-7", parameters={"truncate": False}))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    assert response.json() == {"id": "req-7", "model_name": "reranker", "model_version": "1", "outputs": [
        {"name": "SCORES", "datatype": "FP32", "shape": [1, 3], "data": [-0.25, -0.5, -0.75]},
        {"name": "TOKEN_COUNTS", "datatype": "INT32", "shape": [1, 3], "data": [2, 5, 6]},
        {"name": "CHUNK_COUNTS", "datatype": "INT32", "shape": [1, 3], "data": [1, 1, 1]}]}
    assert fake.calls == [("what is panda?", ["hi", "panda", "bamboo"], False)]
    # truncate not sent: not sent on (the server's default decides, as on the ensemble); outputs as
    # asked, in the order asked.
    only = client.post(INFER, json=request(outputs=[{"name": "TOKEN_COUNTS"}])).json()
    assert [o["name"] for o in only["outputs"]] == ["TOKEN_COUNTS"] and "id" not in only
    assert fake.calls[-1][2] is None


@pytest.mark.parametrize("binary_inputs", [True, False])
@pytest.mark.parametrize("outputs", [None, [("SCORES", True)], [("TOKEN_COUNTS", False), ("SCORES", True)],
                                     [("CHUNK_COUNTS", True)], [("CHUNK_COUNTS", False), ("SCORES", False)]])
def test_tritonclient_http_bodies_round_trip(binary_inputs, outputs):
    """tritonclient.http's own request encoder and response parser: binary and JSON tensors, both ways."""
    client, fake = client_for()
    documents = ["hi", "ünïcödé ✓", "", "panda " * 50]
    query = httpclient.InferInput("QUERY", [1], "BYTES")
    query.set_data_from_numpy(np.array([b"what is panda?"], dtype=object), binary_data=binary_inputs)
    docs = httpclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    docs.set_data_from_numpy(np.array([d.encode() for d in documents], dtype=object), binary_data=binary_inputs)
    requested = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs] if outputs else None
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [query, docs], outputs=requested, request_id="r1", parameters={"long_documents": "chunk"})
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length else {}
    response = post_raw(client, INFER, body, headers)
    assert response.status_code == 200, response.text
    assert fake.calls == [("what is panda?", documents, None)] and fake.options[-1]["long_documents"] == "chunk"
    result = httpclient.InferenceServerClient.parse_response_body(
        response.content, header_length=response.headers.get("inference-header-content-length"))
    assert result.get_response()["id"] == "r1"
    names = [n for n, _ in outputs] if outputs else ["SCORES", "TOKEN_COUNTS", "CHUNK_COUNTS"]
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    if "SCORES" in names:
        scores = result.as_numpy("SCORES")
        assert scores.dtype == np.float32 and scores.shape == (1, 4)
        np.testing.assert_array_equal(scores[0], [-0.25, -0.5, -0.75, -1.0])
    if "TOKEN_COUNTS" in names:
        counts = result.as_numpy("TOKEN_COUNTS")
        assert counts.dtype == np.int32 and counts.tolist() == [[len(d) for d in documents]]
    if "CHUNK_COUNTS" in names:
        windows = result.as_numpy("CHUNK_COUNTS")
        assert windows.dtype == np.int32 and windows.tolist() == [[1 + len(d) // 4 for d in documents]]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies_as_tritonclient_sends_them(algorithm):
    client, fake = client_for()
    compress = gzip.compress if algorithm == "gzip" else zlib.compress
    response = post_raw(client, INFER, compress(VALID_HEADER), {"Content-Encoding": algorithm})
    assert response.status_code == 200 and fake.calls[0][1] == ["hi", "panda", "bamboo"]


@pytest.mark.parametrize(("body", "headers", "status", "expected"), [
    (VALID_HEADER, {"Content-Encoding": "br"}, 415, "Content-Encoding 'br' is not supported"),
    (b"not gzip", {"Content-Encoding": "gzip"}, 400, "the body is not valid gzip data"),
    (gzip.compress(VALID_HEADER)[:-12], {"Content-Encoding": "gzip"}, 400, "the gzip body is cut short"),
    # A small body that expands past the body size limit is refused without expanding it all.
    (gzip.compress(b" " * 5_000_000), {"Content-Encoding": "gzip"}, 413, "the decompressed request body is more than"),
])
def test_compressed_bodies_that_are_refused(body, headers, status, expected):
    client, fake = client_for(max_body_bytes=1_000_000)
    response = post_raw(client, INFER, body, headers)
    assert response.status_code == status and expected in response.json()["error"], response.text
    assert fake.calls == []


def test_inflated_bodies_count_against_the_shared_body_budget():
    # 20 KB compressed to a few hundred bytes: within the body limit, but its inflated size is not
    # within what the gateway may hold at once.
    padded = VALID_HEADER + b" " * 20_000  # JSON allows trailing whitespace
    client, fake = client_for(max_body_bytes=30_000, max_buffered_bytes=30_000)
    assert post_raw(client, INFER, gzip.compress(padded), {"Content-Encoding": "gzip"}).status_code == 200
    client.app.state.body_budget.take(15_000)  # another request's body, held meanwhile
    response = post_raw(client, INFER, gzip.compress(padded), {"Content-Encoding": "gzip"})
    assert response.status_code == 503 and "--max-buffered-bytes" in response.json()["error"], response.text
    assert response.headers["Retry-After"]
    client.app.state.body_budget.give_back(15_000)
    assert client.app.state.body_budget.used == 0  # what the refused and the answered request held is back
    assert len(fake.calls) == 1


def test_generate_extension_answers_as_triton_does():
    client, fake = client_for()
    two = client.post(GENERATE, json={"QUERY": "q", "DOCUMENTS": ["hi", "panda"], "truncate": False}).json()
    assert two == {"model_name": "reranker", "model_version": "1", "SCORES": [-0.25, -0.5], "TOKEN_COUNTS": [2, 5],
                   "CHUNK_COUNTS": [1, 1]}
    # One element: a bare value, as Triton writes it. A lone string is a one-element tensor.
    one = client.post("/v2/models/reranker/versions/1/generate",
                      json={"QUERY": ["q"], "DOCUMENTS": "hi", "parameters": {"truncate": True}}).json()
    assert one["SCORES"] == -0.25 and one["TOKEN_COUNTS"] == 2 and one["CHUNK_COUNTS"] == 1
    assert fake.calls == [("q", ["hi", "panda"], False), ("q", ["hi"], True)]


@pytest.mark.parametrize(("body", "expected"), [
    ({"QUERY": "q", "DOCUMENTS": [1, 2]}, "DOCUMENTS[0]: Input should be a valid string"),
    ({"QUERY": 5, "DOCUMENTS": ["a"]}, "QUERY[0]: Input should be a valid string"),
    ({"QUERY": True, "DOCUMENTS": ["a"]}, "QUERY[0]: Input should be a valid string"),
    ({"QUERY": "q", "DOCUMENTS": [None]}, "DOCUMENTS[0]: Input should be a valid string"),
    ({"QUERY": "q", "DOCUMENTS": [["a"], ["b"]]}, "DOCUMENTS[0]: Input should be a valid string"),
    ({"QUERY": "q", "DOCUMENTS": {"a": 1}}, "DOCUMENTS[0]: Input should be a valid string"),
    ({"QUERY": ["a", "b"], "DOCUMENTS": ["a"]}, "QUERY: the reranker takes one query string, got 2"),
    ({"QUERY": [], "DOCUMENTS": ["a"]}, "QUERY: the reranker takes one query string, got 0"),
    ({"QUERY": "q", "DOCUMENTS": []}, "DOCUMENTS is empty"),
    ({"QUERY": "q"}, "DOCUMENTS: Field required"),
    ({"QUERY": "q", "DOCUMENTS": ["a"], "truncate": "yes"}, "truncate: Input should be a valid boolean"),
    ({"QUERY": "q", "DOCUMENTS": ["a"], "truncate": True, "parameters": {"truncate": False}}, "truncate is given twice"),
    ({"QUERY": "q", "DOCUMENTS": ["a"], "stream": True}, "stream: unknown field"),
    ({"QUERY": "q", "DOCUMENTS": ["a"], "parameters": {"binary_data_output": True}}, "parameters.binary_data_output"),
    ([1, 2], "the request must be a JSON object, got list"),
    ("text", "the request must be a JSON object, got str"),
])
def test_malformed_generate_requests_are_400(body, expected):
    client, fake = client_for()
    response = client.post(GENERATE, content=json.dumps(body))
    assert response.status_code == 400 and expected in response.json()["error"], response.text
    assert fake.calls == []


@pytest.mark.parametrize("path", ["/v2/models/tokenizer/infer", "/v2/models/cross_encoder/versions/1/infer",
                                  "/v2/models/reranker/versions/2/infer", "/v2/models/other/generate"])
def test_other_models_and_versions_are_404_in_kserve_shape(path):
    client, fake = client_for()
    response = client.post(path, json=request())
    assert response.status_code == 404 and "is not served here" in response.json()["error"]
    assert "'reranker' version 1" in response.json()["error"] and fake.calls == []


@pytest.mark.parametrize(("error", "status", "header"), [
    (InvalidRequestError("in ensemble 'reranker', document 0 makes a pair of 9007 tokens"), 400, None),
    (ServerUnavailableError("Triton at fake:8001 (grpc) is unavailable: queue full"), 503, "1"),
])
def test_triton_errors_keep_their_meaning(error, status, header):
    client, _ = client_for(FakeTriton(error=error))
    for path, body in ((INFER, request()), (GENERATE, {"QUERY": "q", "DOCUMENTS": ["a"]})):
        response = client.post(path, json=body)
        assert response.status_code == status and response.json() == {"error": str(error)}
        assert response.headers.get("retry-after") == header


def test_the_gateway_limits_apply_in_kserve_shape():
    client, fake = client_for(max_documents=2, max_body_bytes=2000, api_key="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    refused = client.post(INFER, json=request())
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.post(GENERATE, json={"QUERY": "q", "DOCUMENTS": ["a"]}).status_code == 401
    too_many = client.post(INFER, json=request(), headers=auth)
    assert too_many.status_code == 413 and "3 documents in one request; the limit is 2" in too_many.json()["error"]
    # Binary documents over the limit are refused before their bytes are read.
    body, headers = with_binary_documents(*[b"x"] * 3)
    assert post_raw(client, INFER, body, {**headers, **auth}).status_code == 413
    generate = client.post(GENERATE, json={"QUERY": "q", "DOCUMENTS": ["a", "b", "c"]}, headers=auth)
    assert generate.status_code == 413 and "the limit is 2" in generate.json()["error"]
    too_big = client.post(INFER, json=request(DOCUMENTS_shape=[1], DOCUMENTS_data=["x" * 3000]), headers=auth)
    assert too_big.status_code == 413 and "the limit is 2000 bytes" in too_big.json()["error"]
    assert fake.calls == []
    ok = client.post(INFER, json=request(DOCUMENTS_shape=[2], DOCUMENTS_data=["a", "b"]), headers=auth)
    assert ok.status_code == 200 and len(fake.calls) == 1


def test_overload_is_429_in_kserve_shape():
    import httpx

    async def scenario():
        app = create_app(GatewaySettings(max_concurrency=1, max_queue=0), FakeTriton(delay=0.3))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            return await asyncio.gather(*(client.post(INFER, json=request()) for _ in range(3)))

    responses = asyncio.run(scenario())
    assert sorted(r.status_code for r in responses) == [200, 429, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert "overloaded" in refused.json()["error"] and refused.headers["retry-after"] == "1"


def test_kserve_routes_are_counted_but_not_a_dialect_nor_in_the_schema():
    client, _ = client_for()
    client.post(INFER, json=request())
    client.post(INFER, json=request(DOCUMENTS_shape=[-1]))
    metrics = client.get("/metrics").text
    assert 'triton_rerank_gateway_requests_total{route="/v2/models/reranker/infer",status="200"} 1.0' in metrics
    assert 'triton_rerank_gateway_errors_total{kind="invalid_request",route="/v2/models/reranker/infer"} 1.0' in metrics
    assert 'triton_rerank_gateway_documents_total{route="/v2/models/reranker/infer"} 3.0' in metrics
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/v2/models")]
    assert [path for dialect in DIALECTS for path in dialect.paths] == ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/ranking",
                                                                       "/score", "/v1/score"]


def sent_to_triton(fake) -> dict:
    """The request parameters the gateway's last ensemble call carries (what the client sends Triton)."""
    return ScoreOptions(fake.calls[-1][2], **fake.options[-1]).parameters()


def test_truncation_direction_and_max_tokens_per_doc_reach_the_ensemble():
    client, fake = client_for()
    assert client.post(INFER, json=request(parameters={"truncation_direction": "left", "max_tokens_per_doc": 8})
                       ).status_code == 200
    assert sent_to_triton(fake) == {"truncation_direction": "left", "max_tokens_per_doc": 8}
    assert client.post(GENERATE, json={"QUERY": "q", "DOCUMENTS": ["a"], "truncation_direction": "left"}).status_code == 200
    assert sent_to_triton(fake) == {"truncation_direction": "left"}
    assert client.post(GENERATE, json={"QUERY": "q", "DOCUMENTS": ["a"],
                                       "parameters": {"max_tokens_per_doc": 3}}).status_code == 200
    assert sent_to_triton(fake) == {"max_tokens_per_doc": 3}


CHUNKED = {"long_documents": "chunk", "chunk_overlap": 8, "max_chunks_per_doc": 5}


@pytest.mark.parametrize(("path", "body"), [
    (INFER, request(parameters=CHUNKED)),
    (INFER, request(parameters={**CHUNKED, "long_documents": "Chunk", "truncate": True})),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["hi", "panda", "bamboo"], **CHUNKED}),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["hi", "panda", "bamboo"], "parameters": CHUNKED}),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["hi", "panda", "bamboo"], "long_documents": "chunk",
                "parameters": {"chunk_overlap": 8, "max_chunks_per_doc": 5}}),
])
def test_long_document_parameters_reach_the_ensemble_and_chunk_counts_come_back(path, body):
    client, fake = client_for()
    answer = client.post(path, json=body)
    assert answer.status_code == 200, answer.text
    # long_documents alone: truncate=true only says "do not refuse", which chunk does not.
    assert sent_to_triton(fake) == CHUNKED
    windows = [1, 2, 2]  # the fake's windows of "hi", "panda", "bamboo"
    if path == GENERATE:
        assert answer.json()["CHUNK_COUNTS"] == windows
    else:
        assert answer.json()["outputs"][2] == {"name": "CHUNK_COUNTS", "datatype": "INT32", "shape": [1, 3],
                                               "data": windows}


@pytest.mark.parametrize(("path", "body", "message"), [
    (INFER, request(parameters={"truncation_direction": "middle"}), "parameters.truncation_direction"),
    (INFER, request(parameters={"max_tokens_per_doc": 0}), "parameters.max_tokens_per_doc"),
    (INFER, request(parameters={"truncate": False, "max_tokens_per_doc": 4}), "needs truncate=True"),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["a"], "truncation_direction": "left",
                "parameters": {"truncation_direction": "right"}}, "truncation_direction is given twice"),
    (INFER, request(parameters={"long_documents": "split"}),
     "parameters.long_documents: Input should be 'truncate', 'chunk' or 'error'"),
    (INFER, request(parameters={"long_documents": 1}), "parameters.long_documents"),
    (INFER, request(parameters={"chunk_overlap": -1}),
     "parameters.chunk_overlap: Input should be greater than or equal to 0"),
    (INFER, request(parameters={"chunk_overlap": "32"}), "parameters.chunk_overlap: Input should be a valid integer"),
    (INFER, request(parameters={"max_chunks_per_doc": 0}),
     "parameters.max_chunks_per_doc: Input should be greater than 0"),
    (INFER, request(parameters={"max_chunks_per_doc": True}), "parameters.max_chunks_per_doc"),
    (INFER, request(parameters={"truncate": False, "long_documents": "chunk"}), "contradict each other"),
    (INFER, request(parameters={"long_documents": "chunk", "max_tokens_per_doc": 4}), "send one of the two"),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["a"], "long_documents": "chunk", "chunk_overlap": 1,
                "parameters": {"long_documents": "chunk", "chunk_overlap": 2}},
     "chunk_overlap, long_documents are given twice"),
    (GENERATE, {"QUERY": "q", "DOCUMENTS": ["a"], "max_chunks_per_doc": -3}, "max_chunks_per_doc"),
])
def test_bad_truncation_options_are_400s_saying_why(path, body, message):
    client, fake = client_for()
    answer = client.post(path, json=body)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert fake.calls == []
