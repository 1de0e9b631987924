"""The Python client of the `reranker` ensemble: RerankClient (blocking) and AsyncRerankClient (asyncio).

    from triton_rerank.client import RerankClient

    with RerankClient("127.0.0.1:8001") as client:           # gRPC; protocol="http" for port 8000
        for r in client.rerank("what is panda?", ["hi", "The giant panda is a bear."]):
            print(r.index, r.score, r.document)

Both clients cut a long document list into requests of `max_documents_per_request`, send them
concurrently (Triton batches them together) and merge the answers back into input order; they
retry UNAVAILABLE (server down, restarting, or its queue full) with exponential backoff; and they
raise the exceptions of `triton_rerank.client.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .errors import InvalidRequestError, ServerUnavailableError, translate
from .ranking import RerankResult, ScoredDocuments, chunk_bounds, rank
from .triton_io import (
    MODEL_NAME,
    ScoreOptions,
    check_request,
    make_inputs,
    read_outputs,
    reranker_kind_of,
    server_address,
)


def grpc_channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options, plus a short reconnect backoff and round-robin.

    gRPC's default backoff grows to 120 s after repeated connection failures, so a client that
    polled a restarting server could wait minutes after it is back; capping it at 2 s makes
    reconnection prompt. Round-robin sends each call to the next of the addresses the target
    resolves to (every pod of a Kubernetes headless Service, `dns:///name:8001`; a list,
    `ipv4:10.0.0.1:8001,10.0.0.2:8001`) rather than all calls to the first; with one address it
    changes nothing.
    """
    from tritonclient.grpc import KeepAliveOptions
    from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.lb_policy_name", "round_robin"),
    ]


