"""triton_rerank.client: the Python client, the HTTP gateway, the CLI and the launcher.

`from triton_rerank.client import RerankClient` (and the names below) import lazily, so that the
CLI and the launcher do not pay for tritonclient and FastAPI when they do not use them.
"""

from importlib import import_module

_EXPORTS = {
    "RerankClient": "rerank_client",
    "AsyncRerankClient": "rerank_client",
    "RerankResult": "ranking",
    "ScoredDocuments": "ranking",
    "RerankError": "errors",
    "InvalidRequestError": "errors",
    "ServerUnavailableError": "errors",
    "RerankTimeoutError": "errors",
    "RerankServerError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
