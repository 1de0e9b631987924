"""Request and response bodies of the gateway, one set per API dialect it speaks.

Field names and defaults follow each original so that its clients work unchanged:
SGLang's /v1/rerank, text-embeddings-inference's /rerank, Cohere v2's (and Jina's) /v2/rerank.
Unknown fields are ignored, as those servers do, so extra options a client sends do no harm.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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
TopN = Annotated[int | None, Field(default=None, ge=1, description="return only the best top_n documents")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- SGLang: POST /v1/rerank ---------------------------------------------------------------------

class SGLangRerankRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [SEED_EXAMPLE]})

    query: Query
    documents: list[Text] = Field(min_length=1, description="the documents to rank")
    top_n: TopN = None
    return_documents: bool = Field(True, description="include each document's text in the answer")
    model: str | None = Field(None, description="accepted for compatibility; the served model answers")


class SGLangRerankItem(BaseModel):
    score: float = Field(description="the model's raw logit")
    document: str | None = Field(None, description="absent when return_documents is false")
    index: int = Field(description="position of the document in the request")
    meta_info: dict[str, Any] | None = Field(
        None, description="id, prompt_tokens (tokens of this query-document pair), completion_tokens, e2e_latency")


# --- text-embeddings-inference: POST /rerank ------------------------------------------------------

class TEIRerankRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]}]})

    query: Query
    texts: list[Text] = Field(min_length=1, description="the documents to rank")
    truncate: bool | None = Field(
        False, description="cut documents that do not fit the model; false/null refuses them with 400")
    truncation_direction: str = Field(
        "Right", description="only Right is supported: the end of the document is cut, never the query",
        json_schema_extra={"enum": ["Right", "Left", "right", "left"]})
    raw_scores: bool = Field(False, description="raw logits instead of sigmoid scores")
    return_text: bool = Field(False, description="include each document's text in the answer")

    @field_validator("truncation_direction")
    @classmethod
    def _right_only(cls, value: str) -> str:
        if value.lower() == "left":
            raise ValueError("only right truncation is supported (the end of the document is cut); "
                             "send truncation_direction 'Right' or leave it out")
        if value.lower() != "right":
            raise ValueError(f"must be 'Right' or 'Left', got {value!r}")
        return "Right"


class TEIRank(BaseModel):
    index: int
    text: str | None = Field(None, description="absent unless return_text")
    score: float = Field(description="sigmoid of the logit (0..1), or the raw logit when raw_scores")


# --- Cohere v2 / Jina: POST /v2/rerank -------------------------------------------------------------

class DocumentText(BaseModel):
    text: Text


class CohereRerankRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [SEED_EXAMPLE | {"top_n": 1}]})

    model: str | None = Field(None, description="accepted for compatibility; the served model answers")
    query: Query
    documents: list[Text | DocumentText] = Field(
        min_length=1, description="strings, or objects with a text field (Cohere v1 / Jina style)")
    top_n: TopN = None
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="accepted; documents are truncated to the server's max input length "
        "(triton-rerank serve --max-length), which this request cannot change")
    return_documents: bool = Field(False, description="include {document: {text}} in each result (Jina style)")

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class CohereResult(BaseModel):
    index: int
    relevance_score: float = Field(description="sigmoid of the logit, 0..1")
    document: DocumentText | None = Field(None, description="only when return_documents")


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class CohereApiVersion(BaseModel):
    version: str = "2"


class CohereMeta(BaseModel):
    api_version: CohereApiVersion = CohereApiVersion()
    tokens: CohereTokens


class Usage(BaseModel):
    total_tokens: int
    prompt_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    meta: CohereMeta
    usage: Usage = Field(description="Jina style; the same count as meta.tokens.input_tokens")


# --- the rest ---------------------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton-rerank"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    triton: str = Field(description="the Triton gRPC address the gateway forwards to")


class ErrorBody(BaseModel):
    """Errors of every route but /rerank (the shape of SGLang's and OpenAI's error responses)."""

    object: Literal["error"] = "error"
    message: str = Field(description="what was wrong, and how to fix it")
    type: str = Field(description="validation, invalid_request, unauthorized, payload_too_large, overloaded, "
                      "unavailable, timeout, backend, not_found, internal")
    code: int = Field(description="the HTTP status")


class TEIErrorBody(BaseModel):
    """Errors of /rerank (text-embeddings-inference's shape)."""

    error: str
    error_type: str
