"""The ensemble's tensors on the wire: building QUERY / DOCUMENTS and reading SCORES / TOKEN_COUNTS /
CHUNK_COUNTS.

Works with any of tritonclient's four modules (http, grpc and their .aio variants): they share
InferInput and InferResult APIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequestError, RerankServerError
from .ranking import ScoredDocuments

MODEL_NAME = "reranker"
PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
TRUNCATION_DIRECTIONS = ("right", "left")
LONG_DOCUMENT_MODES = ("truncate", "chunk", "error")


def _check_int(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class ScoreOptions:
    """How the ensemble treats documents that do not fit: its request parameters.

    truncate:             False refuses a pair that does not fit the model (INVALID_ARG), the same
                          as long_documents="error"; True cuts or chunks it; None = the server's default
    long_documents:       "truncate" (cut), "chunk" (score overlapping windows, keep the best) or
                          "error"; None = the server's default (serve --long-documents)
    truncation_direction: "right" cuts the end of the document, "left" its start (keeps the end)
    max_tokens_per_doc:   keep at most this many tokens of each document (truncating only)
    chunk_overlap:        tokens neighbouring windows share (chunk; server default 32)
    max_chunks_per_doc:   the most windows of one document (chunk; default the server's)
    instruction:          decoder rerankers (Qwen3-Reranker): the task relevance is judged for;
                          None = the server's default instruction. A cross-encoder refuses it.
    """

    truncate: bool | None = None
    truncation_direction: str = "right"
    max_tokens_per_doc: int | None = None
    long_documents: str | None = None
    chunk_overlap: int | None = None
    max_chunks_per_doc: int | None = None
    instruction: str | None = None

    def __post_init__(self):
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise InvalidRequestError(f"instruction must be a string, got {type(self.instruction).__name__}")
        if self.truncation_direction not in TRUNCATION_DIRECTIONS:
            raise InvalidRequestError(f"truncation_direction must be one of {TRUNCATION_DIRECTIONS}, "
                                      f"got {self.truncation_direction!r}")
        if self.long_documents is not None and self.long_documents not in LONG_DOCUMENT_MODES:
            raise InvalidRequestError(f"long_documents must be one of {LONG_DOCUMENT_MODES}, "
                                      f"got {self.long_documents!r}")
        if (self.long_documents is not None and self.truncate is not None
                and self.truncate != (self.long_documents != "error")):
            raise InvalidRequestError(f"truncate={self.truncate} and long_documents={self.long_documents!r} "
                                      "contradict each other: set long_documents alone")
        _check_int("max_tokens_per_doc", self.max_tokens_per_doc, 1)
        _check_int("chunk_overlap", self.chunk_overlap, 0)
        _check_int("max_chunks_per_doc", self.max_chunks_per_doc, 1)
        if self.long_documents == "chunk" and self.truncation_direction == "left":
            raise InvalidRequestError("truncation_direction='left' says which end truncation cuts; "
                                      "long_documents='chunk' cuts nothing: send one of the two")
        if self.max_tokens_per_doc is not None:
            if self.truncate is False or self.long_documents == "error":
                raise InvalidRequestError("max_tokens_per_doc shortens documents: it needs truncate=True")
            if self.long_documents == "chunk":
                raise InvalidRequestError("max_tokens_per_doc shortens documents; long_documents='chunk' scores them "
                                          "whole: send one of the two")

    def parameters(self) -> dict:
        """The request parameters that are set: long_documents (or else truncate), and the others."""
        params: dict = {}
        if self.long_documents is not None:
            params["long_documents"] = self.long_documents
        elif self.truncate is not None:
            params["truncate"] = bool(self.truncate)
        if self.truncation_direction != "right":
            params["truncation_direction"] = self.truncation_direction
        # Triton's integer parameters are int64; no window or count comes near 2**31.
        for name in ("max_tokens_per_doc", "chunk_overlap", "max_chunks_per_doc"):
            if getattr(self, name) is not None:
                params[name] = min(getattr(self, name), 2**31 - 1)
        if self.instruction is not None:
            params["instruction"] = self.instruction
        return params


def server_address(url: str, protocol: str) -> str:
    """host:port as tritonclient wants it: no scheme, the protocol's default port if none is given."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    address = url.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if address.startswith(scheme):
            address = address[len(scheme):]
    address = address.rstrip("/")
    if not address:
        raise ValueError("the server url is empty; e.g. 127.0.0.1:8001")
    # A bare host (or an IPv6 literal in brackets without a port) gets the protocol's default port.
    host_part = address.rsplit("]", 1)[-1]
    if ":" not in host_part:
        address = f"{address}:{DEFAULT_PORTS[protocol]}"
    return address


def check_request(query, documents) -> list[str]:
    """The documents as a list, after the checks the server cannot make for a Python caller."""
    if not isinstance(query, str):
        raise InvalidRequestError(f"query must be a string, got {type(query).__name__}")
    if isinstance(documents, str | bytes):
        raise InvalidRequestError("documents must be a list of strings, not one string")
    documents = list(documents)
    if not documents:
        raise InvalidRequestError("documents is empty: send at least one document")
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise InvalidRequestError(f"documents[{i}] must be a string, got {type(document).__name__}")
    return documents


def _utf8(name: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(f"{name} is not valid Unicode ({error.reason} at position {error.start})") from None


def make_inputs(module, query: str, documents: Sequence[str]) -> list:
    """The ensemble's QUERY [1] and DOCUMENTS [N] BYTES inputs for a tritonclient module."""
    query_input = module.InferInput("QUERY", [1], "BYTES")
    query_input.set_data_from_numpy(np.array([_utf8("query", query)], dtype=object))
    documents_input = module.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    encoded = [_utf8(f"documents[{i}]", d) for i, d in enumerate(documents)]
    documents_input.set_data_from_numpy(np.array(encoded, dtype=object))
    return [query_input, documents_input]


def read_outputs(result, expected: int) -> ScoredDocuments:
    """SCORES, TOKEN_COUNTS and CHUNK_COUNTS of an InferResult, flattened to one value per document.

    A server from before chunking answers no CHUNK_COUNTS: every document was one pair.
    """
    scores = result.as_numpy("SCORES")
    token_counts = result.as_numpy("TOKEN_COUNTS")
    chunk_counts = result.as_numpy("CHUNK_COUNTS")
    if scores is None or token_counts is None:
        raise RerankServerError("the server's answer lacks SCORES or TOKEN_COUNTS: is this the reranker ensemble?")
    scores, token_counts = scores.reshape(-1), token_counts.reshape(-1)
    chunk_counts = np.ones(expected, dtype=np.int32) if chunk_counts is None else chunk_counts.reshape(-1)
    if scores.size != expected or token_counts.size != expected or chunk_counts.size != expected:
        raise RerankServerError(f"the server returned {scores.size} scores for {expected} documents")
    return ScoredDocuments(scores.astype(np.float32, copy=False), token_counts.astype(np.int32, copy=False),
                           chunk_counts.astype(np.int32, copy=False))


def reranker_kind_of(config: dict) -> str:
    """What the ensemble's SCORES are, from its model configuration (a dict as tritonclient's HTTP
    client returns it, or the gRPC one's as_json form): "decoder" (logit(yes) - logit(no) of a
    decoder reranker), "cross-encoder", or "auto" when the server does not say."""
    config = config.get("config", config)
    parameter = config.get("parameters", {}).get("reranker_kind", {})
    return parameter.get("string_value") or parameter.get("stringValue") or "auto"
