"""vLLM's POST /score and /v1/score: one score per (text_1, text_2) pair, in input order.

The forms vLLM documents for cross-encoders:

    text_1 "q",        text_2 "d"              1:1, one score
    text_1 "q" / ["q"], text_2 ["d1", ...]     1:N, the query against every text
    text_1 ["q1", ...], text_2 ["d1", ...]     N:N, pairs by position (the same length)

Scores are the sigmoid of the logit (vLLM's default activation for a 1-label classifier), or the
raw logit with `use_activation: false`. A pair that does not fit the model is refused (400), as
vLLM does, unless `truncate_prompt_tokens: -1` (the model's own limit), or the body sends
`long_documents` (and no truncate_prompt_tokens). The pairs of one query go to the ensemble as one
request; N:N pairs with different queries, as one request per query. `usage.chunks` counts the
(query, window) pairs scored: one per pair, plus the extra windows of chunked texts.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...client.ranking import sigmoid
from ..dialect import Dialect
from ..ensemble import GatewayState, score_options
from ..errors import GatewayError
from ..protocol import SEED_EXAMPLE, LongDocumentRequest, ModelName, Query, Text


class VLLMScoreRequest(LongDocumentRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": SEED_EXAMPLE["model"], "text_1": SEED_EXAMPLE["query"], "text_2": SEED_EXAMPLE["documents"]}]})

    model: ModelName = None
    text_1: Query | list[Query] = Field(description="the query, or one query per text_2 entry (N:N)")
    text_2: Text | list[Text] = Field(description="the text to score, or a list of them")
    use_activation: bool = Field(True, description="sigmoid of the logit (0..1); false: the raw logit")
    truncate_prompt_tokens: int | None = Field(
        None, description="-1: do not refuse pairs that do not fit the model: cut them to its max input (or chunk "
        "them, where the server's default is chunk); absent: refuse them (400), unless long_documents says")

    @model_validator(mode="after")
    def _forms(self) -> VLLMScoreRequest:
        queries = self.text_1 if isinstance(self.text_1, list) else [self.text_1]
        texts = self.text_2 if isinstance(self.text_2, list) else [self.text_2]
        if not queries or not texts:
            raise ValueError("text_1 and text_2 must each hold at least one text")
        if len(queries) > 1 and len(queries) != len(texts):
            raise ValueError(f"text_1 holds {len(queries)} texts and text_2 {len(texts)}: send one text_1, "
                             "or as many as text_2 (scored pair by pair)")
        if self.truncate_prompt_tokens not in (None, -1):
            raise ValueError("truncate_prompt_tokens: only -1 (the model's max input) is supported; leave it "
                             "out to have pairs that do not fit refused")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        texts = self.text_2 if isinstance(self.text_2, list) else [self.text_2]
        queries = self.text_1 if isinstance(self.text_1, list) else [self.text_1]
        return list(zip(queries * len(texts) if len(queries) == 1 else queries, texts, strict=True))


class VLLMScore(BaseModel):
    index: int
    object: str = "score"
    score: float = Field(description="sigmoid of the logit (0..1), or the raw logit without use_activation")


class VLLMUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    chunks: int = Field(description="(query, window) pairs scored: one per pair, plus the extra windows of texts "
                        "scored in chunks (long_documents=chunk)")


class VLLMScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[VLLMScore]
    usage: VLLMUsage


dialect = Dialect()


# Registered bottom up: /score first.
@dialect.post("/v1/score", summary="vLLM's score (OpenAI-style path)", response_model=VLLMScoreResponse)
@dialect.post("/score", summary="vLLM's score", response_model=VLLMScoreResponse)
async def vllm_score(body: VLLMScoreRequest, request: Request):
    """One score per pair, in input order."""
    gateway: GatewayState = request.app.state.gateway
    pairs = body.pairs()
    if len(pairs) > gateway.settings.max_documents:
        raise GatewayError(413, f"{len(pairs)} pairs in one request; the limit is {gateway.settings.max_documents} "
                           "(--max-documents): split them over several requests", "payload_too_large")
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)
    route = request.scope["route"].path
    options = score_options(body.ensemble_truncate(body.truncate_prompt_tokens == -1, "truncate_prompt_tokens"),
                            **body.long_document_options())
    answers = await asyncio.gather(*(gateway.score(route, query, [pairs[i][1] for i in indices], options)
                                     for query, indices in by_query.items()))
    logits = np.zeros(len(pairs), dtype=np.float32)
    tokens = chunks = 0
    for indices, scored in zip(by_query.values(), answers, strict=True):
        logits[indices] = scored.scores
        tokens += scored.total_tokens
        chunks += scored.total_chunks
    scores = sigmoid(logits) if body.use_activation else logits.astype(np.float64)
    return JSONResponse({
        "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
        "model": body.model or gateway.settings.served_model_name,
        "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "chunks": chunks},
    })
