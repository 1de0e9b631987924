"""Cohere v2's (and Jina's) POST /v2/rerank: {id, results: [{index, relevance_score}], meta, usage}.

Cohere never refuses a long document: it is cut (or chunked, where the server's default is chunk),
unless the body asks otherwise with `long_documents`. `max_tokens_per_doc` cuts every document, so
it asks the ensemble for truncation even where the server's default is chunk.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..dialect import Dialect, present
from ..ensemble import rerank
from ..protocol import SEED_EXAMPLE, Instruction, LongDocumentRequest, ModelName, Query, Text, TopN


class DocumentText(BaseModel):
    text: Text


class CohereRerankRequest(LongDocumentRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [SEED_EXAMPLE | {"top_n": 1}]})

    model: ModelName = None
    query: Query
    documents: list[Text | DocumentText] = Field(
        min_length=1, description="strings, or objects with a text field (Cohere v1 / Jina style)")
    top_n: TopN = None
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="keep at most this many tokens of each document (its start); a document is "
        "also cut to fit the model's max input (triton-rerank serve --max-length); not with long_documents=chunk")
    return_documents: bool = Field(False, description="include {document: {text}} in each result (Jina style)")
    instruction: Instruction = None

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def score_options(self) -> dict:
        """rerank()'s truncate and long-document keywords for this body."""
        options = {"truncate": self.ensemble_truncate(True), "max_tokens_per_doc": self.max_tokens_per_doc,
                   "instruction": self.instruction, **self.long_document_options()}
        if self.max_tokens_per_doc is not None and self.long_documents is None:
            # The ensemble takes max_tokens_per_doc only when it truncates: say so, whatever its default.
            options["long_documents"] = "truncate"
        return options


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
    chunks: int = Field(description="(query, window) pairs scored: one per document, plus the extra windows of "
                        "documents scored in chunks (long_documents=chunk)")


class Usage(BaseModel):
    total_tokens: int
    prompt_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    meta: CohereMeta
    usage: Usage = Field(description="Jina style; the same count as meta.tokens.input_tokens")


dialect = Dialect()


@dialect.post("/v2/rerank", summary="Cohere v2 / Jina rerank", response_model=CohereRerankResponse)
async def cohere_rerank(body: CohereRerankRequest, request: Request):
    """Results sorted by descending relevance_score (sigmoid of the logit, 0..1), with token usage."""
    ranking = await rerank(request, body.query, body.document_texts(), top_n=body.top_n, normalize=True,
                           **body.score_options())
    tokens = ranking.total_tokens  # every document's, not only the top_n returned
    return JSONResponse({
        "id": str(uuid.uuid4()),
        "model": body.model or request.app.state.gateway.settings.served_model_name,
        "results": [present(index=r.index, relevance_score=r.score,
                            document={"text": r.document} if body.return_documents else None)
                    for r in ranking.results],
        "meta": {"api_version": {"version": "2"}, "tokens": {"input_tokens": tokens, "output_tokens": 0},
                 "chunks": ranking.total_chunks},
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
    })
