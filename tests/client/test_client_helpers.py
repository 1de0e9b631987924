"""The pieces the client and the gateway share: ranking, sigmoid, chunking, addresses, error mapping."""

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from triton_rerank.client.errors import (
    InvalidRequestError,
    RerankServerError,
    RerankTimeoutError,
    ServerUnavailableError,
    renumber_documents,
    translate,
)
from triton_rerank.client.ranking import ScoredDocuments, chunk_bounds, rank, ranking_order, sigmoid
from triton_rerank.client.rerank_command import format_table, read_documents_file
from triton_rerank.client.triton_io import check_request, server_address


def scored(scores, tokens=None):
    scores = np.asarray(scores, dtype=np.float32)
    tokens = np.arange(10, 10 + len(scores), dtype=np.int32) if tokens is None else np.asarray(tokens, np.int32)
    return ScoredDocuments(scores, tokens)


def test_ranking_is_descending_and_stable_on_ties():
    order = ranking_order(np.array([0.5, 2.0, 0.5, -1.0, 2.0], dtype=np.float32))
    assert order.tolist() == [1, 4, 0, 2, 3]
    assert ranking_order(np.array([1.0, 3.0, 2.0]), top_n=2).tolist() == [1, 2]
    assert ranking_order(np.array([1.0, 3.0]), top_n=10**30).tolist() == [1, 0]


def test_rank_carries_index_score_document_and_tokens():
    documents = ["a", "b", "c"]
    results = rank(scored([0.1, 3.0, -2.0]), documents, top_n=2)
    assert [(r.index, r.document, r.token_count) for r in results] == [(1, "b", 11), (0, "a", 10)]
    assert results[0].score == pytest.approx(3.0) and isinstance(results[0].score, float)
    assert all(r.document is None for r in rank(scored([1.0, 2.0]), ["x", "y"], return_documents=False))


def test_normalized_ranking_keeps_the_raw_order_where_the_sigmoid_saturates():
    # sigmoid(40) and sigmoid(50) are both 1.0 in float64: the order still follows the logits.
    results = rank(scored([40.0, 50.0, -3.0]), ["a", "b", "c"], normalize=True)
    assert [r.index for r in results] == [1, 0, 2]
    assert results[0].score == 1.0 and results[2].score == pytest.approx(1 / (1 + np.exp(3.0)), rel=1e-15)


def test_sigmoid_is_float64_and_does_not_overflow():
    x = np.array([-1000.0, -30.0, 0.0, 0.25, 1000.0], dtype=np.float32)
    with np.errstate(over="raise"):
        y = sigmoid(x)
    assert y.dtype == np.float64
    assert y[0] == 0.0 and y[2] == 0.5 and y[4] == 1.0
    assert y[1] == pytest.approx(np.exp(-30.0), rel=1e-12)
    assert y[3] == pytest.approx(1 / (1 + np.exp(-0.25)), rel=1e-15)


def test_chunk_bounds_cover_the_list_in_order():
    assert chunk_bounds(5, None) == [(0, 5)]
    assert chunk_bounds(5, 5) == [(0, 5)]
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    merged = ScoredDocuments.concatenate([scored([1, 2], [5, 6]), scored([3], [7])])
    assert merged.scores.tolist() == [1, 2, 3] and merged.total_tokens == 18


@pytest.mark.parametrize(("url", "protocol", "expected"), [
    ("127.0.0.1:8001", "grpc", "127.0.0.1:8001"),
    ("localhost", "grpc", "localhost:8001"),
    ("http://localhost/", "http", "localhost:8000"),
    ("grpc://10.0.0.1:9001", "grpc", "10.0.0.1:9001"),
    ("[::1]", "http", "[::1]:8000"),
    ("[::1]:18000", "http", "[::1]:18000"),
])
def test_server_address(url, protocol, expected):
    assert server_address(url, protocol) == expected


def test_server_address_refuses_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        server_address("x:1", "websocket")


