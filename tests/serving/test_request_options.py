"""Reading a request's strings and parameters."""

import numpy as np
import pytest

from triton_rerank.serving.request_options import RequestError, read_options, read_query_and_documents


class FakeTensor:  # the one method model.py uses of pb_utils.Tensor
    def __init__(self, values):
        self.values = np.array(values, dtype=object)

    def as_numpy(self):
        return self.values


def test_reads_utf8_strings():
    query, docs = read_query_and_documents(FakeTensor([b"caf\xc3\xa9"]), FakeTensor([b"a", b"b"]))
    assert query == "café" and docs == ["a", "b"]


@pytest.mark.parametrize(
    ("query", "documents", "message"),
    [
        ([b"q"], [], "DOCUMENTS is empty"),
        ([b"  "], [b"d"], "QUERY is empty"),
        ([b"q", b"r"], [b"d"], "exactly one string"),
        ([b"q"], [b"ok", b"\xff\xfe"], r"DOCUMENTS\[1\] is not valid UTF-8"),
    ],
)
def test_bad_requests_say_what_is_wrong(query, documents, message):
    with pytest.raises(RequestError, match=message):
        read_query_and_documents(FakeTensor(query), FakeTensor(documents))


def test_missing_input():
    with pytest.raises(RequestError, match="needs both QUERY"):
        read_query_and_documents(None, FakeTensor([b"d"]))


def test_options():
    assert read_options(None).truncate is True
    assert read_options('{"truncate": false}').truncate is False
    assert read_options('{"truncate": "false"}').truncate is False
    with pytest.raises(RequestError, match="must be a boolean"):
        read_options('{"truncate": "maybe"}')
    with pytest.raises(RequestError, match="unknown request parameter"):
        read_options('{"top_k": 3}')


def test_truncation_direction_and_max_tokens_per_doc():
    default = read_options(None)
    assert (default.truncation_direction, default.max_tokens_per_doc) == ("right", None)
    options = read_options('{"truncation_direction": "Left", "max_tokens_per_doc": 64}')
    assert (options.truncation_direction, options.max_tokens_per_doc) == ("left", 64)
    assert read_options('{"max_tokens_per_doc": "8"}').max_tokens_per_doc == 8
    for bad, message in [('{"truncation_direction": "middle"}', "must be 'right' or 'left'"),
                         ('{"truncation_direction": 1}', "must be 'right' or 'left'"),
                         ('{"max_tokens_per_doc": 0}', "must be a positive integer"),
                         ('{"max_tokens_per_doc": true}', "must be a positive integer"),
                         ('{"max_tokens_per_doc": 1.5}', "must be a positive integer"),
                         ('{"truncate": false, "max_tokens_per_doc": 8}', "needs truncate=true")]:
        with pytest.raises(RequestError, match=message):
            read_options(bad)


def test_limits_and_nul():
    from triton_rerank.serving.request_options import RequestLimits

    limits = RequestLimits(max_documents=3, max_text_bytes=10)
    with pytest.raises(RequestError, match="holds 4 strings; this server takes at most 3"):
        read_query_and_documents(FakeTensor([b"q"]), FakeTensor([b"d"] * 4), limits)
    with pytest.raises(RequestError, match=r"DOCUMENTS\[1\] is 11 bytes"):
        read_query_and_documents(FakeTensor([b"q"]), FakeTensor([b"d", b"x" * 11]), limits)
    with pytest.raises(RequestError, match=r"QUERY\[0\] contains a NUL character"):
        read_query_and_documents(FakeTensor([b"a\x00b"]), FakeTensor([b"d"]), limits)
    assert read_query_and_documents(FakeTensor([b"q"]), FakeTensor([b"", b"x" * 10]), limits)[1] == ["", "x" * 10]


def test_request_bytes_limit_counts_every_string_before_decoding():
    from triton_rerank.serving.request_options import RequestLimits

    limits = RequestLimits(max_text_bytes=10, max_request_bytes=25)
    # 1 + 3 x 8 = 25 bytes: at the limit.
    assert len(read_query_and_documents(FakeTensor([b"q"]), FakeTensor([b"x" * 8] * 3), limits)[1]) == 3
    # 26 bytes: refused, naming the total, the limit and what to do; no string is decoded first
    # (the invalid UTF-8 would otherwise be the error).
    with pytest.raises(RequestError, match=r"hold 26 bytes of text together; this server takes at most 25 bytes "
                                           r"per request \(max_request_bytes\): split the documents"):
        read_query_and_documents(FakeTensor([b"qq"]), FakeTensor([b"x" * 8, b"x" * 8, b"\xff" * 8]), limits)
    # A single string over the per-string limit gets the more precise message.
    with pytest.raises(RequestError, match=r"DOCUMENTS\[0\] is 30 bytes; this server takes at most 10 bytes per string"):
        read_query_and_documents(FakeTensor([b"q"]), FakeTensor([b"x" * 30]), limits)


