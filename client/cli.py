"""`triton-rerank`: serve a cross-encoder reranker on Triton, and the tools around it."""

from __future__ import annotations

import argparse
import os
import sys

from triton_rerank.client import serve as serve_command

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"
API_KEY_ENV = "TRITON_RERANK_API_KEY"


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start tritonserver with the reranker ensemble, and the HTTP rerank gateway",
        description="Resolve the model (local directory or Hugging Face id), render a run copy of the model "
        "repository with its parameters, start the bundled tritonserver and wait until it is ready, then start "
        "the HTTP gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank) on --api-port unless --no-api. "
        "Ctrl-C or SIGTERM stops the gateway, the server and every backend process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", default=DEFAULT_MODEL, help="model directory or Hugging Face repo id")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the cross-encoder runs; auto = GPU when Triton sees one")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="cross-encoder precision; auto = float16 on GPU, float32 on CPU")
    p.add_argument("--attention-backend", choices=["triton", "sdpa"], default=None,
                   help="attention of the packed encoder; default triton on GPU, sdpa on CPU")
    p.add_argument("--engine", choices=["packed", "hf"], default="packed",
                   help="packed = our unpadded encoder; hf = transformers reference (padded)")
    p.add_argument("--max-length", type=int, default=0,
                   help="max tokens of a (query, document) pair; 0 = the model's limit")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="token budget of one encoder forward; 0 = 4096 on CPU, 16384 on GPU")
    p.add_argument("--instances", type=int, default=1, help="cross_encoder model instances")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads per CPU instance; 0 = torch default")
    p.add_argument("--host", default="127.0.0.1", help="address every listener binds (0.0.0.0 to expose)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--run-dir", default=None, help="where the rendered model repository and logs go; "
                   "default a temporary directory removed at exit")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    g = p.add_argument_group("HTTP gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank)")
    g.add_argument("--api-port", type=int, default=30000, help="port of the gateway")
    g.add_argument("--api-host", default=None, help="address the gateway binds; default --host")
    g.add_argument("--no-api", action="store_true", help="start tritonserver only, no gateway")
    _add_gateway_options(g)
    p.set_defaults(func=serve_command.run)


def _add_gateway_options(p) -> None:
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
    p.add_argument("--max-concurrency", type=int, default=64, help="requests forwarded to Triton at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot; beyond that the answer is 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one call to Triton may take (504 after that)")


def _add_api(subparsers) -> None:
    p = subparsers.add_parser(
        "api",
        help="serve the HTTP rerank APIs (SGLang, TEI, Cohere) in front of a running Triton",
        description="An HTTP gateway (FastAPI + uvicorn) that speaks SGLang's POST /v1/rerank, "
        "text-embeddings-inference's POST /rerank and Cohere's / Jina's POST /v2/rerank, with GET /health, "
        "/v1/models, /metrics and the OpenAPI schema at /openapi.json (/docs). It forwards to the "
        "`reranker` ensemble over gRPC. `serve` starts one by default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC address")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway binds (0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_gateway_options(p)

    def run(args) -> int:
        from triton_rerank.client.gateway_server import run_gateway

        return run_gateway(gateway_settings(args, args.triton_url, args.host, args.port, args.log_level,
                                            default_model_name="reranker"))

    p.set_defaults(func=run)


def gateway_settings(args, triton_url: str, host: str, port: int, log_level: str, default_model_name: str):
    from triton_rerank.client.gateway import GatewaySettings

    return GatewaySettings(
        triton_url=triton_url, host=host, port=port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name or default_model_name, max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
        request_timeout=args.request_timeout, log_level=log_level,
    )


def _add_rerank(subparsers) -> None:
    p = subparsers.add_parser(
        "rerank",
        help="rank documents against a query on a running server",
        description="Sends the query and documents to the `reranker` ensemble (gRPC or HTTP) and prints the "
        "documents by descending score: a table, or JSON with --json. Long lists are split into several "
        "requests and merged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("documents", nargs="*", metavar="DOC", help="the documents (or use --documents-file)")
    p.add_argument("--query", required=True)
    p.add_argument("--documents-file", default=None,
                   help="a JSON array of strings, or one document per line; '-' reads stdin")
    p.add_argument("--url", default=None, help="Triton's address; default 127.0.0.1:8001 (grpc) or :8000 (http)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--top-n", type=int, default=None, help="print only the best N")
    p.add_argument("--normalize", action="store_true", help="sigmoid scores (0..1) instead of raw logits")
    p.add_argument("--no-truncate", action="store_true", help="refuse too-long documents instead of cutting them")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print JSON: [{index, score, document, token_count}, ...]")

    def run(args) -> int:
        from triton_rerank.client import rerank_command

        return rerank_command.run(args)

    p.set_defaults(func=run)


def _add_make_test_model(subparsers) -> None:
    p = subparsers.add_parser(
        "make-test-model",
        help="write a tiny random-weight cross-encoder with a trained tokenizer",
        description="Writes a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
        "of a small random-weight 1-label classifier, for tests and offline demos. Its scores carry no "
        "meaning as relevance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--arch", choices=["xlm-roberta", "bert"], default="xlm-roberta")
    p.add_argument("--hidden-size", type=int, default=64, help="hidden size; head size = hidden / heads must be 32-128 for the triton attention kernel")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        from triton_rerank.client.tiny_model import make_test_model

        out = make_test_model(args.out, args.arch, hidden_size=args.hidden_size, layers=args.layers,
                              heads=args.heads, seed=args.seed)
        print(f"wrote a random-weight {args.arch} cross-encoder to {out}")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-rerank",
        description="Cross-encoder reranking on NVIDIA Triton Inference Server.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(subparsers)
    _add_api(subparsers)
    _add_rerank(subparsers)
    _add_make_test_model(subparsers)
    from triton_rerank.client import bench

    bench.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
