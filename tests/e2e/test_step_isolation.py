"""Direct calls to the internal scoring step cannot change, delay or fail anybody else's answer.

The attacks of a red-team run: `cross_encoder` called directly with lengths that do not sum to
the ids, too long or negative lengths, ids outside the vocabulary, token types out of range, far
more pairs than a request may carry, and inputs the tokenizer step never signed, all while an
honest client uses the ensemble. Each attack must be refused alone with INVALID_ARG, and each
honest answer must be bit-identical to the same request's answer with nobody else around: the
refused requests never reach the packed batch, so the honest request is computed exactly as alone.
"""

import json
import threading
from urllib.request import urlopen

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triton_rerank.serving.step_signature import sign_pairs

HONEST = [
    ("what is panda?", ["hi", "The giant panda is a bear native to south central China.", "panda panda"]),
    ("bamboo", ["bamboo forests in the mountains", "a search engine ranks documents"]),
    ("search engine ranking", ["neural rankers score a query and a passage together"] * 3 + ["x"]),
    ("giant panda diet", ["the giant panda eats bamboo shoots and leaves " * 6, "rank", "", "bears"]),
]


def ensemble_scores(client, query, documents):
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([doc.encode() for doc in documents], dtype=object))
    return client.infer("reranker", [q, d]).as_numpy("SCORES").reshape(-1)


def step_inputs(ids, types, lengths, signature, chunk_counts=None):
    """cross_encoder's inputs; one document per pair unless chunk_counts says otherwise."""
    if chunk_counts is None:
        chunk_counts = np.ones(np.asarray(lengths).shape, dtype=np.int32)
    inputs = []
    for name, values, dtype, datatype in (("INPUT_IDS", ids, np.int32, "INT32"),
                                          ("TOKEN_TYPE_IDS", types, np.int32, "INT32"),
                                          ("SEQ_LENGTHS", lengths, np.int32, "INT32"),
                                          ("CHUNK_COUNTS", chunk_counts, np.int32, "INT32"),
                                          ("SIGNATURE", signature, np.uint8, "UINT8")):
        array = np.asarray(values, dtype=dtype)
        array = array[None] if array.ndim == 1 else array
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def attacks(key: bytes, config: dict) -> dict[str, tuple[list, str]]:
    """{name: (cross_encoder inputs, what the refusal must say)}; signed with the server's key
    where the point is the inconsistency, so that the scoring step's own checks are what refuse."""
    vocab, window = config["vocab_size"], config["max_position_embeddings"] - config["pad_token_id"] - 1
    rng = np.random.default_rng(0)

    def signed(ids, types, lengths, chunk_counts=None):
        ids, types, lengths = (np.asarray(a, dtype=np.int32) for a in (ids, types, lengths))
        counts = np.ones(len(lengths), dtype=np.int32) if chunk_counts is None else np.asarray(chunk_counts, np.int32)
        return step_inputs(ids, types, lengths, sign_pairs(key, ids, types, lengths, counts), counts)

    ids = rng.integers(5, vocab, 400)
    zeros = np.zeros(400, dtype=np.int32)
    return {
        "lengths short of the ids": (signed(ids, zeros, [2]), "sum to 2 tokens"),
        "lengths past the ids": (signed(ids[:10], zeros[:10], [6, 6]), "sum to 12 tokens"),
        "pair longer than the window": (signed(ids[:window + 1], zeros[:window + 1], [window + 1]),
                                        f"at most {window} tokens"),
        "negative length": (signed(ids[:10], zeros[:10], [12, -2]), "is -2"),
        "id outside the vocabulary": (signed([0, vocab + 7, 2], [0, 0, 0], [3]), f"[0, {vocab})"),
        "negative id": (signed([0, -1, 2], [0, 0, 0], [3]), "INPUT_IDS holds -1"),
        "token type out of range": (signed([0, 9, 2], [0, 1, 0], [3]), "TOKEN_TYPE_IDS holds 1"),
        "200,000 pairs": (signed(np.full(200_000, 7), np.zeros(200_000), np.ones(200_000)),
                          "at most 64000 per request"),
        "chunk counts short of the pairs": (signed(ids[:10], zeros[:10], [4, 6], [1]), "CHUNK_COUNTS sum to 1"),
        "a document of no pairs": (signed(ids[:10], zeros[:10], [4, 6], [2, 0]), "CHUNK_COUNTS[1] is 0"),
        "1001 documents": (signed(np.full(1001, 7), np.zeros(1001), np.ones(1001)), "1001 documents; at most 1000"),
        # The pairs the tokenizer signed, regrouped as the windows of one document.
        "windows regrouped": (step_inputs(ids[:10], zeros[:10], [4, 6], sign_pairs(key, ids[:10], zeros[:10],
                              np.array([4, 6]), np.array([1, 1])), [2]), "not produced by this server's tokenizer"),
        "unsigned": (step_inputs([0, 9, 2], [0, 0, 0], [3], np.zeros(32)), "not produced by this server's tokenizer"),
        "signed for other inputs": (step_inputs([0, 9, 2], [0, 0, 0], [3], sign_pairs(key, np.array([0, 8, 2]),
                                    np.zeros(3), np.array([3]), np.array([1]))),
                                    "not produced by this server's tokenizer"),
        "two rows": (step_inputs(np.ones((2, 3)), np.zeros((2, 3)), np.full((2, 1), 3), np.zeros((2, 32))),
                     "shape [1, n]"),
    }


