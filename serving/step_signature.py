"""The tokenizer step's signature on what it hands the scoring step.

The ensemble's steps are models Triton serves like any other, so a client can call
`cross_encoder` directly with token ids the tokenizer never produced. The scoring step checks
every request on its own (`packed_inputs`), but it also refuses any input the tokenizer did not
sign: the tokenizer adds a keyed BLAKE2b digest of the packed pairs, and the scoring step
recomputes it. The key is made per server start by the launcher and reaches both steps' stub
processes only through their environment, never through a config or a response.

A tokenizer output obtained by calling `tokenizer` directly carries a valid signature, and may be
passed on: it is exactly what the ensemble would have scored, within the tokenizer's limits.

Without the key (a model repository served by a bare `tritonserver`) signatures are not checked;
the scoring step's own checks still hold.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np

KEY_ENV = "TRITON_RERANK_STEP_KEY"
SIGNATURE_BYTES = 32


class SignatureError(ValueError):
    """The scoring step's inputs do not carry the tokenizer step's signature."""


def step_key(environ=os.environ) -> bytes | None:
    """The per-server key (hex in TRITON_RERANK_STEP_KEY), or None when signing is off."""
    value = environ.get(KEY_ENV, "")
    if not value:
        return None
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise SignatureError(f"{KEY_ENV} must be hex, got {len(value)} characters that are not") from None
    if not 16 <= len(key) <= 64:
        raise SignatureError(f"{KEY_ENV} must hold 16 to 64 bytes (BLAKE2b key), got {len(key)}")
    return key


def sign_pairs(key: bytes | None, input_ids: np.ndarray, token_type_ids: np.ndarray,
               lengths: np.ndarray, chunk_counts: np.ndarray) -> np.ndarray:
    """[SIGNATURE_BYTES] uint8: a keyed digest of the four arrays (zeros when key is None)."""
    if key is None:
        return np.zeros(SIGNATURE_BYTES, dtype=np.uint8)
    digest = hashlib.blake2b(key=key, digest_size=SIGNATURE_BYTES, person=b"tr-pairs")
    for array in (chunk_counts, lengths, input_ids, token_type_ids):
        data = np.ascontiguousarray(array, dtype="<i4")
        # The size goes in first so that no two different sets of arrays hash the same bytes.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data.data)
    return np.frombuffer(digest.digest(), dtype=np.uint8).copy()


def check_signature(key: bytes | None, signature: np.ndarray, input_ids: np.ndarray,
                    token_type_ids: np.ndarray, lengths: np.ndarray, chunk_counts: np.ndarray) -> None:
    """Raises SignatureError unless `signature` is the tokenizer's for these arrays (no-op without a key)."""
    if key is None:
        return
    expected = sign_pairs(key, input_ids, token_type_ids, lengths, chunk_counts)
    signature = np.asarray(signature).reshape(-1)
    if signature.dtype != np.uint8 or not hmac.compare_digest(signature.tobytes(), expected.tobytes()):
        raise SignatureError(
            "these inputs were not produced by this server's tokenizer step: cross_encoder is an internal "
            "step of the `reranker` ensemble; send QUERY and DOCUMENTS to `reranker` instead"
        )
