"""Reading and checking what a rerank request carries: its strings and its parameters.

Kept free of Triton imports so it is unit-testable; the model.py glue passes the raw tensor
contents and the request's parameter JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


class RequestError(ValueError):
    """The request is malformed; the message says what to change."""


LONG_DOCUMENT_MODES = ("truncate", "chunk", "error")


@dataclass(frozen=True)
class RequestOptions:
    # What happens to a document whose pair does not fit the model: "truncate" (cut it), "chunk"
    # (score overlapping windows, keep the best) or "error" (refuse the request).
    long_documents: str = "truncate"
    # Which end of a too-long document is cut: "right" (its end) or "left" (its start).
    truncation_direction: str = "right"
    # At most this many tokens of each document (shorter than the model's window), or None.
    max_tokens_per_doc: int | None = None
    # Tokens two neighbouring windows share (chunk), and the most windows of one document.
    chunk_overlap: int = 32
    max_chunks_per_doc: int = 64
    # The task a decoder reranker judges relevance for (Qwen3-Reranker's "Instruct"); None = the
    # server's default instruction. Cross-encoders take none.
    instruction: str | None = None

    @property
    def truncate(self) -> bool:
        return self.long_documents != "error"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry (tokenizer config.pbtxt parameters)."""

    max_documents: int = 1000
    # Far above a model's max input (8192 XLM-R tokens are ~40 KB of text), low enough that a
    # pathological string cannot stall the tokenizer instance for long.
    max_text_bytes: int = 1 << 20
    # All strings of one request together: room for 1000 documents of 8 KB, or 200 that each
    # fill an 8192-token window (about 40 KB). It bounds what one request can cost where
    # documents cannot be cut short before tokenizing (text without spaces is tokenized whole:
    # seconds of CPU and about 1 GB of memory for 8 MB).
    max_request_bytes: int = 8 << 20
    # The server's defaults for requests that do not say (serve --long-documents, --max-chunks-per-doc).
    long_documents: str = "truncate"
    max_chunks_per_doc: int = 64

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> RequestLimits:
        """The limits set in the tokenizer's config.pbtxt parameters (empty or 0 = the default)."""

        def read(key: str) -> int:
            return int(params.get(key) or 0) or getattr(cls, key)

        long_documents = params.get("long_documents") or cls.long_documents
        if long_documents not in LONG_DOCUMENT_MODES:
            raise ValueError(f"parameter long_documents must be one of {LONG_DOCUMENT_MODES}, got {long_documents!r}")
        return cls(max_documents=read("max_documents"), max_text_bytes=read("max_text_bytes"),
                   max_request_bytes=read("max_request_bytes"), long_documents=long_documents,
                   max_chunks_per_doc=read("max_chunks_per_doc"))

    @property
    def max_windows(self) -> int:
        """Most windows (pairs) one request may score: the scoring step's per-request bound."""
        return self.max_documents * self.max_chunks_per_doc


KNOWN_PARAMETERS = {"truncate", "long_documents", "truncation_direction", "max_tokens_per_doc", "chunk_overlap",
                    "max_chunks_per_doc", "instruction"}
TRUNCATION_DIRECTIONS = ("right", "left")


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(f"request parameter {name!r} must be a boolean, got {value!r}")


