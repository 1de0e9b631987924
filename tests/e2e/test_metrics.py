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


def encoder_info(server) -> list[dict]:
    text = requests.get(f"http://127.0.0.1:{server.address.metrics_port}/metrics", timeout=10).text
    return [sample.labels for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "rerank_encoder_info" and sample.value == 1]


def test_the_encoder_info_names_the_dtype_set_and_the_engine_auto_picked(xlmr_server):
    # engine auto (the default): OpenVINO for a cross-encoder on the CPU, and the log says why.
    (labels,) = encoder_info(xlmr_server)
    assert (labels["engine"], labels["dtype"], labels["device"], labels["model"]) == (
        "openvino", "float32", "cpu", "cross_encoder")
    log = xlmr_server.server.log_file.read_text(errors="replace")
    assert "openvino engine, float32 (set in config.pbtxt) on cpu; engine auto: a cross-encoder on the CPU" in log


def test_dtype_auto_follows_the_cpu_and_says_why(start_extra_server, tiny_model_dirs):
    from triton_rerank.models.dtypes import auto_dtype

    server = start_extra_server(tiny_model_dirs["bert"], "bert", dtype="auto")
    expected, why = auto_dtype("cpu")
    assert [labels["dtype"] for labels in encoder_info(server)] == [expected]
    log = server.server.log_file.read_text(errors="replace")
    assert f"{expected} (auto: {why}) on cpu" in log, log[-2000:]
