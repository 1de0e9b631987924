"""What the dialects' request bodies share: checked text fields, top_n, and the seed example.

Each dialect's own bodies are in its module (dialects/sglang.py, tei.py, cohere.py), with field
names and defaults as in the original, so that its clients work unchanged. Unknown fields are
ignored, as those servers do, so extra options a client sends do no harm.
"""

from __future__ import annotations

from typing import Annotated

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


class RerankRequest(BaseModel):
    """Base of the dialects' request bodies: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