@pytest.fixture
def xlmr_attacks(xlmr_server):
    config = json.loads((xlmr_server.model_dir / "config.json").read_text())
    return attacks(xlmr_server.server.step_key, config)


def test_each_attack_is_refused_alone_with_what_was_wrong(xlmr_server, xlmr_attacks):
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        for name, (inputs, message) in xlmr_attacks.items():
            with pytest.raises(InferenceServerException) as error:
                client.infer("cross_encoder", inputs)
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT", name
            assert message in error.value.message(), (name, error.value.message())


def test_attacks_concurrent_with_honest_traffic_leave_every_honest_answer_identical(xlmr_server, xlmr_attacks):
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        alone = [ensemble_scores(client, q, docs) for q, docs in HONEST]

    stop, refused, leaked = threading.Event(), [], []

    def attacker(names):
        with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
            while not stop.is_set():
                for name in names:
                    try:
                        client.infer("cross_encoder", xlmr_attacks[name][0])
                        leaked.append(name)
                    except InferenceServerException as error:
                        refused.append(error.status())

    names = list(xlmr_attacks)
    threads = [threading.Thread(target=attacker, args=(names[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
            under_attack = [[ensemble_scores(client, q, docs) for q, docs in HONEST] for _ in range(10)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert not leaked, f"attacks answered with scores: {sorted(set(leaked))}"
    assert len(refused) >= len(names) and set(refused) == {"StatusCode.INVALID_ARGUMENT"}
    for round_scores in under_attack:
        for expected, got in zip(alone, round_scores, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_tokenizer_output_passed_on_by_hand_scores_as_the_ensemble_does(xlmr_server):
    """What the tokenizer step signs, the scoring step takes: the key reaches both stub processes."""
    query, documents = HONEST[0]
    with grpcclient.InferenceServerClient(xlmr_server.grpc_url) as client:
        q = grpcclient.InferInput("QUERY", [1], "BYTES")
        q.set_data_from_numpy(np.array([query.encode()], dtype=object))
        d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
        d.set_data_from_numpy(np.array([doc.encode() for doc in documents], dtype=object))
        tokenized = client.infer("tokenizer", [q, d])
        inputs = step_inputs(*(tokenized.as_numpy(name) for name in
                               ("INPUT_IDS", "TOKEN_TYPE_IDS", "SEQ_LENGTHS", "SIGNATURE", "CHUNK_COUNTS")))
        direct = client.infer("cross_encoder", inputs).as_numpy("SCORES").reshape(-1)
        np.testing.assert_array_equal(direct, ensemble_scores(client, query, documents))


@pytest.mark.parametrize("step", ["tokenizer", "cross_encoder"])
def test_internal_configs_name_no_host_path(xlmr_server, step):
    with urlopen(f"http://{xlmr_server.http_url}/v2/models/{step}/config", timeout=10) as response:
        config = response.read().decode()
    assert str(xlmr_server.model_dir) not in config and str(xlmr_server.model_dir.resolve()) not in config
    assert json.loads(config)["parameters"]["model_path"]["string_value"] == "1/hf_model"
