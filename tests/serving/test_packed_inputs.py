"""The scoring step's per-request checks: every inconsistency refused alone, with what was wrong."""

import numpy as np
import pytest

from triton_rerank.serving.packed_inputs import (
    PackedInputError,
    PackedInputLimits,
    check_packed_request,
)

LIMITS = PackedInputLimits(vocab_size=100, type_vocab_size=2, max_length=8, max_pairs=3, max_documents=2)


def row(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)[None]


def good() -> dict:
    return {"input_ids": row([1, 2, 3, 4, 5]), "token_type_ids": row([0, 0, 1, 0, 1]), "lengths": row([3, 2]),
            "chunk_counts": row([1, 1])}


def test_a_consistent_request_passes_flattened():
    pairs = check_packed_request(**good(), limits=LIMITS)
    assert pairs.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert pairs.token_type_ids.tolist() == [0, 0, 1, 0, 1]
    assert pairs.lengths.tolist() == [3, 2]
    assert pairs.chunk_counts.tolist() == [1, 1]
    # The two pairs may also be two windows of one document.
    assert check_packed_request(**{**good(), "chunk_counts": row([2])}, limits=LIMITS).chunk_counts.tolist() == [2]


@pytest.mark.parametrize(("change", "message"), [
    ({"lengths": row([2])}, r"sum to 2 tokens, but INPUT_IDS holds 5"),
    ({"lengths": row([3, 3])}, r"sum to 6 tokens"),
    ({"token_type_ids": row([0, 0, 1])}, r"TOKEN_TYPE_IDS 3"),
    ({"lengths": row([6, -1])}, r"SEQ_LENGTHS\[1\] is -1"),
    ({"lengths": row([5, 0])}, r"SEQ_LENGTHS\[1\] is 0"),
    ({"input_ids": row(range(10)), "token_type_ids": row([0] * 10), "lengths": row([1, 9])},
     r"SEQ_LENGTHS\[1\] is 9; a pair has at most 8"),
    ({"input_ids": row([1, 2, 100, 4, 5])}, r"INPUT_IDS holds 100; ids of this model are in \[0, 100\)"),
    ({"input_ids": row([1, 2, -7, 4, 5])}, r"INPUT_IDS holds -7"),
    ({"token_type_ids": row([0, 0, 2, 0, 1])}, r"TOKEN_TYPE_IDS holds 2; ids of this model are in \[0, 2\)"),
    ({"input_ids": row([1] * 4), "token_type_ids": row([0] * 4), "lengths": row([1, 1, 1, 1])},
     r"4 pairs; at most 3 per request"),
    ({"chunk_counts": row([1])}, r"CHUNK_COUNTS sum to 1 pairs, but SEQ_LENGTHS holds 2"),
    ({"chunk_counts": row([2, 1])}, r"CHUNK_COUNTS sum to 3 pairs"),
    ({"chunk_counts": row([3, -1])}, r"CHUNK_COUNTS\[1\] is -1; every document has at least 1 pair"),
    ({"chunk_counts": row([2, 0])}, r"CHUNK_COUNTS\[1\] is 0"),
    ({"input_ids": row([1, 2, 3]), "token_type_ids": row([0] * 3), "lengths": row([1, 1, 1]),
      "chunk_counts": row([1, 1, 1])}, r"CHUNK_COUNTS holds 3 documents; at most 2 per request"),
    ({"chunk_counts": np.zeros((1, 0), dtype=np.int32)}, "CHUNK_COUNTS is empty"),
    ({"lengths": np.zeros((1, 0), dtype=np.int32)}, "SEQ_LENGTHS is empty"),
    ({"lengths": np.array([[3], [2]], dtype=np.int32)}, r"SEQ_LENGTHS must have shape \[1, n\].*\[2, 1\]"),
    ({"input_ids": np.arange(5, dtype=np.int32)}, r"INPUT_IDS must have shape \[1, n\]"),
])
def test_each_inconsistency_is_refused_naming_it(change, message):
    with pytest.raises(PackedInputError, match=message):
        check_packed_request(**{**good(), **change}, limits=LIMITS)


def test_token_limit_caps_a_request_before_its_lengths_are_summed():
    # Pairs within limits in number, but more ids than max_documents (2) full pairs of max_length (8): 16 tokens.
    with pytest.raises(PackedInputError, match=r"INPUT_IDS holds 17 tokens; at most 16"):
        check_packed_request(row([1] * 17), row([0] * 17), row([8, 8, 9]), row([1, 1, 1]), LIMITS)


@pytest.mark.parametrize(("config", "max_length", "expected"), [
    ({"model_type": "xlm-roberta", "vocab_size": 250002, "max_position_embeddings": 8194,
      "type_vocab_size": 1, "pad_token_id": 1}, 0, (250002, 1, 8192)),
    ({"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}, 0,
     (30522, 2, 512)),
    ({"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}, 128,
     (30522, 2, 128)),
])
def test_limits_follow_the_models_tables(config, max_length, expected):
    limits = PackedInputLimits.from_model_config(config, max_documents=1000, max_length=max_length,
                                                 max_chunks_per_doc=4)
    assert (limits.vocab_size, limits.type_vocab_size, limits.max_length) == expected
    assert (limits.max_documents, limits.max_pairs) == (1000, 4000)
    # Tokens: as many as max_documents full pairs, chunked into more pairs or not.
    assert limits.max_tokens == 1000 * expected[2]
