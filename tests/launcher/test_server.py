"""The one hardened tritonserver command line, the server object that runs it, and the loop that restarts it."""

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.restart import (
    RestartBudget,
    RestartPolicy,
    ServerKeeper,
    describe_exit,
    restart_policy,
)
from triton_rerank.launcher.server import (
    ADMIN_HEADER,
    REDACTED_KEY,
    SHM_DIRECTORY,
    ServerAddress,
    TritonServer,
    ephemeral_port_range,
    free_ports,
    remove_shared_memory,
    server_command,
)
from triton_rerank.launcher.supervisor import StubSupervisor, process_running, stub_models
from triton_rerank.launcher.triton_install import TritonInstall


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in command[1:])


def test_command_is_hardened():
    address = ServerAddress("10.0.0.1", 1, 2, 3)
    command = server_command("/bin/tritonserver", Path("/repo"), Path("/backends"), address, "s3cret",
                             extra_args=["--log-verbose=1"])
    assert command[0] == "/bin/tritonserver"
    got = flags(command)
    restricted = f"shared-memory,model-repository,trace,logging:{ADMIN_HEADER}=s3cret"
    assert got == {
        "--model-repository": "/repo", "--backend-directory": "/backends",
        # Every model loaded at start; loading and unloading only through the restricted API.
        "--model-control-mode": "explicit", "--load-model": "*",
        "--http-restricted-api": restricted, "--grpc-restricted-protocol": restricted,
        "--exit-on-error": "true", "--strict-readiness": "true", "--exit-timeout-secs": "15",
        "--grpc-infer-allocation-pool-size": "0",
        "--http-address": "10.0.0.1", "--http-port": "1", "--grpc-address": "10.0.0.1", "--grpc-port": "2",
        "--metrics-address": "10.0.0.1", "--metrics-port": "3", "--allow-gpu-metrics": "false",
        "--log-verbose": "1",
    }
    assert command[-1] == "--log-verbose=1"  # extra arguments come last
    assert flags(server_command("t", Path("r"), Path("b"), address, "k", gpu_metrics=True))["--allow-gpu-metrics"] == "true"


@pytest.mark.parametrize("arg", ["--model-control-mode=poll", "--http-restricted-api=model-repository:a=b",
                                 "--grpc-restricted-protocol=trace:a=b", "--model-repository=/elsewhere",
                                 "--load-model=x", "--http-address=0.0.0.0", "--http-port", "--strict-readiness=false"])
def test_extra_arguments_cannot_undo_the_hardening(arg):
    with pytest.raises(LauncherError, match=f"{arg.split('=')[0]} is set by triton-rerank"):
        server_command("t", Path("r"), Path("b"), ServerAddress(), "k", extra_args=[arg])


def test_server_runs_the_one_command(tmp_path):
    bundled = TritonServer(tmp_path / "repo", tmp_path, ServerAddress(), extra_args=["--exit-timeout-secs=3"])
    name, key = bundled.admin_header
    assert name == ADMIN_HEADER and len(key) == 32
    assert bundled.command() == server_command(TritonInstall.find().server, tmp_path / "repo", tmp_path / "backends",
                                               ServerAddress(), key, shm_prefix=bundled.shm_prefix,
                                               extra_args=["--exit-timeout-secs=3"])
    assert f"--backend-config=python,shm-region-prefix-name={bundled.shm_prefix}" in bundled.command()
    # Each server has its own key and shared-memory prefix, and a printable command without the key.
    other = TritonServer(tmp_path / "repo", tmp_path, ServerAddress())
    assert other.admin_header[1] != key and other.shm_prefix != bundled.shm_prefix
    assert key not in " ".join(bundled.command(redact=True)) and REDACTED_KEY in " ".join(bundled.command(redact=True))

    image = TritonServer(Path("/tmp/model_repository"), Path("/tmp"), ServerAddress("0.0.0.0"), log_file="-",
                         install=TritonInstall.system(), gpu_metrics=True)
    assert image.command(redact=True) == server_command(
        "tritonserver", Path("/tmp/model_repository"), Path("/opt/tritonserver/backends"), ServerAddress("0.0.0.0"),
        REDACTED_KEY, gpu_metrics=True, shm_prefix=image.shm_prefix)
    assert image.log_file is None and image.log_tail() == "(the log went to the console)"


def test_missing_server_binary_is_a_launcher_error(tmp_path):
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", tmp_path, ServerAddress(),
                          install=TritonInstall.system(tmp_path / "no-tritonserver", tmp_path))
    with pytest.raises(LauncherError, match="cannot start"):
        server.start()
    server.stop()  # nothing started: nothing to stop


