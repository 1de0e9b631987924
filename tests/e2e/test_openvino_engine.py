"""engine openvino through the running server: transformers' float32 scores over gRPC (tritonclient)
and the gateway's /v1/rerank, bfloat16 within bfloat16's error, int8 linears as the engine scores
them in process, and the server says what it runs."""

import numpy as np
import pytest

from .test_faults import infer
from .test_metrics import encoder_info
from .test_quantize import gateway_scores, needs_int8

pytest.importorskip("openvino")

QUERY = "what do giant pandas eat in the wild"
DOCUMENTS = ["bamboo", "the giant panda eats bamboo shoots and leaves", "a search engine for the web",
             "pandas are bears that live in the mountains of china " * 6, "b"]


def transformers_error(model_dir, dtype: str, expected: np.ndarray) -> float:
    """Max |score - float32| of transformers itself in `dtype` on the same pairs (in process)."""
    import torch

    from triton_rerank.serving.scoring import HFEngine, score_pairs
    from triton_rerank.serving.tokenization import PairTokenizer

    engine = HFEngine(str(model_dir), getattr(torch, dtype), torch.device("cpu"))
    packed = PairTokenizer(model_dir).encode(QUERY, DOCUMENTS)
    return float(np.abs(score_pairs(engine, packed.input_ids, packed.token_type_ids, packed.lengths, 4096)
                        - expected).max())


@pytest.mark.parametrize(("arch", "dtype"), [("bert", "float32"), ("xlm-roberta", "bfloat16")])
def test_openvino_server_scores_like_transformers(start_extra_server, tiny_model_dirs, reference_scores, arch, dtype):
    running = start_extra_server(tiny_model_dirs[arch], arch, engine="openvino", dtype=dtype)
    expected = np.array(reference_scores(running.model_dir, QUERY, DOCUMENTS))
    got = infer(running.grpc_url, QUERY, DOCUMENTS)
    if dtype == "float32":
        np.testing.assert_allclose(got, expected, atol=1e-4)
    else:  # bfloat16 rounds: within twice transformers' own bfloat16 error
        assert np.abs(got - expected).max() <= 2 * transformers_error(running.model_dir, dtype, expected) + 1e-3
        assert not np.array_equal(got, expected)
    # The same answer through the gateway, and a request again: no state carried between calls.
    np.testing.assert_allclose(gateway_scores(running.grpc_url, QUERY, DOCUMENTS), got, rtol=1e-6)
    np.testing.assert_array_equal(infer(running.grpc_url, QUERY, DOCUMENTS), got)
    (labels,) = encoder_info(running.server)
    assert (labels["engine"], labels["dtype"], labels["device"]) == ("openvino", dtype, "cpu")
    log = running.server.log_file.read_text(errors="replace")
    assert f"cross-encoder reranker, openvino engine, {dtype}" in log, log[-2000:]


@needs_int8
def test_openvino_int8_server_scores_as_the_engine_does(start_extra_server, tiny_model_dirs, reference_scores):
    import torch

    from triton_rerank.serving.openvino_engine import OpenVINOEngine
    from triton_rerank.serving.scoring import OPENVINO_BATCH_TOKENS, score_pairs
    from triton_rerank.serving.tokenization import PairTokenizer

    running = start_extra_server(tiny_model_dirs["bert"], "bert", engine="openvino", dtype="float32", quantize="int8")
    got = infer(running.grpc_url, QUERY, DOCUMENTS)
    # The served graph is the one this process calibrates and compiles from the same checkpoint.
    engine = OpenVINOEngine(str(running.model_dir), torch.float32, torch.device("cpu"), quantize="int8")
    packed = PairTokenizer(running.model_dir).encode(QUERY, DOCUMENTS)
    in_process = score_pairs(engine, packed.input_ids, packed.token_type_ids, packed.lengths, OPENVINO_BATCH_TOKENS)
    np.testing.assert_allclose(got, in_process, atol=1e-4)
    expected = np.array(reference_scores(running.model_dir, QUERY, DOCUMENTS))
    np.testing.assert_allclose(got, expected, atol=0.5)  # the bound of tests/serving/test_openvino_engine.py
    assert not np.array_equal(got, expected)  # quantized for real
    np.testing.assert_allclose(gateway_scores(running.grpc_url, QUERY, DOCUMENTS), got, rtol=1e-6)
    (labels,) = encoder_info(running.server)
    assert (labels["engine"], labels["dtype"], labels["quantize"]) == ("openvino", "float32", "int8")
    log = running.server.log_file.read_text(errors="replace")
    assert "openvino engine, float32 (set in config.pbtxt), int8 linears on cpu" in log, log[-2000:]
