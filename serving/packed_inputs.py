"""Checks of one scoring request's packed pairs, before it is batched with anybody else's.

The scoring step packs the pairs of every request Triton hands one `execute` into shared
micro-batches. A request whose lengths do not sum to its ids would shift every pair packed after
it, ids outside the vocabulary or pairs longer than the position table would fail the whole
forward: so each request is checked alone, and only requests that pass are packed. What fails
gets its own INVALID_ARG answer; its neighbours are scored exactly as if it had not been sent.

numpy only: the checks are unit-tested without torch and without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.families import max_input_length


class PackedInputError(ValueError):
    """One request's packed pairs are inconsistent or over a limit; the message says which."""


@dataclass(frozen=True)
class PackedInputLimits:
    """What one scoring request may carry: the model's tables and the per-request limits."""

    vocab_size: int
    type_vocab_size: int
    # Most tokens in one pair: the position table (or the served max_length, if lower).
    max_length: int
    # Most pairs in one request: the tokenizer step's max_documents x max_chunks_per_doc.
    max_pairs: int
    # Most documents in one request: the tokenizer step's max_documents.
    max_documents: int = 0

    @classmethod
    def from_model_config(cls, config: dict, max_documents: int, max_length: int = 0,
                          max_chunks_per_doc: int = 1) -> PackedInputLimits:
        window = max_input_length(config)
        return cls(
            vocab_size=int(config["vocab_size"]),
            type_vocab_size=int(config.get("type_vocab_size", 1) or 1),
            max_length=min(window, max_length) if max_length > 0 else window,
            max_pairs=max_documents * max_chunks_per_doc,
            max_documents=max_documents,
        )

    @property
    def max_tokens(self) -> int:
        # As many tokens as max_documents full pairs, chunked or not: the tokenizer step's bound too.
        return (self.max_documents or self.max_pairs) * self.max_length


@dataclass(frozen=True)
class PackedRequest:
    """One request's pairs, flat: ids and types [total_tokens] int32, lengths [num_pairs] int32, and
    chunk_counts [num_documents] int32: how many consecutive pairs (windows) belong to each document."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    chunk_counts: np.ndarray


def _one_row(name: str, array: np.ndarray) -> np.ndarray:
    # The tokenizer step sends [1, n]; a batch dimension over 1 would need one answer per row.
    if array.ndim != 2 or array.shape[0] != 1:
        raise PackedInputError(f"{name} must have shape [1, n] (one request's pairs), got {list(array.shape)}")
    return array.reshape(-1)


def check_packed_request(input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray,
                         chunk_counts: np.ndarray, limits: PackedInputLimits) -> PackedRequest:
    """The request's arrays, flattened, if they describe pairs this model can score; else PackedInputError."""
    input_ids = _one_row("INPUT_IDS", input_ids)
    token_type_ids = _one_row("TOKEN_TYPE_IDS", token_type_ids)
    lengths = _one_row("SEQ_LENGTHS", lengths)
    chunk_counts = _one_row("CHUNK_COUNTS", chunk_counts)
    if lengths.size == 0:
        raise PackedInputError("SEQ_LENGTHS is empty: a request scores at least one pair")
    if lengths.size > limits.max_pairs:
        raise PackedInputError(f"SEQ_LENGTHS holds {lengths.size} pairs; at most {limits.max_pairs} per request")
    if input_ids.size > limits.max_tokens:
        raise PackedInputError(f"INPUT_IDS holds {input_ids.size} tokens; at most {limits.max_tokens} per request")
    shortest, longest = int(lengths.min()), int(lengths.max())
    if shortest < 1:
        raise PackedInputError(f"SEQ_LENGTHS[{int(lengths.argmin())}] is {shortest}; every pair has at least 1 token")
    if longest > limits.max_length:
        raise PackedInputError(
            f"SEQ_LENGTHS[{int(lengths.argmax())}] is {longest}; a pair has at most {limits.max_length} tokens"
        )
    total = int(lengths.sum(dtype=np.int64))
    if total != input_ids.size or total != token_type_ids.size:
        raise PackedInputError(
            f"SEQ_LENGTHS sum to {total} tokens, but INPUT_IDS holds {input_ids.size} and TOKEN_TYPE_IDS "
            f"{token_type_ids.size}: the three must describe the same pairs"
        )
    for name, values, bound in (("INPUT_IDS", input_ids, limits.vocab_size),
                                ("TOKEN_TYPE_IDS", token_type_ids, limits.type_vocab_size)):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= bound:
            bad = low if low < 0 else high
            raise PackedInputError(f"{name} holds {bad}; ids of this model are in [0, {bound})")
    _check_chunk_counts(chunk_counts, lengths.size, limits)
    return PackedRequest(input_ids=input_ids, token_type_ids=token_type_ids, lengths=lengths,
                         chunk_counts=chunk_counts)


def _check_chunk_counts(chunk_counts: np.ndarray, pairs: int, limits: PackedInputLimits) -> None:
    # Scores are reduced per document over these counts: they must cover every pair, once.
    if chunk_counts.size == 0:
        raise PackedInputError("CHUNK_COUNTS is empty: a request scores at least one document")
    if limits.max_documents and chunk_counts.size > limits.max_documents:
        raise PackedInputError(f"CHUNK_COUNTS holds {chunk_counts.size} documents; at most {limits.max_documents} "
                               "per request")
    if int(chunk_counts.min()) < 1:
        raise PackedInputError(f"CHUNK_COUNTS[{int(chunk_counts.argmin())}] is {int(chunk_counts.min())}; "
                               "every document has at least 1 pair")
    covered = int(chunk_counts.sum(dtype=np.int64))
    if covered != pairs:
        raise PackedInputError(f"CHUNK_COUNTS sum to {covered} pairs, but SEQ_LENGTHS holds {pairs}: each pair "
                               "belongs to exactly one document")