@pytest.mark.parametrize(("query", "documents", "message"), [
    (1, ["a"], "query must be a string"),
    ("q", "a document", "not one string"),
    ("q", [], "documents is empty"),
    ("q", ["a", 2], r"documents\[1\] must be a string"),
])
def test_check_request_says_what_is_wrong(query, documents, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_request(query, documents)


@pytest.mark.parametrize(("status", "kind"), [
    ("400", InvalidRequestError), ("StatusCode.INVALID_ARGUMENT", InvalidRequestError),
    ("503", ServerUnavailableError), ("StatusCode.UNAVAILABLE", ServerUnavailableError),
    ("StatusCode.DEADLINE_EXCEEDED", RerankTimeoutError), ("500", RerankServerError),
    ("StatusCode.NOT_FOUND", RerankServerError),
])
def test_translate_maps_both_protocols_statuses(status, kind):
    error = translate(InferenceServerException("document 2 is bad", status=status), "Triton at x:1 (grpc)", 256)
    assert type(error) is kind
    if kind is InvalidRequestError:
        assert str(error) == "document 258 is bad"  # the caller's index, not the chunk's
    else:
        assert "Triton at x:1" in str(error)


def test_translate_network_errors():
    assert isinstance(translate(ConnectionRefusedError(111, "refused"), "w"), ServerUnavailableError)
    assert isinstance(translate(TimeoutError(), "w"), RerankTimeoutError)
    assert isinstance(translate(RuntimeError("x"), "w"), RerankServerError)


def test_renumber_documents_only_touches_document_indices():
    assert renumber_documents("document 1 makes a pair of 900 tokens", 10) == "document 11 makes a pair of 900 tokens"
    assert renumber_documents("DOCUMENTS is empty", 10) == "DOCUMENTS is empty"


def test_documents_file_json_or_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", "two\nlines"]))
    (tmp_path / "b.txt").write_text("first\n\nsecond\n")
    (tmp_path / "c.json").write_text("[1, 2]")
    assert read_documents_file(str(tmp_path / "a.json")) == ["one", "two\nlines"]
    assert read_documents_file(str(tmp_path / "b.txt")) == ["first", "second"]
    with pytest.raises(InvalidRequestError, match="strings only"):
        read_documents_file(str(tmp_path / "c.json"))


def test_table_fits_the_width():
    results = rank(scored([0.5, 1.5]), ["short", "a very long document " * 20])
    table = format_table(results, width=80)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "index", "score", "tokens", "document"]
    assert lines[1].split()[:4] == ["1", "1", "+1.5000", "11"] and lines[1].endswith("...")
    assert all(len(line) <= 80 for line in lines)


def test_score_options_as_request_parameters():
    from triton_rerank.client.triton_io import ScoreOptions

    # Nothing said: the server's defaults (serve --long-documents) apply.
    assert ScoreOptions().parameters() == {}
    assert ScoreOptions(False).parameters() == {"truncate": False}
    assert ScoreOptions(long_documents="chunk", chunk_overlap=0, max_chunks_per_doc=300).parameters() == {
        "long_documents": "chunk", "chunk_overlap": 0, "max_chunks_per_doc": 300}
    # long_documents says it all; a truncate that agrees adds nothing.
    assert ScoreOptions(True, long_documents="chunk").parameters() == {"long_documents": "chunk"}
    assert ScoreOptions(False, long_documents="error").parameters() == {"long_documents": "error"}
    assert ScoreOptions(True, "left", 8).parameters() == {"truncate": True, "truncation_direction": "left",
                                                          "max_tokens_per_doc": 8}
    # Triton's parameters are int64: a limit beyond any window is sent as the largest int32.
    assert ScoreOptions(max_tokens_per_doc=10**21).parameters()["max_tokens_per_doc"] == 2**31 - 1
    for bad, message in [({"truncation_direction": "up"}, "truncation_direction must be one of"),
                         ({"max_tokens_per_doc": 0}, "positive integer"),
                         ({"max_tokens_per_doc": True}, "positive integer"),
                         ({"truncate": False, "max_tokens_per_doc": 4}, "needs truncate=True"),
                         ({"long_documents": "whole"}, "long_documents must be one of"),
                         ({"truncate": False, "long_documents": "chunk"}, "contradict each other"),
                         ({"truncate": True, "long_documents": "error"}, "contradict each other"),
                         ({"long_documents": "chunk", "max_tokens_per_doc": 4}, "send one of the two"),
                         ({"long_documents": "chunk", "truncation_direction": "left"}, "send one of the two"),
                         ({"chunk_overlap": -1}, "chunk_overlap must be an integer >= 0"),
                         ({"max_chunks_per_doc": 0}, "max_chunks_per_doc must be a positive integer")]:
        with pytest.raises(InvalidRequestError, match=message):
            ScoreOptions(**bad)