def test_wildcard_bind_is_reached_through_loopback():
    assert ServerAddress("0.0.0.0", 8000).local_http_url == "127.0.0.1:8000"
    assert ServerAddress("10.1.2.3", 8000).local_http_url == "10.1.2.3:8000"


def test_shared_memory_prefix_is_the_launchers():
    command = server_command("t", Path("r"), Path("b"), ServerAddress(), "k", shm_prefix="p_",
                             extra_args=["--backend-config=python,shm-default-byte-size=4194304"])
    # Other Python-backend settings stay the caller's; the prefix is set before them.
    assert command[-2:] == ["--backend-config=python,shm-region-prefix-name=p_",
                            "--backend-config=python,shm-default-byte-size=4194304"]
    with pytest.raises(LauncherError, match="shm-region-prefix-name is set by triton-rerank"):
        server_command("t", Path("r"), Path("b"), ServerAddress(), "k", shm_prefix="p_",
                       extra_args=["--backend-config=python,shm-region-prefix-name=mine_"])


def test_regions_of_a_killed_server_are_removed():
    prefix = f"triton_rerank_test_{id(object()):x}_"
    regions = [SHM_DIRECTORY / f"{prefix}{i}" for i in range(2)]
    other = SHM_DIRECTORY / f"triton_rerank_test_other_{id(object()):x}"
    for path in [*regions, other]:
        path.write_bytes(b"x")
    try:
        assert sorted(remove_shared_memory(prefix)) == sorted(p.name for p in regions)
        assert not any(p.exists() for p in regions) and other.exists()
    finally:
        for path in [*regions, other]:
            path.unlink(missing_ok=True)


# The restart policy and the loop that applies it.

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    # Outside it, no outgoing connection can take a port between its choice and the server's bind.
    low, high = ephemeral_port_range()
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert not any(low <= port <= high for port in ports), (ports, (low, high))
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_without_room_outside_the_ephemeral_range_let_the_kernel_pick(monkeypatch):
    monkeypatch.setattr("triton_rerank.launcher.server.ephemeral_port_range", lambda: (1024, 65535))
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p <= 65535 for p in ports)


def test_free_ports_skip_a_port_in_use(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        # The only two candidates: the port in use, then a free one.
        candidates = iter([port, port, free_ports(1)[0]])
        monkeypatch.setattr("random.SystemRandom.randint", lambda self, a, b: next(candidates))
        (chosen,) = free_ports(1)
        assert chosen != port


def test_backoff_doubles_up_to_its_cap_and_the_budget_runs_out():
    clock = Clock()
    budget = RestartBudget(RestartPolicy(max_restarts=6, window=600, backoff=1, max_backoff=10), clock)
    delays = []
    for _ in range(6):
        delays.append(budget.next_delay())
        clock.now += 5
    assert delays == [1, 2, 4, 8, 10, 10]
    assert budget.used == 6 and budget.next_delay() is None  # a 7th restart within 600 s: give up


def test_restarts_are_counted_over_a_sliding_window():
    clock = Clock()
    budget = RestartBudget(RestartPolicy(max_restarts=2, window=60, backoff=0.5), clock)
    assert budget.next_delay() == 0.5
    clock.now += 30
    assert budget.next_delay() == 1.0
    clock.now += 29
    assert budget.next_delay() is None  # two restarts in the last 59 s
    clock.now += 1
    # The first restart left the window: one more is allowed, its backoff as after one restart.
    assert budget.used == 1 and budget.next_delay() == 1.0
    clock.now += 120
    assert budget.used == 0 and budget.next_delay() == 0.5  # a quiet window starts the backoff over


def test_no_restarts_at_all():
    assert RestartBudget(RestartPolicy(max_restarts=0)).next_delay() is None


@pytest.mark.parametrize(("values", "message"), [
    ((-1, 600, 1), "0 or more"), ((5, 0, 1), "more than 0 seconds"), ((5, 600, -1), "0 to 30"),
    ((5, 600, 31), "0 to 30"),
])
def test_policy_refuses_nonsense(values, message):
    with pytest.raises(ValueError, match=message):
        RestartPolicy(*values)


def test_policy_from_the_command_line():
    import argparse

    from triton_rerank.launcher.restart import add_restart_options

    parser = argparse.ArgumentParser()
    add_restart_options(parser, max_restarts="3", window="60", backoff="0.5")  # string defaults, as from the environment
    assert restart_policy(parser.parse_args([])) == RestartPolicy(3, 60.0, 0.5)
    assert restart_policy(parser.parse_args(["--max-restarts", "0"])).max_restarts == 0


def test_exits_are_described():
    assert describe_exit(0) == "exited with code 0" and describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV (signal 11)"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL (signal 9)"


class CrashingServer:
    """Stands in for TritonServer: each start is a real process that ends as `exits` says, in turn."""

    log_file = None

    def __init__(self, exits: list[str], ready_errors: int = 0):
        self.exits = list(exits)
        self.ready_errors = ready_errors
        self.starts = 0
        self.process = None
        self.restart()

    def restart(self):
        code = self.exits.pop(0) if self.exits else "raise SystemExit(0)"
        self.process = subprocess.Popen([sys.executable, "-c", f"import os, signal; {code}"])
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 0) -> None:
        if self.ready_errors:
            self.ready_errors -= 1
            self.process.wait()
            raise LauncherError(f"tritonserver exited with code {self.process.returncode} while starting")

    def log_tail(self, lines: int = 30) -> str:
        return ""


