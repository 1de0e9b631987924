"""`triton-rerank rerank`: rank documents against a query on a running server, as a table or JSON."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from triton_rerank.client.errors import InvalidRequestError, RerankError
from triton_rerank.client.ranking import RerankResult
from triton_rerank.client.rerank_client import RerankClient
from triton_rerank.client.triton_io import DEFAULT_PORTS


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
                                    truncate=not args.no_truncate)
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
