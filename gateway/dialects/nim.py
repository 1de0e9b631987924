"""NVIDIA's reranking NIM, POST /v1/ranking: {rankings: [{index, logit}]} by descending raw logit.

Clients of NVIDIA NeMo Retriever reranking NIMs (langchain-nvidia-ai-endpoints, LlamaIndex's
NVIDIARerank, plain requests) send the query and the passages as {"text": ...} objects and read
raw logits. `truncate` is the NIM's: "END" cuts what does not fit, "NONE" (the default) refuses it;
a body that sends `long_documents` and no `truncate` gets that mode. The answer is the NIM's, which
has no usage field: the windows of chunked passages are not reported.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..dialect import Dialect
from ..ensemble import rerank
from ..protocol import SEED_EXAMPLE, LongDocumentRequest, ModelName, Query, Text


class NIMQuery(BaseModel):
    text: Query


class NIMPassage(BaseModel):
    text: Text


class NIMRankingRequest(LongDocumentRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": SEED_EXAMPLE["model"], "query": {"text": SEED_EXAMPLE["query"]},
        "passages": [{"text": d} for d in SEED_EXAMPLE["documents"]], "truncate": "END"}]})

    model: ModelName = None
    query: NIMQuery
    passages: list[NIMPassage] = Field(min_length=1, description="the passages to rank, each {\"text\": ...}")
    truncate: Literal["NONE", "END"] = Field(
        "NONE", description="END: cut the end of a passage that does not fit the model (or chunk it, where the "
        "server's default is chunk); NONE: refuse it (400). Left out with long_documents: long_documents decides")


class NIMRanking(BaseModel):
    index: int = Field(description="position of the passage in the request")
    logit: float = Field(description="the model's raw logit")


class NIMRankingResponse(BaseModel):
    rankings: list[NIMRanking]


dialect = Dialect()


@dialect.post("/v1/ranking", summary="NVIDIA reranking NIM", response_model=NIMRankingResponse)
async def nim_ranking(body: NIMRankingRequest, request: Request):
    """Every passage by descending raw logit (ties keep input order), as the NIM answers."""
    ranking = await rerank(request, body.query.text, [p.text for p in body.passages],
                           truncate=body.ensemble_truncate(body.truncate == "END", "truncate"), return_documents=False,
                           **body.long_document_options())
    return JSONResponse({"rankings": [{"index": r.index, "logit": r.score} for r in ranking.results]})