def test_keeper_restarts_until_the_policy_gives_up():
    server = CrashingServer(["os.kill(os.getpid(), signal.SIGSEGV)", "raise SystemExit(3)", "os.kill(os.getpid(), 9)"])
    messages, pauses = [], []
    keeper = ServerKeeper(server, RestartPolicy(max_restarts=2, window=600, backoff=0.25), 5.0,
                          report=messages.append, sleep=pauses.append)
    assert keeper.run() == 1
    assert server.starts == 3 and keeper.restarts == 2 and pauses == [0.25, 0.5]
    text = "\n".join(messages)
    for expected in ("was killed by SIGSEGV (signal 11)", "exited with code 3", "was killed by SIGKILL (signal 9)",
                     "restarting tritonserver in 0.25 s (restart 1 of at most 2 restarts in 600 s)",
                     "tritonserver is ready again", "giving up on tritonserver: it needed more than 2 restarts within 600 s"):
        assert expected in text, text
    assert not process_running(server.process.pid)


def test_a_stopped_keeper_returns_instead_of_restarting():
    # A keeper in a thread of its own, told to stop before its server is stopped.
    server = CrashingServer(["import time; time.sleep(60)"])
    keeper = ServerKeeper(server, RestartPolicy(max_restarts=2, backoff=0), 5.0, report=lambda m: None)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(keeper.run()))
    thread.start()
    keeper.stop()
    server.process.kill()
    thread.join(10)
    assert outcome == [0] and server.starts == 1 and keeper.restarts == 0


def test_a_keeper_stopped_during_its_pause_restarts_nothing():
    server = CrashingServer(["raise SystemExit(3)"])
    keeper = ServerKeeper(server, RestartPolicy(max_restarts=2, backoff=0.5), 5.0, report=lambda m: None,
                          sleep=lambda s: keeper.stop())  # stop() arrives while the keeper waits to restart
    assert keeper.run() == 0
    assert server.starts == 1 and keeper.restarts == 0


def test_a_restart_that_does_not_get_ready_counts():
    # The first restart's server dies while loading its models; the second stays up (until this test ends it).
    server = CrashingServer(["raise SystemExit(1)", "raise SystemExit(1)", "import time; time.sleep(60)"],
                            ready_errors=1)
    messages = []
    keeper = ServerKeeper(server, RestartPolicy(max_restarts=2, window=600, backoff=0), 5.0,
                          report=messages.append, sleep=lambda s: None)
    assert keeper._bring_back() is True
    assert server.starts == 3 and keeper.restarts == 1 and keeper.budget.used == 2
    assert any("the restart failed: tritonserver exited with code 1 while starting" in m for m in messages), messages
    assert process_running(server.process.pid)
    server.process.kill()
    server.process.wait()
    assert not keeper._bring_back()  # the budget is spent
    assert "giving up" in messages[-1]


def test_keeper_without_restarts_reports_and_stops():
    server = CrashingServer(["raise SystemExit(2)"])
    messages = []
    assert ServerKeeper(server, RestartPolicy(max_restarts=0), 5.0, report=messages.append).run() == 1
    assert server.starts == 1 and messages == [f"tritonserver (pid {server.process.pid}) exited with code 2",
                                               "tritonserver is not restarted (--max-restarts 0)"]


# The stub supervisor, against a stand-in server with Triton's reload rule (real processes, no Triton).

