"""Long documents through the real server: chunked windows, left truncation, the limits on windows.

Checked against the Hugging Face tokenizer's own sliding window (`return_overflowing_tokens`
with `stride`) and the transformers model on the same weights. The BERT test model's WordPiece
vocabulary holds every word used here whole, so a window's text, cut out of the document at its
tokens' offsets, tokenizes back to exactly that window; each test checks it does before relying on it.
"""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from triton_rerank.client import InvalidRequestError, RerankClient

WORDS = ("panda bear bamboo china forest animal giant mountain search engine query document passage rank "
         "score relevance model network water river city capital country history science").split()
QUERY = "where does the giant panda live"
WINDOW = 512  # the BERT test model's max input


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


@pytest.fixture(scope="module")
def bert(server_pool):
    return server_pool.get("bert")


@pytest.fixture(scope="module")
def hf_tokenizer(bert):
    return AutoTokenizer.from_pretrained(bert.model_dir)


def window_texts(tokenizer, query: str, document: str, overlap: int) -> list[str]:
    """The document's windows as the HF tokenizer cuts them, each as the text it covers."""
    encoding = tokenizer(query, document, truncation="only_second", max_length=WINDOW, stride=overlap,
                         return_overflowing_tokens=True, return_offsets_mapping=True)
    texts = []
    for k, ids in enumerate(encoding["input_ids"]):
        spans = [span for span, sequence in zip(encoding["offset_mapping"][k], encoding.sequence_ids(k),
                                                strict=True) if sequence == 1]
        text = document[spans[0][0]:spans[-1][1]]
        assert tokenizer(query, text)["input_ids"] == ids, "a window's text does not tokenize back to the window"
        texts.append(text)
    return texts


