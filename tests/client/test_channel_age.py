"""AsyncRerankClient's channel renewal (channel_max_age) and the round-robin channel option.

tritonclient's asyncio module is replaced by a recorder here, so that which connection carried
which call, and when each was closed, can be read; the round-robin spread over real servers is
tested in tests/deploy/test_deploy.py (two replicas)."""

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio

from triton_rerank.client.rerank_client import AsyncRerankClient, grpc_channel_args


class Connection:
    def __init__(self, log: list, url: str, channel_args):
        self.log, self.url, self.channel_args = log, url, channel_args
        self.calls = 0
        self.closed = False
        log.append(self)

    async def infer(self, model_name, inputs, **kwargs):
        assert not self.closed, "a call went over a closed connection"
        self.calls += 1
        await asyncio.sleep(0.01)
        return Result(inputs[1].shape()[0] if inputs else 2)

    async def close(self):
        self.closed = True


class Result:
    def __init__(self, n):
        self.n = n

    def as_numpy(self, name):
        return np.zeros((1, self.n), dtype=np.float32 if name == "SCORES" else np.int32)


class FakeModule:
    """tritonclient.grpc.aio as AsyncRerankClient uses it: real inputs, recorded connections."""

    InferInput = grpcaio.InferInput

    def __init__(self):
        self.connections: list[Connection] = []

    def InferenceServerClient(self, url, channel_args=None):  # noqa: N802 (tritonclient's name)
        return Connection(self.connections, url, channel_args)


def client_with(fake, **options):
    client = AsyncRerankClient("dns:///triton-pods:8001", "grpc", retries=0, **options)
    client._module = fake
    return client


def test_round_robin_is_asked_for_and_the_target_passes_unchanged():
    assert ("grpc.lb_policy_name", "round_robin") in grpc_channel_args()
    fake = FakeModule()

    async def run():
        client = client_with(fake)
        await client.score("q", ["a", "b"])
        await client.close()

    asyncio.run(run())
    (connection,) = fake.connections
    assert connection.url == "dns:///triton-pods:8001"
    assert ("grpc.lb_policy_name", "round_robin") in connection.channel_args


def test_without_a_max_age_one_connection_carries_every_call():
    fake = FakeModule()

    async def run():
        client = client_with(fake)
        for _ in range(5):
            await client.score("q", ["a", "b"])
            await asyncio.sleep(0.02)
        await client.close()

    asyncio.run(run())
    assert [c.calls for c in fake.connections] == [5] and fake.connections[0].closed


def test_calls_past_the_max_age_go_over_a_new_connection_and_the_old_one_closes_after_the_timeout():
    fake = FakeModule()

    async def run():
        client = client_with(fake, channel_max_age=0.05, timeout=0.2)
        await client.score("q", ["a", "b"])
        await asyncio.sleep(0.1)
        # A call in flight on the first connection while the second one opens: it is not cut.
        slow = asyncio.create_task(fake.connections[0].infer("reranker", []))
        await client.score("q", ["a", "b"])
        assert len(fake.connections) == 2 and not fake.connections[0].closed
        await slow
        await asyncio.sleep(0.3)  # the first connection's timeout has passed
        assert fake.connections[0].closed and not fake.connections[1].closed
        await client.score("q", ["a", "b"])  # the second connection is past its age by now: a third
        await client.close()

    asyncio.run(run())
    assert [c.calls for c in fake.connections] == [2, 1, 1]
    assert all(c.closed for c in fake.connections)  # close() closes the replaced ones still open too


def test_max_age_must_be_positive():
    with pytest.raises(ValueError, match="channel_max_age must be positive"):
        AsyncRerankClient("127.0.0.1:8001", channel_max_age=0)
