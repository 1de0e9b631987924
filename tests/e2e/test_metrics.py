"""The cross_encoder's custom metrics on Triton's /metrics endpoint."""

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{server.address.metrics_port}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("rerank_") and sample.labels.get("model") == "cross_encoder":
                le = sample.labels.get("le")
                values[sample.name + (f"[{le}]" if le else "")] = sample.value
    return values


def test_pairs_tokens_and_micro_batches_are_counted(xlmr_server):
    documents = ["bamboo forest " * n for n in (1, 3, 9)]
    before = scrape(xlmr_server)
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([b"what do pandas eat"], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([doc.encode() for doc in documents], dtype=object))
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        token_counts = client.infer("reranker", [q, d]).as_numpy("TOKEN_COUNTS")
    after = scrape(xlmr_server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("rerank_pairs_total") == len(documents)
    assert delta("rerank_tokens_total") == int(token_counts.sum())
    assert delta("rerank_micro_batch_tokens_count") >= 1
    assert delta("rerank_micro_batch_tokens_sum") == int(token_counts.sum())
    assert delta("rerank_compute_seconds_total") > 0
