"""Pair tokenization for cross-encoders, packed without padding.

The tokenizer step of the ensemble turns one query and N documents into the packed form the
cross-encoder consumes: flat token ids of every (query, document) pair back to back, each
pair's length, and token types (all zeros for XLM-R, 0/1 segments for BERT).

Only `tokenizers` and numpy are imported here: the tokenizer instance runs in its own Triton
stub process and must not pay for torch or CUDA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..models.families import max_input_length


class PairTokenizationError(ValueError):
    """The request cannot be tokenized as asked; the message says which input and why."""


@dataclass(frozen=True)
class PackedPairs:
    """Pairs of one request, packed back to back.

    input_ids:      [total_tokens] int32
    token_type_ids: [total_tokens] int32 (segment ids; zeros for models without token types)
    lengths:        [num_pairs] int32, tokens of each pair after truncation
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray


class PairTokenizer:
    """Encodes (query, document) pairs with the model's own fast tokenizer (`tokenizer.json`).

    The pair template of the tokenizer file gives the model's special tokens
    (`<s> q </s></s> d </s>` for XLM-R, `[CLS] q [SEP] d [SEP]` for BERT). Truncation removes
    document tokens first and keeps the query whole.
    """

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the tokenizer step needs a Hugging Face fast tokenizer file. "
                "Save one with `AutoTokenizer.from_pretrained(path).save_pretrained(path)`."
            )
        config = json.loads((model_dir / "config.json").read_text())
        limit = max_input_length(config)
        self.max_length = min(limit, max_length) if max_length else limit
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # The file may carry padding/truncation settings from training; we pack, so neither.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # Special tokens the pair template adds around (query, document).
        self.num_special_tokens = self._tokenizer.num_special_tokens_to_add(is_pair=True)

    def encode(self, query: str, documents: list[str], truncate: bool = True) -> PackedPairs:
        if not documents:
            raise PairTokenizationError("DOCUMENTS is empty: send at least one document")
        query_tokens = len(self._tokenizer.encode(query, add_special_tokens=False))
        room = self.max_length - self.num_special_tokens - query_tokens
        if room < 1:
            raise PairTokenizationError(
                f"the query has {query_tokens} tokens; with the special tokens it leaves no room for a "
                f"document within the model's max input of {self.max_length} tokens: shorten the query"
            )
        # One batched call (Rust, parallel) for all pairs; truncation is applied per pair below
        # by re-encoding only the pairs that are too long, which are rare.
        encodings = self._tokenizer.encode_batch([(query, doc) for doc in documents])
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(encodings))
        too_long = np.flatnonzero(lengths > self.max_length)
        if too_long.size:
            if not truncate:
                i = int(too_long[0])
                raise PairTokenizationError(
                    f"document {i} makes a pair of {int(lengths[i])} tokens, more than the model's max input "
                    f"of {self.max_length}; shorten it or send truncate=true"
                )
            self._tokenizer.enable_truncation(self.max_length, strategy="only_second")
            try:
                clipped = self._tokenizer.encode_batch([(query, documents[i]) for i in too_long])
            finally:
                self._tokenizer.no_truncation()
            for i, encoding in zip(too_long, clipped, strict=True):
                encodings[i] = encoding
                lengths[i] = len(encoding)
        input_ids = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])
        token_type_ids = np.concatenate([np.asarray(e.type_ids, dtype=np.int32) for e in encodings])
        return PackedPairs(input_ids=input_ids, token_type_ids=token_type_ids, lengths=lengths)
