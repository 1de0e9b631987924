"""The one hardened tritonserver command line, and the server object that runs it."""

from pathlib import Path

import pytest

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.server import (
    ADMIN_HEADER,
    REDACTED_KEY,
    ServerAddress,
    TritonServer,
    server_command,
)
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
                                               ServerAddress(), key, extra_args=["--exit-timeout-secs=3"])
    # Each server has its own key, and a printable command without it.
    assert TritonServer(tmp_path / "repo", tmp_path, ServerAddress()).admin_header[1] != key
    assert key not in " ".join(bundled.command(redact=True)) and REDACTED_KEY in " ".join(bundled.command(redact=True))

    image = TritonServer(Path("/tmp/model_repository"), Path("/tmp"), ServerAddress("0.0.0.0"), log_file="-",
                         install=TritonInstall.system(), gpu_metrics=True)
    assert image.command(redact=True) == server_command(
        "tritonserver", Path("/tmp/model_repository"), Path("/opt/tritonserver/backends"), ServerAddress("0.0.0.0"),
        REDACTED_KEY, gpu_metrics=True)
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
