"""What the dialects' request bodies share: checked text fields, top_n, the seed example, and the
long-document extension.

Each dialect's own bodies are in its module (dialects/sglang.py, tei.py, cohere.py, ...), with field
names and defaults as in the original, so that its clients work unchanged. Unknown fields are
ignored, as those servers do, so extra options a client sends do no harm.

Every dialect's body also takes the ensemble's long-document options (LongDocumentRequest):
`long_documents` ("truncate", "chunk" or "error"), `chunk_overlap` and `max_chunks_per_doc`. None of
the original servers has them; a client that does not send them gets the dialect's own behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_EXAMPLE = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "what is panda?",
    "documents": ["hi", "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
                  "is a bear species endemic to China."],
}


def _valid_unicode(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); they cannot be encoded to the UTF-8 Triton needs.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"is not valid Unicode ({error.reason} at position {error.start})") from None
    return text


def _non_empty_query(text: str) -> str:
    if not text.strip():
        raise ValueError("query is empty: send the search query to rank the documents against")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Query = Annotated[str, AfterValidator(_valid_unicode), AfterValidator(_non_empty_query)]
Documents = Annotated[list[Text], Field(min_length=1, description="the documents to rank")]
TopN = Annotated[int | None, Field(default=None, ge=1, description="return only the best top_n documents")]
ModelName = Annotated[str | None, Field(
    default=None, description="accepted for compatibility; the served model answers")]


Instruction = Annotated[Text | None, Field(
    default=None, description="decoder rerankers (Qwen3-Reranker): the task relevance is judged for, e.g. 'Given a "
    "web search query, retrieve relevant passages that answer the query' (the server's default when absent); a "
    "cross-encoder refuses it (400)")]


class RerankRequest(BaseModel):
    """Base of the dialects' request bodies: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


# The ensemble's long-document options. Integers are strict: JSON true or "32" is a mistake, not 1 or 32.
LongDocuments = Annotated[Literal["truncate", "chunk", "error"] | None, Field(
    default=None, description="what happens to a document whose pair with the query does not fit the model: "
    "truncate (cut it), chunk (score it whole, as overlapping windows of the model's size, and answer its best "
    "window's score) or error (refuse the request, 400). Absent: the route's own truncation field, if it has one, "
    "else the server's default (triton-rerank serve --long-documents)")]
ChunkOverlap = Annotated[int | None, Field(
    default=None, ge=0, strict=True, description="with long_documents=chunk: tokens two neighbouring windows of a "
    "document share (server default 32); it must be below the document tokens a window holds, else 400")]
MaxChunksPerDoc = Annotated[int | None, Field(
    default=None, ge=1, strict=True, description="with long_documents=chunk: the most windows one document may make "
    "(default the server's, triton-rerank serve --max-chunks-per-doc); a document that needs more is refused (400)")]


class LongDocumentRequest(RerankRequest):
    """Base of the dialects' request bodies that take the long-document options (all of them)."""

    long_documents: LongDocuments = None
    chunk_overlap: ChunkOverlap = None
    max_chunks_per_doc: MaxChunksPerDoc = None

    def long_document_options(self) -> dict[str, Any]:
        """The options as ScoreOptions' fields (`ensemble.rerank`'s keywords); None = not sent."""
        return {"long_documents": self.long_documents, "chunk_overlap": self.chunk_overlap,
                "max_chunks_per_doc": self.max_chunks_per_doc}

    def ensemble_truncate(self, truncate: bool, own_field: str | None = None) -> bool | None:
        """The ensemble's `truncate` for this body, given what the dialect does with a long document
        (`truncate`: True never refuses it, False refuses it; from its own truncation field `own_field`,
        where it has one). That, unless the body sends long_documents without setting the dialect's own
        field: then None, so that the mode asked for decides, not a dialect default that may contradict it
        (TEI's truncate=false with long_documents=chunk). A field the client set itself is kept: if it
        contradicts long_documents, the request is refused (400)."""
        if self.long_documents is None:
            return truncate
        if own_field is not None and own_field in self.model_fields_set and getattr(self, own_field) is not None:
            return truncate
        return None
