"""`compile` and `quantize int8` through the running server: the compiled float32 encoder keeps parity
with transformers, the int8 encoder's scores follow transformers' float32 over gRPC (tritonclient)
and the gateway's /v1/rerank, and the server says what it runs."""

import numpy as np
import pytest
import requests

from triton_rerank.gateway.server import GatewayThread
from triton_rerank.gateway.settings import GatewaySettings
from triton_rerank.launcher.server import free_ports
from triton_rerank.models.dtypes import int8_instructions

from .test_faults import infer
from .test_metrics import encoder_info

needs_int8 = pytest.mark.skipif(not int8_instructions(), reason="this CPU has no int8 dot-product instructions")

QUERY = "what do giant pandas eat in the wild"
DOCUMENTS = ["bamboo", "the giant panda eats bamboo shoots and leaves", "a search engine for the web",
             "pandas are bears that live in the mountains of china " * 6, "b"]


def gateway_scores(grpc_url: str, query: str, documents: list[str]) -> list[float]:
    """Scores in document order from POST /v1/rerank of a gateway started in front of `grpc_url`."""
    (api,) = free_ports(1)
    gateway = GatewayThread(GatewaySettings(triton_url=grpc_url, port=api, log_level="warning")).start()
    try:
        body = {"query": query, "documents": documents, "return_documents": False}
        results = requests.post(f"http://127.0.0.1:{api}/v1/rerank", json=body, timeout=60).json()
    finally:
        gateway.stop()
    by_index = {r["index"]: r["score"] for r in results}
    return [by_index[i] for i in range(len(documents))]


def grpc_scores(url: str) -> np.ndarray:
    return infer(url, QUERY, DOCUMENTS)


def in_process_int8(model_dir, dtype: str) -> np.ndarray:
    import torch

    from triton_rerank.serving.scoring import DEFAULT_BATCH_TOKENS, PackedEngine, score_pairs
    from triton_rerank.serving.tokenization import PairTokenizer

    engine = PackedEngine(str(model_dir), getattr(torch, dtype), torch.device("cpu"), "sdpa", "int8")
    packed = PairTokenizer(model_dir).encode(QUERY, DOCUMENTS)
    return score_pairs(engine, packed.input_ids, packed.token_type_ids, packed.lengths, DEFAULT_BATCH_TOKENS["cpu"])


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
    # The server runs what the engine runs in this process (same tokens, same micro-batch), ...
    np.testing.assert_allclose(got, in_process_int8(running.model_dir, dtype), atol=1e-3)
    # ... which follows float32 as closely as 127 steps per token allow on this tiny model (hidden 64).
    np.testing.assert_allclose(got, expected, atol=0.3)
    assert not np.array_equal(got, expected)  # quantized for real
    # The same answer through the gateway, and a request again: no state carried between calls.
    np.testing.assert_allclose(gateway_scores(running.grpc_url, QUERY, DOCUMENTS), got, rtol=1e-6)
    np.testing.assert_array_equal(grpc_scores(running.grpc_url), got)
    (labels,) = encoder_info(running.server)
    assert (labels["dtype"], labels["quantize"]) == (dtype, "int8")
    log = running.server.log_file.read_text(errors="replace")
    assert f"{dtype} (set in config.pbtxt), int8 linears, compiled on cpu" in log, log[-2000:]
