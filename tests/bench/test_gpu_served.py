"""The GPU check's served stage and its carry folder, rehearsed on the CPU.

The served stage runs here in its smoke form (tiny model, the real tritonserver, async gRPC
clients); the carry folder is packed and unpacked as on a GPU machine without tritonserver,
tritonclient or the data files."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from triton_rerank.bench.gpu import carry, results
from triton_rerank.bench.workload import CONFIG_FILE, DL19_FILE, TOKENIZER_FILE, resolve_data_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.server
def test_served_stage_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "triton_rerank.bench.gpu.check", "--device", "cpu", "--quick", "--only", "served",
         "--out", str(out), "--max-minutes", "5"],
        capture_output=True, text=True, timeout=400, cwd=REPO)
    data = json.loads((out / results.RESULTS_JSON).read_text())
    served = data["stages"]["served"]
    assert served["status"] == "ok", run.stdout[-3000:] + run.stderr[-3000:]
    levels = served["data"]["levels"]
    assert [(level["docs"], level["concurrency"]) for level in levels] == [(20, 1), (20, 2)]
    for level in levels:
        assert level["requests"] >= 1 and level["pairs"] == 20 * level["requests"]
        # TOKEN_COUNTS came back from the ensemble: at least a few tokens per pair.
        assert level["tokens"] >= 4 * level["pairs"] and level["tflops"] > 0
        assert 0 < level["p50_ms"] <= level["p99_ms"]
        assert level["encoder_ms_per_request"] > 0  # the server's own metrics were read
    assert served["data"]["server_ready_s"] > 0
    markdown = (out / results.RESULTS_MD).read_text()
    assert "## Served (tritonserver, the `reranker` ensemble, gRPC)" in markdown
    # The other stages were left out, not run.
    assert {data["stages"][n]["status"] for n in ("env", "tests", "attention", "encoder")} == {"skipped"}


def test_served_levels_get_mfu_and_the_ratio_to_the_in_process_encoder():
    run = {"stages": {
        "env": {"data": {"matmul_tflops": {"float16": 500.0, "bfloat16": 520.0}}},
        "encoder": {"data": {"variants": {"packed_triton": {"pairs_per_s": 4000.0, "tflops": 100.0}}}},
        "served": {"data": {"dtype": "float16", "levels": [
            {"docs": 100, "concurrency": 16, "pairs_per_s": 3000.0, "tflops": 50.0},
            {"docs": 100, "concurrency": 32, "error": "skipped: stage deadline near"}]}},
    }}
    results.compute_derived(run)
    served = run["stages"]["served"]["data"]
    assert served["levels"][0]["mfu"] == pytest.approx(0.1)  # the run's dtype's rate, not bf16's
    assert served["levels"][0]["vs_in_process"] == pytest.approx(0.75)
    assert served["in_process_pairs_per_s"] == 4000.0
    assert "mfu" not in served["levels"][1]
    markdown = results.render_markdown(run)
    assert "| 100 | 16 |" in markdown and "skipped: stage deadline near" in markdown


def fake_wheel(path: Path) -> Path:
    """A wheel laid out as nvidia-pytriton's: the server binary and a stub per Python (3.13's with its own
    libpython), without permission bits."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("pytriton/__init__.py", "")
        wheel.writestr("pytriton/tritonserver/bin/tritonserver", "#!/bin/sh\necho server\n")
        for version in ("3.11", "3.12", "3.13"):
            wheel.writestr(f"pytriton/tritonserver/python_backend_stubs/{version}/triton_python_backend_stub", "stub")
        wheel.writestr("nvidia_pytriton.libs/libtritonserver.so", "lib")
        wheel.writestr("nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0", "libpython")
    return path


def fake_numpy_wheel(tmp_path: Path) -> Path:
    path = tmp_path / "numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("numpy/__init__.py", "")
    return path


