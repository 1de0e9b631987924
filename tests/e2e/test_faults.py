"""A backend process killed under load: the supervisor reloads its model and service resumes."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triton_rerank.launcher.supervisor import stub_models

QUERY = "what do pandas eat"
DOCUMENTS = ["bamboo", "the giant panda eats bamboo shoots and leaves", "a search engine"]


def infer(url):
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(DOCUMENTS)], "BYTES")
    d.set_data_from_numpy(np.array([doc.encode() for doc in DOCUMENTS], dtype=object))
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer("reranker", [q, d]).as_numpy("SCORES").reshape(-1)


@pytest.mark.parametrize("victim", ["cross_encoder", "tokenizer"])
def test_killed_stub_is_replaced_under_load(tiny_model_dirs, start_extra_server, reference_scores, victim):
    running = start_extra_server(tiny_model_dirs["xlm-roberta"], "xlm-roberta")
    expected = reference_scores(running.model_dir, QUERY, DOCUMENTS)
    server = running.server
    outcomes = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                np.testing.assert_allclose(infer(running.grpc_url), expected, atol=1e-4)
                outcomes.append("ok")
            except InferenceServerException as error:
                outcomes.append(error.message())
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.0)
        # One of the victim's instances (the tokenizer runs several): a dead one takes its model down.
        pid = min(pid for pid, model in stub_models(server.process.pid).items() if model == victim)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while server.supervisor.reloads.get(victim, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.supervisor.reloads.get(victim) == 1, "the dead model was not reloaded"
        served_before = outcomes.count("ok")
        time.sleep(2.0)
    finally:
        stop.set()
        worker.join()
    assert outcomes.count("ok") > served_before, "no request succeeded after the reload"
    assert outcomes[-1] == "ok"
    assert pid not in stub_models(server.process.pid)
    np.testing.assert_allclose(infer(running.grpc_url), expected, atol=1e-4)