def reference_window_scores(model_dir, query: str, document: str, overlap: int) -> list[float]:
    """transformers on the same weights, fp32, one window at a time, the windows as the HF tokenizer
    cuts them (token types only where the model has them: the tokenizers library types an XLM-R
    overflow window's document 1, which its one-row type table does not have)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    encoding = tokenizer(query, document, truncation="only_second", max_length=WINDOW, stride=overlap,
                         return_overflowing_tokens=True)
    scores = []
    with torch.inference_mode():
        for k, ids in enumerate(encoding["input_ids"]):
            inputs = {"input_ids": torch.tensor([ids])}
            if model.config.type_vocab_size > 1:
                inputs["token_type_ids"] = torch.tensor([encoding["token_type_ids"][k]])
            scores.append(float(model(**inputs).logits[0, 0]))
    return scores


@pytest.mark.parametrize(("arch", "protocol"), [("bert", "grpc"), ("bert", "http"), ("xlm-roberta", "grpc")])
def test_a_chunked_document_scores_the_max_of_the_reference_over_its_windows(server_pool, arch, protocol):
    server = server_pool.get(arch)
    # The XLM-R test tokenizer spells most words letter by letter: fewer words make as many windows.
    size = 1 if arch == "bert" else 4
    documents = [words(1500 // size, seed=1), "the giant panda lives in the mountain forest of china",
                 words(700 // size, seed=2)]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RerankClient(url, protocol) as client:
        chunked = client.score(QUERY, documents, long_documents="chunk", chunk_overlap=48)
    for i, document in enumerate(documents):
        reference = reference_window_scores(server.model_dir, QUERY, document, overlap=48)
        assert chunked.chunk_counts[i] == len(reference)
        np.testing.assert_allclose(chunked.scores[i], max(reference), rtol=0, atol=1e-4)
    assert chunked.chunk_counts.tolist()[1] == 1 and min(chunked.chunk_counts[[0, 2]]) >= 2


def test_a_chunked_document_scores_the_max_of_its_windows_sent_alone(bert, hf_tokenizer):
    documents = [words(1500, seed=1), "the giant panda lives in the mountain forest of china", words(700, seed=2)]
    with RerankClient(bert.grpc_url) as client:
        chunked = client.score(QUERY, documents, long_documents="chunk", chunk_overlap=48)
        for i, document in enumerate(documents):
            windows = window_texts(hf_tokenizer, QUERY, document, overlap=48)
            alone = client.score(QUERY, windows, long_documents="truncate")
            assert chunked.chunk_counts[i] == len(windows)
            # The same pairs, scored in other micro-batches: equal to float32 rounding.
            np.testing.assert_allclose(chunked.scores[i], alone.scores.max(), rtol=0, atol=1e-5)
            assert chunked.token_counts[i] == alone.token_counts.sum()


def test_chunk_leaves_short_documents_as_they_are_and_never_scores_below_truncation(bert):
    short = ["panda", "the giant panda lives in china", words(300, seed=3)]
    long = [words(n, seed=n) for n in (600, 1200, 2500)]
    with RerankClient(bert.grpc_url) as client:
        truncated = client.score(QUERY, short + long)
        chunked = client.score(QUERY, short + long, long_documents="chunk")
    np.testing.assert_allclose(chunked.scores[:3], truncated.scores[:3], rtol=0, atol=1e-5)
    assert chunked.token_counts[:3].tolist() == truncated.token_counts[:3].tolist()
    assert chunked.chunk_counts.tolist()[:3] == [1, 1, 1] and truncated.chunk_counts.tolist() == [1] * 6
    # The first window is the truncated pair: the max over windows is never lower.
    assert (chunked.scores >= truncated.scores - 1e-5).all()
    assert (chunked.chunk_counts[3:] > 1).all() and (chunked.token_counts[3:] > WINDOW).all()


def test_left_truncation_scores_the_last_window_of_the_document_alone(bert, hf_tokenizer):
    document = words(1500, seed=4)
    query_tokens = len(hf_tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    room = WINDOW - 3 - query_tokens  # [CLS] query [SEP] document [SEP]
    ids = hf_tokenizer(document, add_special_tokens=False)["input_ids"]
    offsets = hf_tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    tail = document[offsets[len(ids) - room][0]:]
    assert hf_tokenizer(tail, add_special_tokens=False)["input_ids"] == ids[-room:]
    with RerankClient(bert.grpc_url) as client:
        left = client.score(QUERY, [document, "panda"], truncation_direction="left")
        alone = client.score(QUERY, [tail, "panda"])
        right = client.score(QUERY, [document])
    np.testing.assert_allclose(left.scores, alone.scores, rtol=0, atol=1e-5)
    assert left.token_counts.tolist() == alone.token_counts.tolist() == [WINDOW, alone.token_counts[1]]
    assert abs(left.scores[0] - right.scores[0]) > 1e-4, "left and right truncation scored the same tokens"


def test_a_100k_token_document_is_chunked_within_max_chunks_per_doc_and_refused_above(bert, hf_tokenizer):
    document = words(100_000, seed=5)
    windows = len(hf_tokenizer(QUERY, document, truncation="only_second", max_length=WINDOW, stride=32,
                               return_overflowing_tokens=True)["input_ids"])
    assert windows > 64  # more than the server's default max_chunks_per_doc
    with RerankClient(bert.grpc_url) as client:
        scored = client.score(QUERY, ["panda", document], long_documents="chunk", max_chunks_per_doc=windows)
        assert scored.chunk_counts.tolist() == [1, windows]
        assert scored.token_counts[1] >= 100_000 and np.isfinite(scored.scores).all()
        with pytest.raises(InvalidRequestError, match=rf"document 1 makes {windows} windows of \d+ tokens "
                                                      rf"\(overlap 32\), more than max_chunks_per_doc={windows - 1}"):
            client.score(QUERY, ["panda", document], long_documents="chunk", max_chunks_per_doc=windows - 1)
        # The server's default (64) refuses it too, naming the limit; the server carries on.
        with pytest.raises(InvalidRequestError, match="more than max_chunks_per_doc=64"):
            client.score(QUERY, [document], long_documents="chunk")
        assert client.score(QUERY, ["panda"]).scores.shape == (1,)


@pytest.mark.parametrize(("options", "message"), [
    ({"long_documents": "error"}, r"document 0 makes a pair of \d+ tokens, more than the model's max input of 512"),
    ({"truncate": False}, r"document 0 makes a pair of \d+ tokens"),
    ({"long_documents": "chunk", "chunk_overlap": 500}, r"chunk_overlap is 500, but a window holds only \d+ "
                                                        r"document tokens .*send a chunk_overlap below"),
])
def test_refusals_say_what_to_change(bert, options, message):
    with RerankClient(bert.grpc_url) as client, pytest.raises(InvalidRequestError, match=message):
        client.score(QUERY, [words(800, seed=6)], **options)


def test_serve_default_chunks_requests_that_do_not_say(start_extra_server, tiny_model_dirs):
    server = start_extra_server(tiny_model_dirs["bert"], "bert", long_documents="chunk", max_chunks_per_doc=4)
    document = words(1200, seed=7)  # 3 windows of 502 tokens with overlap 32
    with RerankClient(server.grpc_url) as client:
        default = client.score(QUERY, [document])
        # truncate=true asks only that a long document not be refused: the server chunks it.
        assert client.score(QUERY, [document], truncate=True).chunk_counts.tolist() == default.chunk_counts.tolist()
        assert default.chunk_counts[0] > 1
        assert client.score(QUERY, [document], long_documents="truncate").chunk_counts.tolist() == [1]
        with pytest.raises(InvalidRequestError, match="more than the model's max input"):
            client.score(QUERY, [document], truncate=False)
        # The server's max_chunks_per_doc is the default a request may raise.
        longer = words(3000, seed=8)
        with pytest.raises(InvalidRequestError, match="more than max_chunks_per_doc=4"):
            client.score(QUERY, [longer])
        assert client.score(QUERY, [longer], max_chunks_per_doc=20).chunk_counts[0] > 4


def test_rerank_cli_chunks_on_request(bert):
    documents = ["panda", words(1200, seed=9)]
    command = [sys.executable, "-m", "triton_rerank", "rerank", "--url", bert.grpc_url, "--query", QUERY, "--json",
               "--long-documents", "chunk", "--chunk-overlap", "16", *documents]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    by_index = {r["index"]: r for r in json.loads(printed.stdout)}
    with RerankClient(bert.grpc_url) as client:
        expected = client.score(QUERY, documents, long_documents="chunk", chunk_overlap=16)
    assert [by_index[i]["chunk_count"] for i in (0, 1)] == expected.chunk_counts.tolist()
    np.testing.assert_allclose([by_index[i]["score"] for i in (0, 1)], expected.scores, rtol=0, atol=1e-5)
    refused = subprocess.run(command[:-2] + ["--chunk-overlap", "600", *documents], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "chunk_overlap is 600" in refused.stderr