def test_the_server_wheel_keeps_only_the_gpu_pythons_stub(tmp_path):
    source = fake_wheel(tmp_path / "nvidia_pytriton-0.7.0-py3-none-any.whl")
    for version, kept in (("3.12", "3.12"), ("3.13", "3.13")):
        trimmed = tmp_path / f"trimmed-{version}.whl"
        carry.trim_wheel(source, trimmed, version)
        with zipfile.ZipFile(trimmed) as wheel:
            names = wheel.namelist()
            assert {e.compress_type for e in wheel.infolist()} == {zipfile.ZIP_LZMA}
            assert wheel.read("pytriton/tritonserver/bin/tritonserver") == b"#!/bin/sh\necho server\n"
        stubs = [n.split("/")[3] for n in names if "python_backend_stubs" in n]
        assert stubs == [kept]
        assert ("nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0" in names) == (version == "3.13")
        assert "nvidia_pytriton.libs/libtritonserver.so" in names


def data_folder(tmp_path: Path) -> Path:
    """The shared data folder when it is here, else small files of the same names."""
    shared = resolve_data_dir(None)
    if shared is not None and all((shared / f).is_file() for f in carry.DATA_FILES):
        return shared
    data = tmp_path / "data"
    for name in (DL19_FILE, TOKENIZER_FILE, CONFIG_FILE):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("{}\n")
    return data


def test_carry_is_packed_small_and_unpacked_where_things_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    data = data_folder(tmp_path)
    folder = tmp_path / "carry"
    size = carry.prepare(folder, data, fake_wheel(tmp_path / "nvidia_pytriton-0.7.0-py3-none-any.whl"),
                         carried_wheels=[fake_numpy_wheel(tmp_path)])
    assert size == carry.folder_bytes(folder) < carry.LIMIT_BYTES - carry.CHECKOUT_RESERVE_BYTES
    assert (folder / "site" / "tritonclient" / "grpc" / "__init__.py").is_file()
    assert [w.name for w in (folder / carry.CARRIED_WHEELS).iterdir()] == [fake_numpy_wheel(tmp_path).name]
    assert not list(folder.rglob("__pycache__"))
    with tarfile.open(folder / carry.DATA_ARCHIVE) as archive:
        assert sorted(archive.getnames()) == sorted(carry.DATA_FILES)

    done = carry.unpack(folder, tmp_path / "scratch", installed=lambda module: False)
    unpacked = Path(done["data_dir"])
    for name in carry.DATA_FILES:
        assert (unpacked / name).read_bytes() == (data / name).read_bytes()
    site = tmp_path / "scratch" / "site"
    server = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    assert server.stat().st_mode & stat.S_IXUSR
    assert (site / "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub").stat().st_mode & stat.S_IXUSR
    assert (site / "nvidia_pytriton.libs" / "libtritonserver.so").is_file()
    assert sys.path[:2] == [str(site), str(folder / "site")]
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(site), str(folder / "site"), "/elsewhere"]
    assert subprocess.run([str(server)], capture_output=True, text=True).stdout == "server\n"


def test_unpack_leaves_what_is_installed_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    folder = tmp_path / "carry"
    folder.mkdir()
    fake_wheel(folder / "nvidia_pytriton-0.7.0-py3-none-any.whl")
    shutil.copytree(Path(__import__("tritonclient").__file__).parent, folder / "site" / "tritonclient")
    done = carry.unpack(folder, tmp_path / "scratch", installed=lambda module: True)
    assert set(done) == {"carry"}
    assert not (tmp_path / "scratch" / "site").exists() and os.environ["PYTHONPATH"] == ""


def test_carry_refuses_what_a_device_call_cannot_take(tmp_path, monkeypatch):
    monkeypatch.setattr(carry, "LIMIT_BYTES", carry.CHECKOUT_RESERVE_BYTES + 1024)
    with pytest.raises(ValueError, match="more than the 0 MiB a device call can carry"):
        carry.prepare(tmp_path / "carry", data_folder(tmp_path), fake_wheel(tmp_path / "nvidia_pytriton-0.7.0.whl"),
                      carried_wheels=[])
    with pytest.raises(ValueError, match="lacks"):
        carry.prepare(tmp_path / "carry2", tmp_path / "empty", fake_wheel(tmp_path / "nvidia_pytriton-0.7.0.whl"),
                      carried_wheels=[])
