"""`triton-rerank`: serve a cross-encoder reranker on Triton, and the tools around it."""

from __future__ import annotations

import argparse
import sys

from triton_rerank.client import serve as serve_command

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start tritonserver with the reranker ensemble",
        description="Resolve the model (local directory or Hugging Face id), render a run copy of the model "
        "repository with its parameters, start the bundled tritonserver and wait until it is ready. "
        "Ctrl-C or SIGTERM stops the server and every backend process.",
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
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one encoder forward")
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
    p.set_defaults(func=serve_command.run)


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
    _add_make_test_model(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
