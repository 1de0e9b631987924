"""Finding tritonserver (the wheel's, or an installed one) and the environment it runs in."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.triton_install import (
    SYSTEM_BACKEND_DIRECTORY,
    TritonInstall,
    check_stub_environment,
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


def test_the_wheel_is_found_without_importing_pytriton():
    # pytriton's own __init__ imports its client stack (pyzmq, sh, tritonclient): a machine that
    # has the wheel's files but not those packages must still find the server.
    probe = ("import sys; from triton_rerank.launcher.triton_install import TritonInstall; "
             "assert TritonInstall.find().server.is_file(); print(sorted(m for m in sys.modules if 'pytriton' in m))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_the_stub_environment_of_this_python_passes():
    check_stub_environment()


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_numpy_2_is_refused_with_the_fix(tmp_path):
    with pytest.raises(LauncherError, match=r"numpy 2\.5\.2 in .*misreads text tensors.*pip install 'numpy<2'"):
        check_stub_environment(fake_python(tmp_path, "echo 2.5.2"))


def test_an_environment_that_has_the_package_only_on_pythonpath_is_refused(tmp_path, monkeypatch):
    # A bare venv sees neither numpy nor triton_rerank; PYTHONPATH pointing at them does not count,
    # since the stubs run Python isolated.
    venv.create(tmp_path / "bare", with_pip=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    with pytest.raises(LauncherError, match=r"No module named .*run Python isolated, without PYTHONPATH.*pip install -e"):
        check_stub_environment(str(tmp_path / "bare" / "bin" / "python"))


def test_a_python_that_cannot_run_is_refused(tmp_path):
    with pytest.raises(LauncherError, match="cannot run .*/missing/python"):
        check_stub_environment(str(tmp_path / "missing" / "python"))
