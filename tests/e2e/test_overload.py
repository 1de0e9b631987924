"""A burst well past capacity: fast refusals, no crash, every admitted request correct."""

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

DOCUMENTS = ["the giant panda eats bamboo in the mountain forest " * 4] * 100


def test_burst_is_refused_fast_and_admitted_requests_are_correct(tiny_model_dirs, start_extra_server,
                                                                 reference_scores):
    running = start_extra_server(tiny_model_dirs["xlm-roberta"], "xlm-roberta", max_queue_size=2)

    def call(i):
        query = f"panda question {i}"
        q = grpcclient.InferInput("QUERY", [1], "BYTES")
        q.set_data_from_numpy(np.array([query.encode()], dtype=object))
        d = grpcclient.InferInput("DOCUMENTS", [len(DOCUMENTS)], "BYTES")
        d.set_data_from_numpy(np.array([doc.encode() for doc in DOCUMENTS], dtype=object))
        started = time.monotonic()
        with grpcclient.InferenceServerClient(running.grpc_url) as client:
            try:
                scores = client.infer("reranker", [q, d]).as_numpy("SCORES").reshape(-1)
                return "ok", query, scores, time.monotonic() - started
            except InferenceServerException as error:
                return error.status(), error.message(), None, time.monotonic() - started

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(48)))
    outcomes = Counter(r[0] for r in results)
    assert outcomes["ok"] >= 1
    assert outcomes["StatusCode.UNAVAILABLE"] >= 1, outcomes
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, outcomes
    refused = [r for r in results if r[0] != "ok"]
    assert all("queue" in r[1] for r in refused)
    assert max(r[3] for r in refused) < 2.0, "a refusal should be immediate, not after queueing"
    # Every admitted request got its own correct scores (same documents, its own query).
    reference = {}
    for _, query, scores, _ in (r for r in results if r[0] == "ok"):
        reference.setdefault(query, reference_scores(running.model_dir, query, DOCUMENTS[:1])[0])
        np.testing.assert_allclose(scores, reference[query], atol=1e-4)
    with grpcclient.InferenceServerClient(running.grpc_url) as client:
        assert client.is_server_ready()
