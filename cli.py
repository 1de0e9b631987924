"""`triton-rerank`: serve a reranker on Triton, and the tools around it.

One console script; every subcommand lives in the room of the code it runs and registers itself
the same way, with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse

from .bench import command as bench_command
from .bench import cpu_matmul as cpu_matmul_bench
from .bench import decoder_reranker as decoder_bench
from .bench import long_documents as long_documents_bench
from .bench import prefix_threshold as prefix_threshold_bench
from .bench import random_model
from .client import rerank_command
from .gateway import command as api_command
from .launcher import serve as serve_command

COMMANDS = (serve_command, api_command, rerank_command, random_model, bench_command, long_documents_bench,
            decoder_bench, prefix_threshold_bench, cpu_matmul_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-rerank",
        description="Reranking (cross-encoders such as BAAI/bge-reranker-v2-m3) on NVIDIA Triton Inference Server.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
