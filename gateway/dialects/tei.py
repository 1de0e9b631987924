"""text-embeddings-inference's POST /rerank: a bare list of {index, score, text?}, sigmoid unless raw_scores.

Its errors have TEI's shape, {"error", "error_type"}, which TEI's clients read. Usage goes in
response headers, as TEI sends it: x-compute-tokens (every pair scored), x-total-time (ms), and
x-compute-chunks (windows scored; the long-document extension).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..dialect import Dialect, present
from ..ensemble import rerank
from ..errors import GatewayError
from ..protocol import Documents, Instruction, LongDocumentRequest, Query


class TEIRerankRequest(LongDocumentRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]}]})

    query: Query
    texts: Documents
    truncate: bool | None = Field(
        False, description="true: do not refuse documents that do not fit the model (cut them, or chunk them where "
        "the server's default is chunk); false/null refuses them with 400. Left out with long_documents: "
        "long_documents decides")
    truncation_direction: str = Field(
        "Right", description="with truncate: Right cuts the end of a document that does not fit, Left its "
        "start (the end is kept); never the query", json_schema_extra={"enum": ["Right", "Left", "right", "left"]})
    raw_scores: bool = Field(False, description="raw logits instead of sigmoid scores")
    return_text: bool = Field(False, description="include each document's text in the answer")
    instruction: Instruction = None

    @field_validator("truncation_direction")
    @classmethod
    def _right_or_left(cls, value: str) -> str:
        if value.lower() not in ("right", "left"):
            raise ValueError(f"must be 'Right' or 'Left', got {value!r}")
        return value.capitalize()


class TEIRank(BaseModel):
    index: int
    text: str | None = Field(None, description="absent unless return_text")
    score: float = Field(description="sigmoid of the logit (0..1), or the raw logit when raw_scores")


class TEIErrorBody(BaseModel):
    """Errors of /rerank (text-embeddings-inference's shape)."""

    error: str
    error_type: str

    @classmethod
    def of(cls, error: GatewayError) -> dict:
        return {"error": error.message, "error_type": error.kind}


dialect = Dialect(TEIErrorBody)


@dialect.post("/rerank", summary="text-embeddings-inference's rerank", response_model=list[TEIRank])
async def tei_rerank(body: TEIRerankRequest, request: Request):
    """Documents sorted by descending score: sigmoid of the logit, or the raw logit with `raw_scores`."""
    truncate = body.ensemble_truncate(bool(body.truncate), "truncate")
    ranking = await rerank(request, body.query, body.texts, truncate=truncate,
                           truncation_direction=body.truncation_direction.lower(),
                           return_documents=body.return_text, normalize=not body.raw_scores,
                           instruction=body.instruction, **body.long_document_options())
    usage = {"x-compute-tokens": str(ranking.total_tokens), "x-compute-chunks": str(ranking.total_chunks),
             "x-total-time": str(round(ranking.seconds * 1000))}
    return JSONResponse([present(index=r.index, text=r.document, score=r.score) for r in ranking.results],
                        headers=usage)
