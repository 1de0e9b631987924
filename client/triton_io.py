"""The ensemble's tensors on the wire: building QUERY / DOCUMENTS and reading SCORES / TOKEN_COUNTS.

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


@dataclass(frozen=True)
class ScoreOptions:
    """How the ensemble treats documents that do not fit: its request parameters.

    truncate:             cut a pair that does not fit the model (False: refuse it, INVALID_ARG)
    truncation_direction: "right" cuts the end of the document, "left" its start (keeps the end)
    max_tokens_per_doc:   keep at most this many tokens of each document (needs truncate)
    """

    truncate: bool = True
    truncation_direction: str = "right"
    max_tokens_per_doc: int | None = None

    def __post_init__(self):
        if self.truncation_direction not in TRUNCATION_DIRECTIONS:
            raise InvalidRequestError(f"truncation_direction must be one of {TRUNCATION_DIRECTIONS}, "
                                      f"got {self.truncation_direction!r}")
        if self.max_tokens_per_doc is not None:
            if isinstance(self.max_tokens_per_doc, bool) or not isinstance(self.max_tokens_per_doc, int) \
                    or self.max_tokens_per_doc < 1:
                raise InvalidRequestError(f"max_tokens_per_doc must be a positive integer, got {self.max_tokens_per_doc!r}")
            if not self.truncate:
                raise InvalidRequestError("max_tokens_per_doc shortens documents: it needs truncate=True")

    def parameters(self) -> dict:
        """The request parameters: truncate always, the others when they differ from the default."""
        params: dict = {"truncate": bool(self.truncate)}
        if self.truncation_direction != "right":
            params["truncation_direction"] = self.truncation_direction
        if self.max_tokens_per_doc is not None:
            # Triton's integer parameters are int64; no model window comes near this.
            params["max_tokens_per_doc"] = min(self.max_tokens_per_doc, 2**31 - 1)
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
    """SCORES and TOKEN_COUNTS of an InferResult, flattened to one value per document."""
    scores = result.as_numpy("SCORES")
    token_counts = result.as_numpy("TOKEN_COUNTS")
    if scores is None or token_counts is None:
        raise RerankServerError("the server's answer lacks SCORES or TOKEN_COUNTS: is this the reranker ensemble?")
    scores, token_counts = scores.reshape(-1), token_counts.reshape(-1)
    if scores.size != expected or token_counts.size != expected:
        raise RerankServerError(f"the server returned {scores.size} scores for {expected} documents")
    return ScoredDocuments(scores.astype(np.float32, copy=False), token_counts.astype(np.int32, copy=False))