def _as_int(name: str, value, minimum: int) -> int:
    # Triton hands integer parameters over as numbers; the generate extension's JSON may carry a string.
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise RequestError(f"request parameter {name!r} must be {kind}, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise RequestError(f"request parameter {name!r} must be one of {list(choices)}, got {value!r}")
    return value.lower()


def _long_documents(params: dict, server_default: str, cuts: bool) -> str:
    """The mode asked for: `long_documents`, or the older `truncate` (false = "error"); the server's default.

    `cuts`: the request asks how documents are cut (left truncation, max_tokens_per_doc), which
    only truncation does; a request that says so and names no mode is truncated.
    """
    truncate = _as_bool("truncate", params["truncate"]) if "truncate" in params else None
    if "long_documents" in params:
        mode = _choice("long_documents", params["long_documents"], LONG_DOCUMENT_MODES)
        if truncate is not None and truncate != (mode != "error"):
            raise RequestError(f"request parameters truncate={str(truncate).lower()} and long_documents={mode!r} "
                               "contradict each other: send long_documents alone")
        return mode
    if truncate is False:
        return "error"
    if cuts:
        return "truncate"
    if truncate is None:
        return server_default
    # truncate=true only asks that a long document not be refused; chunking does not refuse it either.
    return server_default if server_default != "error" else "truncate"


def read_options(parameters_json: str | None, limits: RequestLimits | None = None) -> RequestOptions:
    """Options from Triton request parameters (a JSON object string); defaults from the server's limits."""
    limits = limits or RequestLimits()
    params = json.loads(parameters_json) if parameters_json else {}
    unknown = sorted(set(params) - KNOWN_PARAMETERS)
    if unknown:
        raise RequestError(f"unknown request parameter(s) {unknown}; supported: {sorted(KNOWN_PARAMETERS)}")
    direction = params.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() not in TRUNCATION_DIRECTIONS:
        raise RequestError(f"request parameter 'truncation_direction' must be 'right' or 'left', got {direction!r}")
    mode = _long_documents(params, limits.long_documents,
                           cuts=direction.lower() == "left" or params.get("max_tokens_per_doc") is not None)
    if mode == "chunk" and direction.lower() == "left":
        raise RequestError("truncation_direction='left' says which end of a document truncation cuts; "
                           "long_documents='chunk' cuts nothing: send one of the two")
    max_tokens = params.get("max_tokens_per_doc")
    if max_tokens is not None:
        max_tokens = _as_int("max_tokens_per_doc", max_tokens, 1)
        if mode != "truncate":
            raise RequestError("request parameter 'max_tokens_per_doc' shortens documents: it needs truncate=true "
                               f"(long_documents='truncate'), not long_documents={mode!r}")
    overlap = _as_int("chunk_overlap", params.get("chunk_overlap", RequestOptions.chunk_overlap), 0)
    max_chunks = _as_int("max_chunks_per_doc", params.get("max_chunks_per_doc", limits.max_chunks_per_doc), 1)
    return RequestOptions(long_documents=mode, truncation_direction=direction.lower(), max_tokens_per_doc=max_tokens,
                          chunk_overlap=overlap, max_chunks_per_doc=max_chunks,
                          instruction=_instruction(params.get("instruction"), limits))


def _instruction(value, limits: RequestLimits) -> str | None:
    """The request's instruction: a string within the per-string limit, without NUL characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"request parameter 'instruction' must be a string, got {type(value).__name__}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limits.max_text_bytes:
        raise RequestError(f"request parameter 'instruction' is {size} bytes; this server takes at most "
                           f"{limits.max_text_bytes} bytes per string")
    if "\x00" in value:
        raise RequestError("request parameter 'instruction' contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("request parameter 'instruction' is not valid UTF-8 (it holds a lone surrogate)") from None
    return value


def _byte_size(item) -> int:
    """UTF-8 bytes of a string tensor element (0 for what `_decode` refuses anyway)."""
    if isinstance(item, bytes | np.bytes_):
        return len(item)
    return len(item.encode("utf-8", "surrogatepass")) if isinstance(item, str) else 0


def _check_sizes(queries, documents, limits: RequestLimits) -> None:
    """The per-string and per-request byte limits, checked before any string is decoded."""
    total = 0
    for name, items in (("QUERY", queries), ("DOCUMENTS", documents)):
        for index, item in enumerate(items):
            size = _byte_size(item)
            if size > limits.max_text_bytes:
                raise RequestError(f"{name}[{index}] is {size} bytes; this server takes at most "
                                   f"{limits.max_text_bytes} bytes per string")
            total += size
    if total > limits.max_request_bytes:
        raise RequestError(
            f"QUERY and DOCUMENTS hold {total} bytes of text together; this server takes at most "
            f"{limits.max_request_bytes} bytes per request (max_request_bytes): split the documents over "
            "several requests, or send only the start of very long documents (the model reads at most "
            "its max input of tokens of each pair)"
        )


def _decode(name: str, index: int, item) -> str:
    if isinstance(item, str):
        item = item.encode("utf-8")
    if not isinstance(item, bytes | np.bytes_):
        raise RequestError(f"{name}[{index}] must be a string (TYPE_STRING / BYTES), got {type(item).__name__}")
    try:
        text = bytes(item).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"{name}[{index}] is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if "\x00" in text:
        raise RequestError(f"{name}[{index}] contains a NUL character (byte 0 at {text.index(chr(0))})")
    return text


def read_query_and_documents(query_tensor, documents_tensor,
                             limits: RequestLimits = RequestLimits()) -> tuple[str, list[str]]:
    """The query string and the document strings of a request; tensors may be None if missing.

    An empty document string is allowed: it is scored as a pair with an empty passage.
    """
    if query_tensor is None or documents_tensor is None:
        raise RequestError("a rerank request needs both QUERY (one string) and DOCUMENTS (one or more strings)")
    queries = query_tensor.as_numpy().reshape(-1)
    if queries.size != 1:
        raise RequestError(f"QUERY must hold exactly one string, got {queries.size}")
    raw_documents = documents_tensor.as_numpy().reshape(-1)
    if raw_documents.size > limits.max_documents:
        raise RequestError(
            f"DOCUMENTS holds {raw_documents.size} strings; this server takes at most {limits.max_documents} "
            "per request: split the list over several requests (the Python client does this for you)"
        )
    _check_sizes(queries, raw_documents, limits)
    query = _decode("QUERY", 0, queries[0])
    if not query.strip():
        raise RequestError("QUERY is empty: send the search query to rank the documents against")
    documents = [_decode("DOCUMENTS", i, d) for i, d in enumerate(raw_documents)]
    if not documents:
        raise RequestError("DOCUMENTS is empty: send at least one document")
    return query, documents
