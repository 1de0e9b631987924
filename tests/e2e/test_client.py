"""triton_rerank.client against a real tritonserver: sync and asyncio, HTTP and gRPC, splitting, errors, CLI."""

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from triton_rerank.client import (
    AsyncRerankClient,
    InvalidRequestError,
    RerankClient,
    ServerUnavailableError,
)
from triton_rerank.launcher.server import free_ports

QUERY = "what is panda?"
DOCUMENTS = [
    "hi",
    "The giant panda is a bear native to south central China.",
    "panda panda panda",
    "A search engine ranks documents by relevance to the query with a neural network model.",
]


@pytest.fixture(scope="module")
def xlmr(server_pool):
    return server_pool.get("xlm-roberta")


def url_of(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


def ensemble_scores(server, query, documents):
    q = grpcclient.InferInput("QUERY", [1], "BYTES")
    q.set_data_from_numpy(np.array([query.encode()], dtype=object))
    d = grpcclient.InferInput("DOCUMENTS", [len(documents)], "BYTES")
    d.set_data_from_numpy(np.array([x.encode() for x in documents], dtype=object))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("reranker", [q, d])
    return result.as_numpy("SCORES").reshape(-1), result.as_numpy("TOKEN_COUNTS").reshape(-1)


def rerank_with(server, protocol, use_async, *args, **kwargs):
    if use_async:
        async def go():
            async with AsyncRerankClient(url_of(server, protocol), protocol) as client:
                return await client.rerank(*args, **kwargs)
        return asyncio.run(go())
    with RerankClient(url_of(server, protocol), protocol) as client:
        return client.rerank(*args, **kwargs)


PATHS = [("grpc", False), ("http", False), ("grpc", True), ("http", True)]


def test_sync_async_http_grpc_agree_with_the_ensemble(xlmr):
    scores, tokens = ensemble_scores(xlmr, QUERY, DOCUMENTS)
    order = np.argsort(-scores, kind="stable").tolist()
    for protocol, use_async in PATHS:
        results = rerank_with(xlmr, protocol, use_async, QUERY, DOCUMENTS)
        assert [r.index for r in results] == order, (protocol, use_async)
        assert [r.document for r in results] == [DOCUMENTS[i] for i in order]
        assert [r.token_count for r in results] == [int(tokens[i]) for i in order]
        np.testing.assert_allclose([r.score for r in results], scores[order], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("protocol", "use_async"), PATHS)
def test_top_n_normalize_and_return_documents(xlmr, protocol, use_async):
    scores, _ = ensemble_scores(xlmr, QUERY, DOCUMENTS)
    results = rerank_with(xlmr, protocol, use_async, QUERY, DOCUMENTS, top_n=2, normalize=True,
                          return_documents=False)
    best = np.argsort(-scores, kind="stable")[:2]
    assert [r.index for r in results] == best.tolist() and all(r.document is None for r in results)
    np.testing.assert_allclose([r.score for r in results], 1 / (1 + np.exp(-scores[best].astype(np.float64))),
                               atol=1e-6)


@pytest.mark.parametrize("use_async", [False, True])
def test_a_long_list_is_split_sent_concurrently_and_merged_in_order(xlmr, use_async):
    documents = [f"document {i} about " + "bamboo panda forest "[: 5 + 3 * (i % 5)] * (1 + i % 4) for i in range(40)]
    expected, tokens = ensemble_scores(xlmr, QUERY, documents)
    options = {"max_documents_per_request": 7, "max_concurrency": 4}
    if use_async:
        async def go():
            async with AsyncRerankClient(xlmr.grpc_url, **options) as client:
                return await client.score(QUERY, documents), await client.rerank(QUERY, documents)
        scored, results = asyncio.run(go())
    else:
        with RerankClient(xlmr.grpc_url, **options) as client:
            scored, results = client.score(QUERY, documents), client.rerank(QUERY, documents)
    np.testing.assert_array_equal(scored.token_counts, tokens)
    np.testing.assert_allclose(scored.scores, expected, atol=1e-4, rtol=0)
    assert sorted(r.index for r in results) == list(range(40))
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_errors_say_what_went_wrong_with_the_callers_index(xlmr):
    documents = [f"short {i}" for i in range(9)] + ["panda " * 2000]
    with RerankClient(xlmr.grpc_url, max_documents_per_request=4) as client:
        with pytest.raises(InvalidRequestError, match=r"document 9 makes a pair of \d+ tokens"):
            client.rerank(QUERY, documents, truncate=False)
        with pytest.raises(InvalidRequestError, match="QUERY is empty"):
            client.rerank("  ", ["a"])
        with pytest.raises(InvalidRequestError, match="not one string"):
            client.rerank(QUERY, "one document")
        with pytest.raises(InvalidRequestError, match="top_n"):
            client.rerank(QUERY, ["a"], top_n=0)
        assert client.rerank(QUERY, documents)[0].index in range(10)  # truncate=True (default) scores it


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unavailable_is_retried_with_backoff_then_raised(protocol):
    (port,) = free_ports(1)  # nothing listens there
    started = time.monotonic()
    with RerankClient(f"127.0.0.1:{port}", protocol, retries=2, backoff=0.1) as client:
        assert not client.is_ready()
        with pytest.raises(ServerUnavailableError, match="gave up after 3 attempts"):
            client.rerank(QUERY, ["a"])
    assert time.monotonic() - started >= 0.2  # two backoff sleeps of ~0.1 and ~0.2 s

    async def go():
        async with AsyncRerankClient(f"127.0.0.1:{port}", protocol, retries=1, backoff=0.05) as client:
            assert not await client.is_ready()
            with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
                await client.rerank(QUERY, ["a"])

    asyncio.run(go())


def test_is_ready(xlmr):
    with RerankClient(xlmr.http_url, "http") as client:
        assert client.is_ready()


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "triton_rerank", "rerank", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_a_ranked_table_and_json(xlmr, tmp_path):
    scores, _ = ensemble_scores(xlmr, QUERY, DOCUMENTS)
    order = np.argsort(-scores, kind="stable").tolist()
    table = cli("--url", xlmr.grpc_url, "--query", QUERY, *DOCUMENTS)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["rank", "index", "score", "tokens", "document"]
    assert [int(row.split()[1]) for row in rows[1:]] == order

    (tmp_path / "docs.txt").write_text("\n".join(DOCUMENTS) + "\n")
    as_json = cli("--protocol", "http", "--url", xlmr.http_url, "--query", QUERY, "--documents-file",
                  str(tmp_path / "docs.txt"), "--json", "--top-n", "2", "--normalize")
    assert as_json.returncode == 0, as_json.stderr
    results = json.loads(as_json.stdout)
    assert [r["index"] for r in results] == order[:2]
    assert set(results[0]) == {"index", "score", "document", "token_count", "chunk_count"}
    assert 0 < results[0]["score"] < 1

    from_stdin = cli("--url", xlmr.grpc_url, "--query", QUERY, "--documents-file", "-", "--json",
                     stdin=json.dumps(DOCUMENTS))
    assert [r["index"] for r in json.loads(from_stdin.stdout)] == order


def test_cli_errors(xlmr):
    empty = cli("--url", xlmr.grpc_url, "--query", " ", "a")
    assert empty.returncode == 2 and "QUERY is empty" in empty.stderr
    neither = cli("--url", xlmr.grpc_url, "--query", "q")
    assert neither.returncode == 2 and "either as arguments or with --documents-file" in neither.stderr
    (port,) = free_ports(1)
    down = cli("--url", f"127.0.0.1:{port}", "--query", "q", "a")
    assert down.returncode == 1 and "unavailable" in down.stderr
