"""`triton-rerank rerank`: rank documents against a query on a running server, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import InvalidRequestError, RerankError
from .ranking import RerankResult
from .rerank_client import RerankClient
from .triton_io import DEFAULT_PORTS


def read_documents_file(path: str) -> list[str]:
    """A JSON array of strings, or else one document per line (blank lines skipped); '-' is stdin."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            documents = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{path} starts with '[' but is not a JSON array: {error}") from None
        if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
            raise InvalidRequestError(f"{path}: the JSON array must hold strings only")
        return documents
    return [line for line in text.splitlines() if line.strip()]


def format_table(results: list[RerankResult], width: int | None = None) -> str:
    """Rank, index, score, tokens and the document's start, fitted to the terminal's width."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    header = f"{'rank':>4}  {'index':>5}  {'score':>10}  {'tokens':>6}  document"
    room = max(20, width - len(header) + len("document"))
    lines = [header]
    for position, r in enumerate(results, start=1):
        document = " ".join((r.document or "").split())
        if len(document) > room:
            document = document[: room - 3] + "..."
        lines.append(f"{position:>4}  {r.index:>5}  {r.score:>+10.4f}  {r.token_count:>6}  {document}")
    return "\n".join(lines)


def score_options(args) -> dict:
    """The ScoreOptions fields the flags set; what is not set is left to the server's defaults."""
    options = {"truncate": False if args.no_truncate else None, "long_documents": args.long_documents,
               "chunk_overlap": args.chunk_overlap, "max_chunks_per_doc": args.max_chunks_per_doc,
               "instruction": args.instruction}
    if args.truncation_direction != "right":
        options["truncation_direction"] = args.truncation_direction
    return options


def run(args) -> int:
    if bool(args.documents_file) == bool(args.documents):
        print("error: give the documents either as arguments or with --documents-file, not both or neither",
              file=sys.stderr)
        return 2
    url = args.url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"
    try:
        documents = read_documents_file(args.documents_file) if args.documents_file else list(args.documents)
        with RerankClient(url, args.protocol, timeout=args.timeout) as client:
            results = client.rerank(args.query, documents, top_n=args.top_n, normalize=args.normalize,
                                    **score_options(args))
    except RerankError as error:  # before OSError: ServerUnavailableError is a ConnectionError
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, InvalidRequestError) else 1
    except OSError as error:  # the documents file
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in results], ensure_ascii=False, indent=2))
    else:
        print(format_table(results))
    return 0


def register(subparsers) -> None:
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
    p.add_argument("--long-documents", choices=["truncate", "chunk", "error"], default=None,
                   help="a document longer than the model's window: cut it, score its overlapping windows and keep "
                        "the best (chunk), or refuse it; default: the server's (serve --long-documents)")
    p.add_argument("--chunk-overlap", type=int, default=None, help="tokens neighbouring windows share (server: 32)")
    p.add_argument("--max-chunks-per-doc", type=int, default=None,
                   help="most windows of one document; default the server's (serve --max-chunks-per-doc)")
    p.add_argument("--truncation-direction", choices=["right", "left"], default="right",
                   help="which end of a too-long document is cut (left keeps its end)")
    p.add_argument("--instruction", default=None,
                   help="decoder rerankers (Qwen3-Reranker): the task relevance is judged for; default the server's")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--json", action="store_true",
                   help="print JSON: [{index, score, document, token_count, chunk_count}, ...]")

    p.set_defaults(func=run)
