"""The Python client of the `reranker` ensemble: what users import.

    from triton_rerank.client import RerankClient

Only tritonclient and numpy are imported here, never torch, the server or the gateway.
"""

from .errors import (
    InvalidRequestError,
    RerankError,
    RerankServerError,
    RerankTimeoutError,
    ServerUnavailableError,
)
from .ranking import RerankResult, ScoredDocuments
from .rerank_client import AsyncRerankClient, RerankClient

__all__ = [
    "AsyncRerankClient",
    "InvalidRequestError",
    "RerankClient",
    "RerankError",
    "RerankResult",
    "RerankServerError",
    "RerankTimeoutError",
    "ScoredDocuments",
    "ServerUnavailableError",
]
