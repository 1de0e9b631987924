"""Pair tokenization against the Hugging Face tokenizer of the same model directory."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from triton_rerank.serving.tokenization import PairTokenizationError, PairTokenizer


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
def test_packed_pairs_equal_hf_pair_encoding(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    documents = ["the giant panda", "hi", "a search engine ranks documents by relevance"]
    packed = PairTokenizer(model_dir).encode("what is panda?", documents)
    hf = AutoTokenizer.from_pretrained(model_dir)
    expected = [hf("what is panda?", doc) for doc in documents]
    assert packed.lengths.tolist() == [len(e["input_ids"]) for e in expected]
    assert packed.input_ids.tolist() == [i for e in expected for i in e["input_ids"]]
    assert packed.input_ids.dtype == np.int32 and packed.lengths.dtype == np.int32
    if arch == "bert":
        assert packed.token_type_ids.tolist() == [t for e in expected for t in e["token_type_ids"]]
    else:
        assert not packed.token_type_ids.any()


def test_truncation_cuts_the_document_and_keeps_the_query(tiny_model_dirs):
    model_dir = tiny_model_dirs["bert"]
    tokenizer = PairTokenizer(model_dir, max_length=24)
    query = "what is the capital city"
    packed = tokenizer.encode(query, ["bamboo " * 50, "hi"])
    assert packed.lengths.tolist()[0] == 24
    hf = AutoTokenizer.from_pretrained(model_dir)
    expected = hf(query, "bamboo " * 50, truncation="only_second", max_length=24)["input_ids"]
    assert packed.input_ids[:24].tolist() == expected
    # The short pair after the truncated one is untouched.
    assert packed.input_ids[24:].tolist() == hf(query, "hi")["input_ids"]


def test_truncate_false_names_the_document_and_its_length(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=24)
    with pytest.raises(PairTokenizationError, match=r"document 1 makes a pair of \d+ tokens"):
        tokenizer.encode("query", ["short", "bamboo " * 50], truncate=False)
    # The failed request left no truncation behind.
    assert tokenizer.encode("query", ["bamboo " * 50]).lengths[0] == 24


def test_query_longer_than_the_limit_is_an_error(tiny_model_dirs):
    tokenizer = PairTokenizer(tiny_model_dirs["bert"], max_length=16)
    with pytest.raises(PairTokenizationError, match="shorten the query"):
        tokenizer.encode("panda " * 40, ["doc"])


def test_empty_document_list_is_an_error(tiny_model_dirs):
    with pytest.raises(PairTokenizationError, match="DOCUMENTS is empty"):
        PairTokenizer(tiny_model_dirs["bert"]).encode("query", [])


def test_missing_tokenizer_file_says_how_to_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PairTokenizer(tmp_path)