def test_limits_come_from_the_config_parameters():
    from triton_rerank.serving.request_options import RequestLimits

    limits = RequestLimits.from_parameters({"max_documents": "5", "max_request_bytes": "4096"})
    assert (limits.max_documents, limits.max_text_bytes, limits.max_request_bytes) == (5, 1 << 20, 4096)
    # Empty or 0 means the default (8 MiB).
    assert RequestLimits.from_parameters({"max_request_bytes": "0"}).max_request_bytes == 8 << 20


def test_long_documents_mode_from_long_documents_or_truncate():
    from triton_rerank.serving.request_options import RequestLimits

    assert read_options(None).long_documents == "truncate"
    assert read_options('{"long_documents": "Chunk"}').long_documents == "chunk"
    assert read_options('{"truncate": false}').long_documents == "error"
    assert read_options('{"truncate": true, "long_documents": "chunk"}').long_documents == "chunk"
    assert read_options('{"truncate": false, "long_documents": "error"}').long_documents == "error"
    # The server's default applies where a request does not say; truncate=true only asks not to be refused.
    chunking = RequestLimits(long_documents="chunk")
    assert read_options(None, chunking).long_documents == "chunk"
    assert read_options('{"truncate": true}', chunking).long_documents == "chunk"
    assert read_options('{"truncate": false}', chunking).long_documents == "error"
    assert read_options('{"truncate": true}', RequestLimits(long_documents="error")).long_documents == "truncate"
    # Asking how documents are cut asks for truncation, whatever the server's default.
    for cutting in ('{"truncation_direction": "left"}', '{"truncate": true, "max_tokens_per_doc": 8}'):
        assert read_options(cutting, chunking).long_documents == "truncate"
    assert read_options('{"truncate": false, "truncation_direction": "left"}', chunking).long_documents == "error"
    for bad, message in [('{"long_documents": "split"}', r"must be one of \['truncate', 'chunk', 'error'\]"),
                         ('{"truncate": false, "long_documents": "chunk"}', "contradict each other"),
                         ('{"truncate": true, "long_documents": "error"}', "contradict each other"),
                         ('{"long_documents": "chunk", "max_tokens_per_doc": 8}', "not long_documents='chunk'"),
                         ('{"long_documents": "chunk", "truncation_direction": "left"}', "send one of the two"),
                         ('{"max_chunks_per_doc": "\u00b2"}', "must be a positive integer")]:
        with pytest.raises(RequestError, match=message):
            read_options(bad)


def test_chunk_overlap_and_max_chunks_per_doc():
    from triton_rerank.serving.request_options import RequestLimits

    default = read_options(None, RequestLimits(max_chunks_per_doc=5))
    assert (default.chunk_overlap, default.max_chunks_per_doc) == (32, 5)
    options = read_options('{"chunk_overlap": 0, "max_chunks_per_doc": "200"}')
    assert (options.chunk_overlap, options.max_chunks_per_doc) == (0, 200)
    for bad, message in [('{"chunk_overlap": -1}', "must be an integer >= 0"),
                         ('{"chunk_overlap": 1.5}', "must be an integer >= 0"),
                         ('{"max_chunks_per_doc": 0}', "must be a positive integer")]:
        with pytest.raises(RequestError, match=message):
            read_options(bad)
    limits = RequestLimits.from_parameters({"long_documents": "chunk", "max_chunks_per_doc": "8", "max_documents": "10"})
    assert (limits.long_documents, limits.max_chunks_per_doc, limits.max_windows) == ("chunk", 8, 80)
    with pytest.raises(ValueError, match="long_documents must be one of"):
        RequestLimits.from_parameters({"long_documents": "whole"})


def test_instruction_is_an_optional_string_within_the_string_limit():
    import json

    from triton_rerank.serving.request_options import RequestLimits

    assert read_options(None).instruction is None
    assert read_options('{"instruction": "Find recipes"}').instruction == "Find recipes"
    assert read_options('{"instruction": ""}').instruction == ""  # an empty task is the client's choice
    limits = RequestLimits(max_text_bytes=16)
    assert read_options(json.dumps({"instruction": "é" * 8}), limits).instruction == "é" * 8  # 16 bytes
    for value, message in [("é" * 9, "18 bytes; this server takes at most 16"), (["a"], "must be a string"),
                           (3, "must be a string"), ("a\x00b", "NUL")]:
        with pytest.raises(RequestError, match=message):
            read_options(json.dumps({"instruction": value}), limits)
