"""`triton-rerank serve` outlives its tritonserver: a server that dies (SIGKILL, or the SIGSEGV one
chunked HTTP request causes in tritonserver 2.51) is restarted with the same command line and
environment, and meanwhile the gateway answers every route 200 or 503 with Retry-After, never
502 and never a dropped connection. And that request cannot reach the server from outside:
sent to every port `serve` exposes, it is refused and nothing restarts."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from triton_rerank.launcher.server import SHM_DIRECTORY, free_ports, process_group_alive

QUERY = "what do pandas eat"
DOCUMENTS = ["bamboo", "the giant panda eats bamboo shoots and leaves", "a search engine", "pandas sleep a lot"]

# Every kind of route the gateway has: the three dialects, KServe's generate, and the health check.
ROUTES = [
    ("POST", "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "return_documents": False}),
    ("POST", "/rerank", {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}),
    ("POST", "/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("POST", "/v2/models/reranker/generate", {"QUERY": QUERY, "DOCUMENTS": DOCUMENTS}),
    ("GET", "/health", None),
]


class Serve:
    """`triton-rerank serve` as a subprocess, its output collected line by line."""

    def __init__(self, model_dir: Path, run_dir: Path, *args: str):
        self.run_dir = run_dir
        self.http, self.grpc, self.metrics, self.api = free_ports(4)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triton_rerank", "serve", "--model-path", str(model_dir), "--device", "cpu",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--api-port", str(self.api), "--run-dir", str(run_dir), "--restart-backoff", "0.2", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            assert self.process.poll() is None, f"serve exited:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} in serve's output:\n{self.output}"
            time.sleep(0.1)

    def server_pid(self) -> int:
        """The tritonserver serve runs now (its child whose program is bin/tritonserver)."""
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    if (proc / "cmdline").read_bytes().split(b"\0")[0].endswith(b"bin/tritonserver"):
                        return int(proc.name)
            except (OSError, IndexError, ValueError):
                continue
        raise AssertionError(f"no tritonserver under serve:\n{self.output}")

    def __enter__(self) -> "Serve":
        return self

    def __exit__(self, *exc) -> None:
        # A failed test must not leave serve running; its server follows it (setpriv --pdeathsig).
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def leftovers(self) -> str:
        """Processes still running from this serve's run directory (none once it has stopped)."""
        return subprocess.run(["pgrep", "-f", str(self.run_dir)], capture_output=True, text=True).stdout.strip()

    def server_flag(self, name: str) -> str:
        """The value of one of the running tritonserver's flags (--http-port=...)."""
        command = Path(f"/proc/{self.server_pid()}/cmdline").read_bytes().decode().split("\0")
        (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
        return value

    def scores(self) -> list[float]:
        response = requests.post(f"http://127.0.0.1:{self.api}/v1/rerank", json=ROUTES[0][2], timeout=60)
        assert response.status_code == 200, response.text
        return [item["score"] for item in sorted(response.json(), key=lambda item: item["index"])]

    def healthy(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.api}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False


class Load:
    """Two clients sending every route in turn, each answer recorded as (path, status, Retry-After, when sent)."""

    def __init__(self, api: int):
        self.api = api
        self.answers: list[tuple[str, int | str, str | None, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, offset: int) -> None:
        session = requests.Session()
        i = offset
        while not self._stop.is_set():
            method, path, body = ROUTES[i % len(ROUTES)]
            i += 1
            sent = time.monotonic()
            try:
                response = session.request(method, f"http://127.0.0.1:{self.api}{path}", json=body, timeout=60)
                self.answers.append((path, response.status_code, response.headers.get("retry-after"), sent))
            except requests.RequestException as error:  # the gateway itself failed to answer
                self.answers.append((path, repr(error), None, sent))
            time.sleep(0.01)

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def statuses(self, since: int = 0) -> set:
        return {status for _, status, _, _ in self.answers[since:]}

    def sent_after(self, moment: float) -> list[tuple]:
        """The answers to requests sent after `moment` (a request sent before may still end after it)."""
        return [answer for answer in self.answers if answer[3] > moment]


def answers_200_once_back(serve: Serve, load: Load) -> None:
    """Waits until the gateway's /health sees Triton again; every request sent after that gets a 200."""
    deadline = time.monotonic() + 30
    while not serve.healthy():
        assert time.monotonic() < deadline, "the gateway did not see Triton come back"
        time.sleep(0.2)
    back = time.monotonic()
    time.sleep(1.0)
    assert {a[1] for a in load.sent_after(back)} == {200}, load.sent_after(back)


def environment(pid: int) -> dict[bytes, bytes]:
    return dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)


def regions(prefix: str) -> set[str]:
    return {path.name for path in SHM_DIRECTORY.glob(f"{prefix}*")}


def test_serve_restarts_a_dead_tritonserver_and_the_gateway_answers_503_meanwhile(tiny_model_dirs, tmp_path,
                                                                                   chunked_crash_request):
    with Serve(tiny_model_dirs["xlm-roberta"], tmp_path / "run") as serve:
        serve.wait_for("Ctrl-C stops", timeout=180)
        expected = serve.scores()
        first = serve.server_pid()
        command = Path(f"/proc/{first}/cmdline").read_bytes()
        env = environment(first)
        prefix = re.search(rb"shm-region-prefix-name=([^\0]+)", command).group(1).decode()
        first_regions = regions(prefix)
        assert first_regions, "the Python backend made no shared-memory regions with the server's prefix"

        with Load(serve.api) as load:
            time.sleep(1.0)
            # 1. SIGKILL: restarted with the very same command line and environment (ports, secrets).
            before_kill = len(load.answers)
            os.kill(first, signal.SIGKILL)
            serve.wait_for("tritonserver is ready again")
            second = serve.server_pid()
            assert second != first
            assert Path(f"/proc/{second}/cmdline").read_bytes() == command
            assert environment(second) == env
            # What the killed server left in /dev/shm was removed before the new one started.
            assert not first_regions & regions(prefix)
            answers_200_once_back(serve, load)

            # 2. The request that crashes tritonserver 2.51 (SIGSEGV), straight to Triton's own HTTP port
            # (on loopback; serve's public HTTP port is the gateway's, which refuses it).
            chunked_crash_request(int(serve.server_flag("--http-port")))
            serve.wait_for("tritonserver is ready again", count=2)
            assert serve.server_pid() not in (first, second)
            answers_200_once_back(serve, load)

        outages = load.answers[before_kill:]
        # Never a 502, never a dropped connection: 200, or 503 with Retry-After while Triton is away.
        assert load.statuses(before_kill) <= {200, 503}, [a for a in outages if a[1] not in (200, 503)]
        refused = [a for a in outages if a[1] == 503]
        assert refused, "no request saw the outage"
        assert all(retry_after == "1" for _, _, retry_after, _ in refused), refused
        # Every route went through it: each answered 503 meanwhile, and 200 once Triton was back.
        assert {path for path, _, _, _ in refused} == {path for _, path, _ in ROUTES}, refused
        np.testing.assert_allclose(serve.scores(), expected, atol=1e-5)

        output = serve.output
        assert f"tritonserver (pid {first}) was killed by SIGKILL (signal 9)" in output, output
        assert f"tritonserver (pid {second}) was killed by SIGSEGV (signal 11)" in output, output
        assert "restarting tritonserver in 0.2 s (restart 1 of at most 5 restarts in 600 s)" in output, output
        assert "restarting tritonserver in 0.4 s (restart 2 of at most 5 restarts in 600 s)" in output, output
        # The stub supervisor followed each new server rather than trying to reload models of the dead one.
        assert "reloading" not in output, output

        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=60) == 0
    assert serve.leftovers() == "", f"processes left behind: {serve.leftovers()}"
    assert not process_group_alive(serve.process.pid)
    assert not regions(prefix), "shared-memory regions left behind"


