"""The gateway's settings (command.py fills them for `triton-rerank api` and `serve`), and its start error.

Light to import (no FastAPI, no uvicorn): the command line and the launcher use both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GatewaySettings:
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str = "reranker"  # what /v1/models lists
    max_documents: int = 1000  # per request; more -> 413
    max_body_bytes: int = 16 * 1024 * 1024  # more -> 413
    max_concurrency: int = 64  # requests in Triton at once
    max_queue: int = 256  # requests waiting for a slot; more -> 429
    request_timeout: float = 300.0  # seconds for one call to Triton; more -> 504
    log_level: str = "info"


class GatewayStartError(RuntimeError):
    """The gateway could not start (its port is taken, most often)."""
