"""What each dialect module builds on: its router, set up the same way for every rerank route.

A dialect (dialects/<name>.py) is its request and response bodies plus one thin route that maps
the request onto `ensemble.rerank` and the ranking back onto its own field names:

    dialect = Dialect()                      # or Dialect(TEIErrorBody): its own error shape

    @dialect.post("/v1/rerank", summary="...", response_model=list[Item])
    async def route(body: MyRequest, request: Request):
        ranking = await rerank(request, body.query, body.documents, top_n=body.top_n)
        return JSONResponse([present(score=r.score, index=r.index) for r in ranking.results])

and its name in dialects/__init__.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from .errors import ErrorBody, ErrorShape, error_responses
from .limits import require_api_key


class Dialect:
    """One HTTP dialect: its routes, and the body shape of the errors answered on them.

    Every route requires the API key (when the gateway has one), is tagged "rerank" in the
    OpenAPI schema and documents the refusals (400, 401, 413, 422, 429, 503) in the error shape.
    """

    def __init__(self, error_shape: type[ErrorShape] = ErrorBody):
        self.error_shape = error_shape
        self.router = APIRouter(tags=["rerank"], dependencies=[Depends(require_api_key)],
                                responses=error_responses(error_shape))

    def post(self, path: str, **options: Any):
        """Decorates a route, as FastAPI's APIRouter.post does."""
        return self.router.post(path, **options)

    @property
    def paths(self) -> list[str]:
        return [route.path for route in self.router.routes]


def present(**fields: Any) -> dict[str, Any]:
    """The fields that have a value, in the order given: an optional field not asked for is left out, not null."""
    return {name: value for name, value in fields.items() if value is not None}