def test_the_crash_request_to_every_port_serve_exposes_leaves_it_answering(tiny_model_dirs, tmp_path,
                                                                           chunked_crash_request):
    """Bound to every address, serve's public HTTP port is the gateway's KServe front; tritonserver's
    own HTTP frontend listens on loopback only. The crash request sent to each port serve exposes
    (KServe HTTP, rerank API, gRPC, metrics) is refused, the same tritonserver keeps running, and
    tritonclient.http works on the public HTTP port as it does on Triton's. serve killed outright
    leaves nothing running."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with Serve(tiny_model_dirs["bert"], tmp_path / "run", "--host", "0.0.0.0") as serve:
        serve.wait_for("Ctrl-C stops", timeout=180)
        assert f"HTTP        http://127.0.0.1:{serve.http}  (KServe v2, model 'reranker', through the gateway)" \
            in serve.output, serve.output
        assert serve.server_flag("--http-address") == "127.0.0.1"
        assert serve.server_flag("--grpc-address") == serve.server_flag("--metrics-address") == "0.0.0.0"
        triton_http = int(serve.server_flag("--http-port"))
        assert triton_http not in (serve.http, serve.api, serve.grpc, serve.metrics)
        pid = serve.server_pid()
        expected = serve.scores()

        # The gateway counts the chunks and refuses past --max-body-chunks (400, then the connection is
        # closed while the client still sends); Triton's gRPC port speaks HTTP/2 only; its metrics
        # port answers 405 to a POST without reading the body into the HTTP frontend's handler.
        for port, path in [(serve.http, "/v2/models/reranker/generate"), (serve.http, "/v2/models/reranker/infer"),
                           (serve.http, "/v2/models/tokenizer/infer"), (serve.api, "/v1/rerank"),
                           (serve.grpc, "/v2/models/reranker/generate"), (serve.metrics, "/metrics")]:
            answer = chunked_crash_request(port, path)
            assert not answer or not answer.startswith(b"HTTP/1.1 2"), (port, path, answer)
            assert serve.process.poll() is None and serve.server_pid() == pid, serve.output
            np.testing.assert_allclose(serve.scores(), expected, atol=1e-5)
        assert "was killed" not in serve.output and "restarting" not in serve.output, serve.output

        # tritonclient.http on the public port: reads asked of Triton, inference checked by the gateway.
        public = f"127.0.0.1:{serve.http}"
        with httpclient.InferenceServerClient(public) as client, \
                httpclient.InferenceServerClient(f"127.0.0.1:{triton_http}") as direct:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("reranker")
            assert client.get_model_metadata("reranker") == direct.get_model_metadata("reranker")
            assert client.get_server_metadata() == direct.get_server_metadata()
            inputs = [httpclient.InferInput("QUERY", [1], "BYTES"), httpclient.InferInput("DOCUMENTS", [len(DOCUMENTS)], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
            inputs[1].set_data_from_numpy(np.array([d.encode() for d in DOCUMENTS], dtype=object))
            via_gateway = client.infer("reranker", inputs).as_numpy("SCORES")
            np.testing.assert_allclose(via_gateway, direct.infer("reranker", inputs).as_numpy("SCORES"), atol=1e-6)
            np.testing.assert_allclose(via_gateway.ravel(), expected, atol=1e-5)
            # The ensemble's configuration (the contract) is there; what is not is refused in KServe's
            # shape, so tritonclient says why.
            assert client.get_model_config("reranker") == direct.get_model_config("reranker")
            with pytest.raises(InferenceServerException, match="GET /v2/models/tokenizer/config: Not Found"):
                client.get_model_config("tokenizer")
        # Triton's admin APIs are not there at all (they answer 403 on Triton's own port).
        for method, path in [("POST", "/v2/repository/index"), ("GET", "/v2/models/tokenizer/config"),
                             ("POST", "/v2/systemsharedmemory/region/r/register"), ("GET", "/v2/logging"),
                             ("GET", "/v2/trace/setting"), ("GET", "/v2/models/stats")]:
            status = requests.request(method, f"http://{public}{path}", data=b"{}", timeout=10).status_code
            assert status in (403, 404, 405), (method, path, status)
        assert serve.server_pid() == pid

        # serve killed outright (SIGKILL, the OOM killer) cannot stop its server; the kernel tells the
        # server (setpriv --pdeathsig), which stops with its backend processes instead of living on.
        serve.process.kill()
        serve.process.wait()
        deadline = time.monotonic() + 60
        while process_group_alive(pid):
            assert time.monotonic() < deadline, "tritonserver outlived the serve that started it"
            time.sleep(0.2)
    assert serve.leftovers() == "", f"processes left behind: {serve.leftovers()}"
