"""Bad input through raw tritonclient: a clear INVALID_ARG, the server stays up and answers the same."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

QUERY = "what is panda?"
DOCUMENTS = ["hi", "The giant panda is a bear native to south central China."]


def string_input(module, name, values):
    tensor = module.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object))
    return tensor


def infer_http(url, inputs, parameters=None):
    with httpclient.InferenceServerClient(url) as client:
        return client.infer("reranker", inputs, parameters=parameters).as_numpy("SCORES").reshape(-1)


@pytest.fixture
def baseline(xlmr_server):
    inputs = [string_input(httpclient, "QUERY", [QUERY.encode()]),
              string_input(httpclient, "DOCUMENTS", [d.encode() for d in DOCUMENTS])]
    before = infer_http(xlmr_server.http_url, inputs)
    yield
    with httpclient.InferenceServerClient(xlmr_server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("reranker")
    np.testing.assert_array_equal(infer_http(xlmr_server.http_url, inputs), before)


def bad_inputs():
    q = [QUERY.encode()]
    fp32_docs = httpclient.InferInput("DOCUMENTS", [2], "FP32")
    fp32_docs.set_data_from_numpy(np.ones(2, dtype=np.float32))
    two_d_query = httpclient.InferInput("QUERY", [1, 1], "BYTES")
    two_d_query.set_data_from_numpy(np.array([[b"q"]], dtype=object))
    return {
        "invalid utf-8": ([string_input(httpclient, "QUERY", q),
                           string_input(httpclient, "DOCUMENTS", [b"ok", b"\xff\xfe bad"])], "not valid UTF-8"),
        "NUL byte": ([string_input(httpclient, "QUERY", q),
                      string_input(httpclient, "DOCUMENTS", [b"a\x00b"])], "NUL"),
        "10 MB document": ([string_input(httpclient, "QUERY", q),
                            string_input(httpclient, "DOCUMENTS", [b"panda " * ((10 << 20) // 6)])], "bytes"),
        "10,000 documents": ([string_input(httpclient, "QUERY", q),
                              string_input(httpclient, "DOCUMENTS", [b"doc"] * 10_000)], "at most 1000"),
        "missing DOCUMENTS": ([string_input(httpclient, "QUERY", q)], "DOCUMENTS"),
        "wrong dtype": ([string_input(httpclient, "QUERY", q), fp32_docs], "data-type"),
        "wrong shape": ([two_d_query, string_input(httpclient, "DOCUMENTS", [b"d"])], "shape"),
        "two queries": ([string_input(httpclient, "QUERY", [b"a", b"b"]),
                         string_input(httpclient, "DOCUMENTS", [b"d"])], "QUERY"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_is_invalid_argument(xlmr_server, baseline, case):
    inputs, message = bad_inputs()[case]
    with pytest.raises(InferenceServerException) as error:
        infer_http(xlmr_server.http_url, inputs)
    assert error.value.status() == "400", error.value
    assert message in error.value.message()


def test_unknown_parameter_is_invalid_argument(xlmr_server, baseline):
    inputs = [string_input(grpcclient, "QUERY", [b"q"]), string_input(grpcclient, "DOCUMENTS", [b"d"])]
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer("reranker", inputs, parameters={"top_k": 3})
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown request parameter" in error.value.message()


def test_empty_document_string_is_scored(xlmr_server):
    inputs = [string_input(httpclient, "QUERY", [b"q"]), string_input(httpclient, "DOCUMENTS", [b"", b"d"])]
    scores = infer_http(xlmr_server.http_url, inputs)
    assert scores.shape == (2,) and np.isfinite(scores).all()
