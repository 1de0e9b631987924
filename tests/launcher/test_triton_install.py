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


def test_server_environment_sets_allocator_defaults_the_caller_can_override(monkeypatch):
    install = TritonInstall.find()
    defaults = {"MALLOC_ARENA_MAX": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16",
                "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"}
    for name in defaults:
        monkeypatch.delenv(name, raising=False)
    env = server_environment(install)
    assert {name: env[name] for name in defaults} == defaults
    chosen = {"MALLOC_ARENA_MAX": "4", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "MALLOC_CONF": "narenas:2"}
    for name, value in chosen.items():
        monkeypatch.setenv(name, value)
    env = server_environment(install)
    assert {name: env[name] for name in defaults} == chosen
