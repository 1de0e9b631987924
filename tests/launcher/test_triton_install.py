"""Finding tritonserver (the wheel's, or an installed one) and the environment it runs in."""

import sys
from pathlib import Path

import pytest

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.triton_install import (
    SYSTEM_BACKEND_DIRECTORY,
    TritonInstall,
    prepare_backends,
    server_environment,
)


def test_bundled_server_and_its_environment():
    install = TritonInstall.find()
    assert install.bundled and install.server.is_file() and install.stub.is_file()
    env = server_environment(install)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert str(install.libs) in env["LD_LIBRARY_PATH"]


def test_bundled_backends_are_prepared_in_the_run_directory(tmp_path):
    install = TritonInstall.find()
    backends = prepare_backends(install, tmp_path)
    assert backends == install.backend_path(tmp_path) == tmp_path / "backends"
    assert (backends / "python" / "triton_python_backend_stub").is_file()
    assert (backends / "python" / "libtriton_python.so").is_file()


def test_installed_server_uses_its_own_backends(tmp_path, monkeypatch):
    """The NGC image: tritonserver on PATH, backends in /opt/tritonserver/backends, nothing copied."""
    install = TritonInstall.system()
    assert (install.server, install.backend_directory) == (Path("tritonserver"), SYSTEM_BACKEND_DIRECTORY)
    assert not install.bundled
    assert prepare_backends(install, tmp_path) == SYSTEM_BACKEND_DIRECTORY and not any(tmp_path.iterdir())
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/lib64")
    env = server_environment(install)
    assert env["LD_LIBRARY_PATH"] == "/usr/local/cuda/lib64"  # the image's own libraries, untouched
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    with pytest.raises(LauncherError, match="not the tritonserver of the nvidia-pytriton wheel"):
        _ = install.stub