class _ClientSettings:
    """Options and helpers shared by the blocking and the asyncio client."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", *, model_name: str = MODEL_NAME,
                 max_documents_per_request: int | None = 256, max_concurrency: int = 8, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, timeout: float | None = 300.0,
                 channel_max_age: float | None = None):
        if max_documents_per_request is not None and max_documents_per_request < 1:
            raise ValueError("max_documents_per_request must be >= 1 (or None for no splitting)")
        if max_concurrency < 1 or retries < 0:
            raise ValueError("max_concurrency must be >= 1 and retries >= 0")
        if channel_max_age is not None and channel_max_age <= 0:
            raise ValueError("channel_max_age must be positive (or None: keep one connection)")
        self.protocol = protocol
        self.address = server_address(url, protocol)
        self.model_name = model_name
        self.max_documents_per_request = max_documents_per_request
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.channel_max_age = channel_max_age
        self.where = f"Triton at {self.address} ({protocol})"

    def _retry_delay(self, attempt: int) -> float:
        # Jitter spreads the retries of many clients that lost the server at the same moment.
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.75, 1.25)

    def _give_up(self, error: ServerUnavailableError, attempts: int) -> ServerUnavailableError:
        if attempts == 1:
            return error
        return ServerUnavailableError(f"{error} (gave up after {attempts} attempts)")

    def _infer_kwargs(self, options: ScoreOptions) -> dict:
        kwargs = {"parameters": options.parameters()}
        if self.protocol == "grpc" and self.timeout is not None:
            kwargs["client_timeout"] = self.timeout
        return kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, protocol={self.protocol!r})"


class RerankClient(_ClientSettings):
    """Blocking client. Safe to share between threads (each thread gets its own connection)."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", **options):
        super().__init__(url, protocol, **options)
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        # tritonclient's HTTP client must not be shared between threads; one per thread is simplest
        # for both protocols and lets the chunks of a long list go out in parallel.
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.address, channel_args=grpc_channel_args())
            else:
                timeout = self.timeout if self.timeout is not None else 24 * 3600.0
                client = self._module.InferenceServerClient(self.address, connection_timeout=timeout,
                                                            network_timeout=timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _infer(self, query: str, documents: Sequence[str], options: ScoreOptions, offset: int) -> ScoredDocuments:
        inputs = make_inputs(self._module, query, documents)
        for attempt in range(self.retries + 1):
            try:
                result = self._client().infer(self.model_name, inputs, **self._infer_kwargs(options))
                return read_outputs(result, len(documents))
            except Exception as raw:  # tritonclient and the network raise many types; translate sorts them
                error = translate(raw, self.where, offset)
                if not isinstance(error, ServerUnavailableError):
                    raise error from raw
                if attempt == self.retries:
                    raise self._give_up(error, attempt + 1) from raw
                time.sleep(self._retry_delay(attempt))
        raise AssertionError("unreachable")

    def score(self, query: str, documents: Sequence[str], truncate: bool | None = None,
              **options) -> ScoredDocuments:
        """Raw logits, token and window counts of every document, in input order.

        options are ScoreOptions' fields: long_documents, chunk_overlap, max_chunks_per_doc,
        truncation_direction, max_tokens_per_doc, instruction (decoder rerankers).
        """
        options = ScoreOptions(truncate, **options)
        documents = check_request(query, documents)
        bounds = chunk_bounds(len(documents), self.max_documents_per_request)
        if len(bounds) == 1:
            return self._infer(query, documents, options, 0)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="rerank-client")
        futures = [self._pool.submit(self._infer, query, documents[a:b], options, a) for a, b in bounds]
        return ScoredDocuments.concatenate([f.result() for f in futures])

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               return_documents: bool = True, normalize: bool = False, truncate: bool | None = None,
               **options) -> list[RerankResult]:
        """Documents sorted by descending score (stable on ties), each with its index in `documents`.

        score is the model's raw logit, or its sigmoid (0..1) when normalize; top_n keeps the best
        n; truncate=False makes a too-long (query, document) pair an InvalidRequestError;
        long_documents="chunk" scores a long document's overlapping windows and keeps the best
        (chunk_overlap, max_chunks_per_doc); truncation_direction="left" keeps the end of a long
        document; max_tokens_per_doc keeps at most that many tokens of each (ScoreOptions).
        """
        _check_top_n(top_n)
        documents = check_request(query, documents)
        scored = self.score(query, documents, truncate, **options)
        return rank(scored, documents, top_n, return_documents, normalize)

    def reranker_kind(self) -> str:
        """What SCORES are: "decoder" (logit(yes) - logit(no); sigmoid = P(yes)), "cross-encoder" (a
        classifier's logit), or "auto" when the server's ensemble does not say."""
        try:
            client = self._client()
            if self.protocol == "grpc":
                return reranker_kind_of(client.get_model_config(self.model_name, as_json=True))
            return reranker_kind_of(client.get_model_config(self.model_name))
        except Exception as raw:  # as _infer: tritonclient and the network raise many types
            raise translate(raw, self.where) from raw

    def is_ready(self) -> bool:
        """True when the server answers and the reranker model is ready."""
        try:
            return bool(self._client().is_model_ready(self.model_name))
        except Exception:
            return False

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for client in clients:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRerankClient(_ClientSettings):
    """asyncio client. Use it from one event loop; its connection opens on the first call.

    With `channel_max_age` (seconds), calls after that age go over a new connection, which
    resolves the server's address again: behind a DNS name of several servers (a Kubernetes
    headless Service), servers added since are used within that time. The old connection is
    closed once the calls it carries have had their timeout to finish.
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", **options):
        super().__init__(url, protocol, **options)
        if protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self._module = module
        self._connection = None
        self._opened_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Replaced connections, each with the task that closes it once its calls have had their time.
        self._retiring: dict[asyncio.Task, object] = {}

    def _retire(self, connection) -> None:
        async def close_later() -> None:
            await asyncio.sleep(self.timeout if self.timeout is not None else 300.0)
            await connection.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring[task] = connection
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def _client(self):
        # Created lazily: grpc.aio channels and aiohttp sessions belong to the event loop running when
        # they are made. A call from another loop (a second asyncio.run) gets a connection of its own.
        loop = asyncio.get_running_loop()
        if self._connection is not None and self._loop is not loop:
            self._connection = None
            self._retiring = {}  # those tasks belong to the other loop
        self._loop = loop
        if (self._connection is not None and self.channel_max_age is not None
                and time.monotonic() - self._opened_at > self.channel_max_age):
            self._retire(self._connection)
            self._connection = None
        if self._connection is None:
            self._opened_at = time.monotonic()
            if self.protocol == "grpc":
                self._connection = self._module.InferenceServerClient(self.address, channel_args=grpc_channel_args())
            else:
                timeout = self.timeout if self.timeout is not None else 24 * 3600.0
                self._connection = self._module.InferenceServerClient(self.address, conn_timeout=timeout)
        return self._connection

    async def _infer(self, query: str, documents: Sequence[str], options: ScoreOptions,
                     offset: int) -> ScoredDocuments:
        inputs = make_inputs(self._module, query, documents)
        for attempt in range(self.retries + 1):
            try:
                result = await self._client().infer(self.model_name, inputs, **self._infer_kwargs(options))
                return read_outputs(result, len(documents))
            except asyncio.CancelledError:
                raise
            except Exception as raw:
                error = translate(raw, self.where, offset)
                if not isinstance(error, ServerUnavailableError):
                    raise error from raw
                if attempt == self.retries:
                    raise self._give_up(error, attempt + 1) from raw
                await asyncio.sleep(self._retry_delay(attempt))
        raise AssertionError("unreachable")

    async def score(self, query: str, documents: Sequence[str], truncate: bool | None = None,
                    **options) -> ScoredDocuments:
        """Raw logits, token and window counts of every document, in input order.

        options are ScoreOptions' fields: long_documents, chunk_overlap, max_chunks_per_doc,
        truncation_direction, max_tokens_per_doc, instruction (decoder rerankers).
        """
        options = ScoreOptions(truncate, **options)
        documents = check_request(query, documents)
        bounds = chunk_bounds(len(documents), self.max_documents_per_request)
        if len(bounds) == 1:
            return await self._infer(query, documents, options, 0)
        slots = asyncio.Semaphore(self.max_concurrency)

        async def one(start: int, stop: int) -> ScoredDocuments:
            async with slots:
                return await self._infer(query, documents[start:stop], options, start)

        # return_exceptions: every chunk finishes (no orphaned task errors) before the first error is raised.
        parts = await asyncio.gather(*(one(a, b) for a, b in bounds), return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return ScoredDocuments.concatenate(parts)

    async def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
                     return_documents: bool = True, normalize: bool = False,
                     truncate: bool | None = None, **options) -> list[RerankResult]:
        """As RerankClient.rerank."""
        _check_top_n(top_n)
        documents = check_request(query, documents)
        scored = await self.score(query, documents, truncate, **options)
        return rank(scored, documents, top_n, return_documents, normalize)

    async def reranker_kind(self) -> str:
        """As RerankClient.reranker_kind."""
        try:
            client = self._client()
            if self.protocol == "grpc":
                return reranker_kind_of(await client.get_model_config(self.model_name, as_json=True))
            return reranker_kind_of(await client.get_model_config(self.model_name))
        except asyncio.CancelledError:
            raise
        except Exception as raw:
            raise translate(raw, self.where) from raw

    async def is_ready(self, timeout: float = 2.0) -> bool:
        """True when the server answers within `timeout` and the reranker model is ready."""
        try:
            return bool(await asyncio.wait_for(self._client().is_model_ready(self.model_name), timeout))
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        # Replaced connections too, now: their calls are over or given up with this client.
        retiring, self._retiring = self._retiring, {}
        for task, old in retiring.items():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await old.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _check_top_n(top_n: int | None) -> None:
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequestError(f"top_n must be a positive integer or None, got {top_n!r}")
