"""What bounds the tokenizer step's work per request, through a real tritonserver.

A request's strings together may hold at most max_request_bytes (8 MiB by default); a long
document is cut before it is tokenized, which must not change a thing the client sees.
"""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

QUERY = "where does the giant panda live?"


def make_inputs(query: str, documents: list[bytes]):
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array(documents, dtype=object))
    return [q, d]


def rerank(url: str, documents: list[bytes], **parameters):
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("reranker", make_inputs(QUERY, documents), parameters=parameters or None,
                              client_timeout=120)
    return result.as_numpy("SCORES").reshape(-1), result.as_numpy("TOKEN_COUNTS").reshape(-1)


def long_text(size: int) -> bytes:
    words = "the giant panda lives in the bamboo forests of the mountains of south central china".split()
    rng = np.random.default_rng(0)
    return " ".join(rng.choice(words, size // 4)).encode()[:size]


def test_a_request_over_max_request_bytes_is_refused_naming_the_limit(xlmr_server):
    # Nine documents under the per-string limit (1 MiB), 9 MB together: over the 8 MiB default.
    documents = [b"panda " * 166_666] * 9
    with pytest.raises(InferenceServerException) as error:
        rerank(xlmr_server.grpc_url, documents)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = error.value.message()
    assert f"hold {9 * 999_996 + len(QUERY)} bytes of text together" in message
    assert "at most 8388608 bytes per request (max_request_bytes): split the documents over several requests" \
        in message
    # The server is unharmed and takes the same documents in two requests.
    assert rerank(xlmr_server.grpc_url, documents[:5])[0].shape == (5,)


def test_a_cut_long_document_scores_as_its_first_kilobytes(triton_server):
    # About 1 MiB: far past the tiny models' 512 tokens, so only its first few KB can count.
    document = long_text(1_000_000)
    head = document[:6000]
    scores, token_counts = rerank(triton_server.grpc_url, [document, head, b"hi"])
    assert token_counts.tolist()[:2] == [512, 512]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5, rtol=0)
    # Alone, in a request of its own, the same answer.
    alone_scores, alone_counts = rerank(triton_server.grpc_url, [document])
    assert alone_counts.tolist() == [512]
    np.testing.assert_allclose(alone_scores[0], scores[1], atol=1e-5, rtol=0)
    # Without truncation it is refused, as it was before documents were cut.
    with pytest.raises(InferenceServerException, match=r"document 0 makes a pair of \d+ tokens or more"):
        rerank(triton_server.grpc_url, [document], truncate=False)
