"""The tokenizer step's signature: made only with the key, bound to every array it covers."""

import numpy as np
import pytest

from triton_rerank.serving.step_signature import (
    KEY_ENV,
    SIGNATURE_BYTES,
    SignatureError,
    check_signature,
    sign_pairs,
    step_key,
)

KEY = bytes(range(32))
IDS = np.array([0, 5, 6, 2, 0, 7, 2], dtype=np.int32)
TYPES = np.zeros(7, dtype=np.int32)
LENGTHS = np.array([4, 3], dtype=np.int32)
COUNTS = np.array([1, 1], dtype=np.int32)


def test_a_signature_made_with_the_key_checks():
    signature = sign_pairs(KEY, IDS, TYPES, LENGTHS, COUNTS)
    assert signature.dtype == np.uint8 and signature.shape == (SIGNATURE_BYTES,)
    check_signature(KEY, signature[None], IDS, TYPES, LENGTHS, COUNTS)  # the [1, 32] a Triton input has


@pytest.mark.parametrize("tamper", [
    lambda ids, types, lengths, counts: (ids, types, np.array([3, 4], dtype=np.int32), counts),  # other split
    lambda ids, types, lengths, counts: (np.where(ids == 5, 9, ids), types, lengths, counts),
    lambda ids, types, lengths, counts: (ids, np.where(np.arange(7) == 6, 1, types), lengths, counts),
    lambda ids, types, lengths, counts: (ids[:-1], types[:-1], np.array([4, 2], dtype=np.int32), counts),
    # Same pairs, now the two windows of one document (the max of their scores instead of both).
    lambda ids, types, lengths, counts: (ids, types, lengths, np.array([2], dtype=np.int32)),
])
def test_any_change_to_the_inputs_fails_the_check(tamper):
    signature = sign_pairs(KEY, IDS, TYPES, LENGTHS, COUNTS)
    with pytest.raises(SignatureError, match="send QUERY and DOCUMENTS to `reranker`"):
        check_signature(KEY, signature, *tamper(IDS, TYPES, LENGTHS, COUNTS))


def test_another_key_or_a_forged_signature_fails():
    with pytest.raises(SignatureError):
        check_signature(KEY, sign_pairs(bytes(32), IDS, TYPES, LENGTHS, COUNTS), IDS, TYPES, LENGTHS, COUNTS)
    with pytest.raises(SignatureError):
        check_signature(KEY, np.zeros(SIGNATURE_BYTES, dtype=np.uint8), IDS, TYPES, LENGTHS, COUNTS)
    with pytest.raises(SignatureError):  # right bytes, wrong type
        check_signature(KEY, sign_pairs(KEY, IDS, TYPES, LENGTHS, COUNTS).astype(np.int32), IDS, TYPES, LENGTHS, COUNTS)


def test_without_a_key_nothing_is_signed_or_checked():
    assert not sign_pairs(None, IDS, TYPES, LENGTHS, COUNTS).any()
    check_signature(None, np.zeros(SIGNATURE_BYTES, dtype=np.uint8), IDS, TYPES, LENGTHS, COUNTS)


def test_the_key_comes_from_the_environment_as_hex():
    assert step_key({}) is None
    assert step_key({KEY_ENV: KEY.hex()}) == KEY
    with pytest.raises(SignatureError, match="hex"):
        step_key({KEY_ENV: "not hex"})
    with pytest.raises(SignatureError, match="16 to 64 bytes"):
        step_key({KEY_ENV: "ab" * 4})