FAKE_SERVER = r'''
import json, os, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

repo, stub = Path(sys.argv[1]), sys.argv[2]
counts = {"tokenizer": 2, "cross_encoder": 1}
failing = set(filter(None, os.environ.get("FAIL_ONCE", "").split(",")))
stubs, loaded = {}, {}


def version_dir(model):
    return repo / model / "1"


def load(model):
    loaded[model] = version_dir(model).stat().st_mtime_ns
    old, stubs[model] = stubs.get(model, []), [
        subprocess.Popen([stub, str(version_dir(model) / "model.py")]) for _ in range(counts[model])]
    # The replaced model's instances end a little later, as Triton unloads it.
    threading.Timer(0.5, lambda: [p.terminate() for p in old]).start()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        model = self.path.split("/")[4]
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("triton-rerank-admin") != "key":
            status = 403
        elif model in failing:
            failing.discard(model)
            status = 400
        else:
            # Triton's rule: a loaded model is loaded again only when its version directory is newer.
            if version_dir(model).stat().st_mtime_ns > loaded[model]:
                load(model)
            status = 200
        body = json.dumps({} if status == 200 else {"error": "refused"}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


for model in counts:
    load(model)
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


@pytest.fixture
def fake_triton(tmp_path):
    """A stand-in tritonserver: stub processes for two models and the repository load API."""
    import os

    started = []

    def start(fail_once: str = ""):
        for model in ("tokenizer", "cross_encoder"):
            (tmp_path / "repo" / model / "1").mkdir(parents=True, exist_ok=True)
            (tmp_path / "repo" / model / "1" / "model.py").write_text("import time\ntime.sleep(600)\n")
        stub = tmp_path / "triton_python_backend_stub"
        if not stub.exists():
            stub.symlink_to(sys.executable)
        (tmp_path / "server.py").write_text(FAKE_SERVER)
        process = subprocess.Popen([sys.executable, str(tmp_path / "server.py"), str(tmp_path / "repo"), str(stub)],
                                   stdout=subprocess.PIPE, text=True, start_new_session=True,
                                   env={**os.environ, "FAIL_ONCE": fail_once})
        started.append(process)
        port = int(process.stdout.readline())
        return process, f"127.0.0.1:{port}"

    yield start
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def wait_until(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_one(server_pid: int, model: str) -> int:
    import os

    pid = min(pid for pid, name in stub_models(server_pid).items() if name == model)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_supervisor_reloads_each_death_once(fake_triton, monkeypatch):
    import time

    from triton_rerank.launcher import supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "RETRY_SECONDS", 0.2)
    server, url = fake_triton(fail_once="cross_encoder")
    wait_until(lambda: sorted(stub_models(server.pid).values()) == ["cross_encoder", "tokenizer", "tokenizer"])
    supervisor = StubSupervisor(server.pid, url, ("triton-rerank-admin", "key"), interval=0.1)
    supervisor.start()
    try:
        # A refused reload is tried again until it succeeds.
        kill_one(server.pid, "cross_encoder")
        wait_until(lambda: supervisor.reloads.get("cross_encoder") == 1)
        # The second death of the same model: reloaded again (its files were marked as modified).
        killed = kill_one(server.pid, "cross_encoder")
        wait_until(lambda: supervisor.reloads.get("cross_encoder") == 2)
        assert killed not in stub_models(server.pid) and "cross_encoder" in stub_models(server.pid).values()
        # One instance of two: the model is reloaded once, though its other old instance ends afterwards.
        old = {pid for pid, model in stub_models(server.pid).items() if model == "tokenizer"}
        kill_one(server.pid, "tokenizer")
        wait_until(lambda: supervisor.reloads.get("tokenizer") == 1)
        wait_until(lambda: not old & set(stub_models(server.pid)))
        time.sleep(0.5)
        assert supervisor.reloads == {"cross_encoder": 2, "tokenizer": 1}
        # Two models at once.
        kill_one(server.pid, "tokenizer")
        kill_one(server.pid, "cross_encoder")
        wait_until(lambda: supervisor.reloads == {"cross_encoder": 3, "tokenizer": 2})
        # The server itself ends: its stubs are gone, and nothing is reloaded.
        server.kill()
        server.wait()
        time.sleep(0.5)
        assert supervisor.reloads == {"cross_encoder": 3, "tokenizer": 2} and supervisor.is_alive()
    finally:
        supervisor.stop()
        supervisor.join(5)


STOPPABLE = """
import time
from triton_rerank.launcher.server import StopRequested, stop_on_signals
stop_on_signals()
try:
    print("waiting", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
except StopRequested:
    print("stop requested", flush=True)
"""


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stop requested")])
def test_stop_signals_take_the_clean_path_even_when_started_ignoring_ctrl_c(sig, said):
    # As a shell starts a command with `&`: SIGINT ignored, which Python would otherwise keep.
    process = subprocess.Popen([sys.executable, "-c", STOPPABLE], stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert process.stdout.readline().strip() == "waiting"
        process.send_signal(sig)
        out, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert out.strip() == said
