"""The gateway's limits against a real uvicorn, over raw sockets: held bytes, slow bodies and heads, chunk
floods, wrong hosts, connection count, and a client that leaves mid-request in /metrics.

`triton-rerank api` runs in a subprocess (its RSS is measured) with no Triton behind it: every limit
here acts before the gateway calls Triton, and a request that passes them gets 503 (unreachable).
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from triton_rerank.client.ranking import ScoredDocuments
from triton_rerank.gateway.server import GatewayThread
from triton_rerank.gateway.settings import GatewaySettings
from triton_rerank.launcher.server import free_ports

MiB = 1 << 20
MAX_BODY = 8 * MiB
MAX_BUFFERED = 32 * MiB
BODY_TIMEOUT = 2.0
HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 1.0


@dataclass
class Gateway:
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=10).text


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    (port, triton) = free_ports(2)  # nothing listens on `triton`
    log = tmp_path_factory.mktemp("gateway-limits") / "gateway.log"
    command = [sys.executable, "-m", "triton_rerank", "api", "--triton-url", f"127.0.0.1:{triton}",
               "--port", str(port), "--log-level", "warning", "--max-body-bytes", str(MAX_BODY),
               "--max-buffered-bytes", str(MAX_BUFFERED), "--body-timeout", str(BODY_TIMEOUT),
               "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Gateway(port, process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the gateway exited: {log.read_text()}"
            try:
                requests.get(running.url + "/openapi.json", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"the gateway did not start: {log.read_text()}"
                time.sleep(0.1)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    return sock


def head(path="/v1/rerank", host="127.0.0.1", **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one answer (its Content-Length); (0, {}, b"") when the connection closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            more = b""
        if not more:
            return 0, {}, b""
        data += more
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, body


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def answers_at_once(gateway: Gateway) -> None:
    started = time.monotonic()
    response = requests.post(gateway.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=10)
    # Through every limit to the (absent) Triton.
    assert response.status_code == 503 and response.json()["type"] == "unavailable"
    assert time.monotonic() - started < 2


def test_a_chunk_flood_is_refused_in_about_a_second_and_the_gateway_keeps_answering(gateway):
    """1,000,000 one-byte chunks (tritonserver 2.51 crashes on them): 400 after 65,536 of them.

    Without the count, h11 spends 11 to 18 s of the event loop on such a body (6 MB) and every other
    client waits; uvicorn hands it to the app as a few dozen messages, so counting those would not see it.
    """
    flood = b"1\r\nx\r\n" * 1_000_000 + b"0\r\n\r\n"
    sock = connect(gateway.port)
    sock.sendall(head(transfer_encoding="chunked"))

    def send_flood():
        try:
            sock.sendall(flood)
        except OSError:
            pass  # the gateway closed the connection: the refusal is read below

    sender = threading.Thread(target=send_flood)
    started = time.monotonic()
    sender.start()
    status, headers, body = read_answer(sock)
    seconds = time.monotonic() - started
    sender.join(30)
    sock.close()
    print(f"chunk flood of 1,000,000 one-byte chunks refused after {seconds:.2f} s")
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["message"] == ("the request body came in more than 65536 chunks (--max-body-chunks): "
                                           "send it in fewer, larger chunks, or with a Content-Length")
    assert seconds < 6
    answers_at_once(gateway)
    # A chunked body in a few chunks is fine.
    sock = connect(gateway.port)
    document = json.dumps({"query": "q", "documents": ["a"]}).encode()
    sock.sendall(head(transfer_encoding="chunked") + b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (document[:5], document[5:])) + b"0\r\n\r\n")
    assert read_answer(sock)[0] == 503  # passed the limits, on to the absent Triton
    sock.close()


def test_40_slow_clients_hold_no_more_than_the_buffered_bytes_limit(gateway):
    """Each sends all of an 8 MiB body but its last byte and waits: 320 MiB if all were held."""
    answers_at_once(gateway)  # warm: the first answers load what they need
    baseline = peak = gateway.rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gateway.rss())
            time.sleep(0.005)

    outcomes = []

    def slow_client():
        sock = connect(gateway.port)
        try:
            sock.sendall(head(content_length=MAX_BODY))
            sock.sendall(b"x" * (MAX_BODY - 1))
        except OSError:
            pass  # refused (503) while sending: the gateway closed the connection
        outcomes.append(read_answer(sock)[0])
        sock.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=slow_client) for _ in range(40)]
    started = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(BODY_TIMEOUT + 30)
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    grown = (peak - baseline) / MiB
    print(f"40 slow clients x {MAX_BODY // MiB} MiB, --max-buffered-bytes {MAX_BUFFERED // MiB} MiB: RSS grew "
          f"{grown:.0f} MiB at most; answers {sorted(outcomes)} in {seconds:.1f} s")
    assert len(outcomes) == 40 and set(outcomes) <= {408, 503, 0}  # 0: closed before the 503 could be read
    # Each declared length is taken whole as its head arrives: exactly the bodies that fit are read, and
    # they get 408 at the body timeout; the rest are refused at once, none part way.
    assert outcomes.count(408) == MAX_BUFFERED // MAX_BODY
    assert seconds < BODY_TIMEOUT + 10
    assert grown < MAX_BUFFERED / MiB + 32, f"RSS grew {grown:.0f} MiB"
    assert "triton_rerank_gateway_buffered_request_bytes 0.0" in gateway.metrics()  # all given back
    answers_at_once(gateway)


def test_a_slow_body_is_408_and_the_connection_closed(gateway):
    sock = connect(gateway.port)
    sock.sendall(head(content_length=100) + b'{"query": ')
    started = time.monotonic()
    status, headers, body = read_answer(sock)
    seconds = time.monotonic() - started
    assert status == 408 and headers["connection"] == "close" and BODY_TIMEOUT - 0.1 < seconds < BODY_TIMEOUT + 2
    assert json.loads(body)["type"] == "request_timeout" and "--body-timeout" in json.loads(body)["message"]
    assert closed_by_peer(sock)
    sock.close()


def test_a_slow_head_and_a_silent_connection_are_closed(gateway):
    silent = connect(gateway.port)
    started = time.monotonic()
    assert closed_by_peer(silent) and time.monotonic() - started < KEEP_ALIVE + 2
    silent.close()

    dribbling = connect(gateway.port)
    started = time.monotonic()
    try:
        for byte in head(content_length=2):
            dribbling.sendall(bytes([byte]))
            time.sleep(0.05)
        closed = False
    except OSError:
        closed = True
    assert closed or closed_by_peer(dribbling)
    assert time.monotonic() - started < HEADER_TIMEOUT + 2
    dribbling.close()


def test_a_wrong_host_is_400_before_the_body_is_read(gateway):
    sock = connect(gateway.port)
    sock.sendall(head(host="rebound.example:30000", content_length=MAX_BODY))  # no body sent
    status, _, body = read_answer(sock)
    sock.close()
    assert status == 400
    assert json.loads(body)["message"].startswith("the Host header 'rebound.example:30000' is not one this gateway")
    tei = requests.post(f"{gateway.url}/rerank", json={"query": "q", "texts": ["a"]},
                        headers={"Host": "rebound.example"}, timeout=10)
    assert tei.status_code == 400 and tei.json()["error_type"] == "invalid_request"
    for host in (f"localhost:{gateway.port}", f"127.0.0.1:{gateway.port}"):
        assert requests.get(gateway.url + "/openapi.json", headers={"Host": host}, timeout=10).status_code == 200


def test_oversize_headers_are_400(gateway):
    sock = connect(gateway.port)
    sock.sendall(head(x_big="a" * (20 * 1024), content_length=2) + b"{}")
    assert read_answer(sock)[0] == 400
    sock.close()


def test_a_client_that_leaves_mid_request_is_counted_as_499_not_500(gateway):
    before = gateway.metrics()
    sock = connect(gateway.port)
    sock.sendall(head(content_length=1000) + b'{"query": "q", ')
    time.sleep(0.2)
    sock.close()
    line = 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="499"}'
    count = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = gateway.metrics()
        counted = [float(m.split()[-1]) for m in metrics.splitlines() if m.startswith(line)]
        count = counted[0] if counted else 0.0
        previous = [float(m.split()[-1]) for m in before.splitlines() if m.startswith(line)]
        if count > (previous[0] if previous else 0.0):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no 499 counted:\n{metrics}")
    assert 'status="500"' not in metrics
    assert 'triton_rerank_gateway_errors_total{kind="client_closed",route="/v1/rerank"}' in metrics


def test_beyond_max_connections_uvicorn_answers_503():
    (port,) = free_ports(1)
    thread = GatewayThread(GatewaySettings(triton_url="127.0.0.1:1", port=port, max_connections=3,
                                           log_level="critical")).start()
    idle = []
    try:
        idle = [connect(port) for _ in range(3)]
        refused = requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10)
        assert refused.status_code == 503 and refused.text == "Service Unavailable"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()
        thread.stop()


class SlowTriton:
    """Scores after `delay` seconds: long enough for a client to give up."""

    where = "Triton at slow:8001 (grpc)"

    def __init__(self, delay: float):
        self.delay = delay
        self.scored = 0

    async def score(self, query, documents, truncate=True, **options):
        await asyncio.sleep(self.delay)
        self.scored += 1
        return ScoredDocuments(np.zeros(len(documents), dtype=np.float32), np.ones(len(documents), dtype=np.int32))

    async def is_ready(self, timeout=2.0):
        return True

    async def reranker_kind(self):
        return "cross-encoder"

    async def close(self):
        pass


def test_a_client_that_gives_up_while_its_request_is_scored_is_counted_as_499():
    """The answer (200) comes after the client left: nobody received it, so it is not counted as one."""
    (port,) = free_ports(1)
    triton = SlowTriton(delay=1.0)
    thread = GatewayThread(GatewaySettings(port=port, log_level="critical"), scorer=triton).start()
    try:
        url = f"http://127.0.0.1:{port}"
        document = json.dumps({"query": "q", "documents": ["a"]}).encode()
        sock = connect(port)
        sock.sendall(head(content_length=len(document)) + document)
        time.sleep(0.3)
        sock.close()  # a client timeout
        assert requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while triton.scored < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="499"} 1.0' in metrics
        assert 'triton_rerank_gateway_requests_total{route="/v1/rerank",status="200"} 1.0' in metrics
        assert 'status="500"' not in metrics
    finally:
        thread.stop()
