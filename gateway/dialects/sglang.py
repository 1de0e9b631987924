"""SGLang's POST /v1/rerank (the seed): a bare list by descending raw logit, with SGLang's meta_info per pair.

For a decoder reranker (Qwen3-Reranker) the score is P(yes), and `instruct` sets the instruction, as
in SGLang.

SGLang has no truncation field: a document that does not fit is cut (or chunked, where the server's
default is chunk), never refused, unless the body asks otherwise with `long_documents`.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..dialect import Dialect, present
from ..ensemble import rerank
from ..protocol import SEED_EXAMPLE, Documents, Instruction, LongDocumentRequest, ModelName, Query, TopN


class SGLangRerankRequest(LongDocumentRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [SEED_EXAMPLE]})

    query: Query
    documents: Documents
    top_n: TopN = None
    return_documents: bool = Field(True, description="include each document's text in the answer")
    model: ModelName = None
    instruct: Instruction = None


class SGLangRerankItem(BaseModel):
    score: float = Field(description="the model's raw logit; for a decoder reranker (Qwen3-Reranker) P(yes), as "
                         "SGLang answers")
    document: str | None = Field(None, description="absent when return_documents is false")
    index: int = Field(description="position of the document in the request")
    meta_info: dict[str, Any] | None = Field(
        None, description="id, prompt_tokens (tokens of this query-document pair: of all its windows when it was "
        "chunked), completion_tokens, e2e_latency, chunks (windows of the document scored: 1 unless chunked)")


dialect = Dialect()


@dialect.post("/v1/rerank", summary="SGLang's rerank", response_model=list[SGLangRerankItem])
async def sglang_rerank(body: SGLangRerankRequest, request: Request):
    """Documents sorted by descending raw logit (ties keep input order), as SGLang's `/v1/rerank` answers; for a
    decoder reranker (Qwen3-Reranker) the score is P(yes) = sigmoid(logit(yes) - logit(no)), as SGLang's is."""
    decoder = await request.app.state.gateway.reranker_kind() == "decoder"
    ranking = await rerank(request, body.query, body.documents, truncate=body.ensemble_truncate(True),
                           top_n=body.top_n, return_documents=body.return_documents, normalize=decoder,
                           instruction=body.instruct, **body.long_document_options())
    request_id = f"rerank-{uuid.uuid4().hex}"
    # The fields of SGLang's per-pair meta_info that mean something here (finish_reason does not), and
    # the windows the document was scored as (its score is the best window's).
    return JSONResponse([
        present(score=r.score, document=r.document, index=r.index, meta_info={
            "id": f"{request_id}-{r.index}", "prompt_tokens": r.token_count, "completion_tokens": 0,
            "e2e_latency": ranking.seconds, "chunks": r.chunk_count})
        for r in ranking.results])
