"""`triton-rerank api`: the gateway's command line, and the gateway options `serve` shares with it.

Nothing heavy is imported at module level: building the CLI's parser must not load FastAPI.
"""

from __future__ import annotations

import argparse
import os
import sys

from .settings import BUFFERED_BODIES, GatewaySettings, GatewayStartError, default_allowed_hosts

__all__ = ["API_KEY_ENV", "add_gateway_options", "gateway_settings", "register"]

API_KEY_ENV = "TRITON_RERANK_API_KEY"


def add_gateway_options(p) -> None:
    """Options of the gateway, the same for `serve` and `api`."""
    # Read from the environment at run time, not as the argparse default: --help prints defaults.
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the rerank routes and /v1/models; "
                   f"when not given, ${API_KEY_ENV} (safer than the command line, which `ps` shows)")
    p.add_argument("--served-model-name", default=None,
                   help="model name /v1/models lists and answers carry; default --model-path (serve) or 'reranker'")
    p.add_argument("--max-documents", type=int, default=1000, help="documents per request; more is refused (413)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="request body size; more is refused (413)")
    p.add_argument("--max-buffered-bytes", type=int, default=None,
                   help="request bodies held at once over all connections (each until its request is answered; a "
                   "Content-Length counts whole from the head on); a body that would pass it is refused (503, "
                   f"Retry-After). Default {BUFFERED_BODIES} times "
                   "--max-body-bytes (64 MiB). The process holds a few times this (parsed documents, gRPC messages)")
    p.add_argument("--max-body-chunks", type=int, default=65536,
                   help="chunks of one chunked (Transfer-Encoding) body, as tritonserver allows; more is refused (400)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a whole request body; slower is refused (408)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds from a request's first byte to the end of its headers; slower: connection closed")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds a connection may stay without a request (new, or after an answer) before it is "
                   "closed; behind a load balancer that keeps connections open, set it above the balancer's idle "
                   "timeout (nginx upstream keepalive_timeout: 60 s)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections (idle ones included) or requests at once; beyond it every request "
                   "is refused (503, plain text, from uvicorn)")
    p.add_argument("--max-header-bytes", type=int, default=16 * 1024,
                   help="request line and headers of one request; more is refused (400, plain text, from uvicorn)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values answered ('example.com', '*.example.com', '*' for "
                   "any); others are refused (400). Default: the bound address and localhost, 127.0.0.1, [::1]; "
                   "any host when bound to 0.0.0.0 or ::")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests forwarded to Triton at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot; beyond that the answer is 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one call to Triton may take (504 after that)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "api",
        help="serve the HTTP rerank APIs (SGLang, TEI, Cohere, NIM, vLLM) in front of a running Triton",
        description="An HTTP gateway (FastAPI + uvicorn) that speaks SGLang's POST /v1/rerank, "
        "text-embeddings-inference's POST /rerank, Cohere's / Jina's POST /v2/rerank, NVIDIA's reranking NIM's "
        "POST /v1/ranking and vLLM's POST /score (/v1/score), with GET /health, "
        "/v1/models, /metrics and the OpenAPI schema at /openapi.json (/docs). It forwards to the "
        "`reranker` ensemble over gRPC. `serve` starts one by default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--triton-url", default="127.0.0.1:8001",
                   help="Triton's gRPC address: HOST:PORT, or a gRPC target naming several servers, each call "
                   "going to the next (dns:///NAME:PORT for every address of a DNS name, e.g. a Kubernetes "
                   "headless Service; ipv4:ADDR:PORT,ADDR:PORT)")
    p.add_argument("--triton-channel-max-age", type=float, default=None,
                   help="seconds after which calls go over a new gRPC channel, resolving --triton-url again, so "
                   "that servers added behind its DNS name get requests; default: one channel for good")
    p.add_argument("--triton-http-url", default=None,
                   help="Triton's HTTP address (e.g. 127.0.0.1:8000): with it the gateway also answers KServe v2 "
                   "health and metadata (GET /v2/health/*, /v2, /v2/models/NAME[/ready]) by asking it, so "
                   "that tritonclient.http needs no other door to Triton")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway binds (0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_gateway_options(p)

    def run(args) -> int:
        from .server import run_gateway

        try:
            settings = gateway_settings(args, args.triton_url, args.host, args.port, args.log_level,
                                        default_model_name="reranker", triton_http_url=args.triton_http_url,
                                        triton_channel_max_age=args.triton_channel_max_age)
        except GatewayStartError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return run_gateway(settings)

    p.set_defaults(func=run)


def gateway_settings(args, triton_url: str, host: str, port: int, log_level: str, default_model_name: str,
                     triton_http_url: str | None = None, kserve_port: int | None = None,
                     triton_channel_max_age: float | None = None) -> GatewaySettings:
    """The settings the options give; GatewayStartError (naming the options) when they do not fit together."""
    if args.allowed_hosts is None:
        allowed_hosts = default_allowed_hosts(host)
    else:
        allowed_hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    return GatewaySettings(
        triton_url=triton_url, triton_http_url=triton_http_url, triton_channel_max_age=triton_channel_max_age,
        host=host, port=port, kserve_port=kserve_port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name or default_model_name, max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes, max_buffered_bytes=args.max_buffered_bytes,
        max_body_chunks=args.max_body_chunks, body_timeout=args.body_timeout, header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
        max_header_bytes=args.max_header_bytes, allowed_hosts=allowed_hosts,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue,
        request_timeout=args.request_timeout, log_level=log_level,
    )
