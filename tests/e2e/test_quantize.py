"""`compile` and `quantize int8` through the running server: the compiled float32 encoder keeps parity
with transformers, the int8 encoder's scores follow transformers' float32 over gRPC (tritonclient)
and the gateway's /v1/rerank, and the server says what it runs."""

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from triton_rerank.gateway.server import GatewayThread
from triton_rerank.gateway.settings import GatewaySettings
from triton_rerank.launcher.server import free_ports
from triton_rerank.models.dtypes import int8_instructions

from .test_metrics import encoder_info

needs_int8 = pytest.mark.skipif(not int8_instructions(), reason="this CPU has no int8 dot-product instructions")

QUERY = "what do giant pandas eat in the wild"
DOCUMENTS = ["bamboo", "the giant panda eats bamboo shoots and leaves", "a search engine for the web",
             "pandas are bears that live in the mountains of china " * 6, "b"]


def grpc_scores(url: str) -> np.ndarray:
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(DOCUMENTS)], "BYTES")
    d.set_data_from_numpy(np.array([doc.encode() for doc in DOCUMENTS], dtype=object))
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer("reranker", [q, d]).as_numpy("SCORES").reshape(-1)


def test_compiled_float32_server_keeps_parity_with_transformers(start_extra_server, tiny_model_dirs,
                                                                reference_scores):
    running = start_extra_server(tiny_model_dirs["xlm-roberta"], "xlm-roberta", dtype="float32", compile=True)
    expected = reference_scores(running.model_dir, QUERY, DOCUMENTS)
    np.testing.assert_allclose(grpc_scores(running.grpc_url), expected, atol=1e-4)
    log = running.server.log_file.read_text(errors="replace")
    assert "float32 (set in config.pbtxt), compiled on cpu" in log, log[-2000:]


@needs_int8
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int8_server_follows_float32(start_extra_server, tiny_model_dirs, reference_scores, dtype):
    running = start_extra_server(tiny_model_dirs["bert"], "bert", dtype=dtype, quantize="int8")
    expected = np.array(reference_scores(running.model_dir, QUERY, DOCUMENTS))
    got = grpc_scores(running.grpc_url)
    # As loose as half precision's bound in the model tests: int8 keeps 127 steps per token.
    np.testing.assert_allclose(got, expected, atol=0.1, rtol=0.05)
    assert not np.array_equal(got, expected)  # quantized for real
    # The same answer through the gateway, and a request again: no state carried between calls.
    (api,) = free_ports(1)
    gateway = GatewayThread(GatewaySettings(triton_url=running.grpc_url, port=api, log_level="warning")).start()
    try:
        body = {"query": QUERY, "documents": DOCUMENTS, "return_documents": False}
        results = requests.post(f"http://127.0.0.1:{api}/v1/rerank", json=body, timeout=60).json()
    finally:
        gateway.stop()
    via_gateway = {r["index"]: r["score"] for r in results}
    np.testing.assert_allclose([via_gateway[i] for i in range(len(DOCUMENTS))], got, rtol=1e-6)
    np.testing.assert_array_equal(grpc_scores(running.grpc_url), got)
    (labels,) = encoder_info(running.server)
    assert (labels["dtype"], labels["quantize"]) == (dtype, "int8")
    log = running.server.log_file.read_text(errors="replace")
    assert f"{dtype} (set in config.pbtxt), int8 linears, compiled on cpu" in log, log[-2000:]
