"""What the GPU check brings to a GPU machine that lacks it, packed here and unpacked there.

The GPU machine has torch, triton, transformers, tokenizers, grpcio and protobuf, but no
tritonserver, no tritonclient and no network, and numpy 2 (the bundled server's backend stub needs
numpy<2). The ``served`` stage needs the first three of:

    nvidia_pytriton-0.7.0-*.whl   the bundled tritonserver 2.51, cut to the backend stub of the GPU machine's
                                  Python and recompressed (26 MB instead of 55; unpacked there, not installed)
    site/tritonclient/            tritonclient's Python package (~1 MB; its perf_analyzer is not needed)
    wheels/                       python-rapidjson (tritonclient imports it) and numpy<2, at the versions
                                  installed here, built for CPython 3.12, the GPU image's Python
                                  (``--python-version`` for another): 19 MB
    data.tar.xz                   DL19, the XLM-R tokenizer and the model configs (~3 MB instead of ~19)
    decoder-data.tar.xz           the ``decoder`` stage's Qwen3 tokenizer and Qwen3-Reranker 0.6B and 4B
                                  configs (~1.9 MB instead of ~11; packed when the data folder has them)

Together they stay under the 64 MiB a device call may carry beside the checkout. The backend stubs
run Python isolated (no PYTHONPATH), so the project and the wheels are installed there first::

    python -m triton_rerank.bench.gpu.carry --out .gpu-carry          # here (downloads the wheels)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . .gpu-carry/wheels/*.whl   # there
    python3 -P bench/gpu/check.py --out OUT --carry .gpu-carry ...    # there, carrying .gpu-carry

`unpack` (called by check.py before any stage) extracts what is missing into a scratch folder and
puts it on sys.path and PYTHONPATH, so the stage processes and tritonserver see it too; whatever
the machine already has is left alone. Both data archives unpack into one data folder, the check's
default --data-dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..random_model import QWEN3_RERANKER_CONFIG_FILES, QWEN3_TOKENIZER_FILE
from ..workload import CONFIG_FILE, DL19_FILE, TOKENIZER_FILE, resolve_data_dir

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
WHEEL_GLOB = "nvidia_pytriton-*.whl"
# Installed on the GPU machine before the check: tritonclient's grpc and http modules import rapidjson,
# which the GPU image lacks, and the wheel's backend stub misreads text tensors under the image's numpy 2.
CARRIED_DISTRIBUTIONS = ("python-rapidjson", "numpy")
CARRIED_WHEELS = "wheels"
GPU_PYTHON_VERSION = "3.12"
DATA_ARCHIVE = "data.tar.xz"
SITE = "site"
DATA_FILES = (DL19_FILE, TOKENIZER_FILE, CONFIG_FILE)
# The decoder stage's files (the Qwen3 tokenizer, the configs of the shapes it runs), in an archive
# of their own: packed when the data folder has them.
DECODER_DATA_ARCHIVE = "decoder-data.tar.xz"
DECODER_DATA_FILES = (QWEN3_TOKENIZER_FILE, QWEN3_RERANKER_CONFIG_FILES["0.6B"], QWEN3_RERANKER_CONFIG_FILES["4B"])
LIMIT_BYTES = 64 * 1024 * 1024
# Left for the checkout itself, which travels in the same 64 MiB.
CHECKOUT_RESERVE_BYTES = 4 * 1024 * 1024


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def download_carried_wheels(into: Path, python_version: str) -> None:
    """Binary wheels of what the GPU image lacks or has at a version that fails, at the versions installed here."""
    from importlib.metadata import version

    requirements = [f"{dist}=={version(dist)}" for dist in CARRIED_DISTRIBUTIONS]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--implementation=cp", f"--python-version={python_version}", *platforms, "-d", str(into),
                    *requirements], check=True)


def trim_wheel(source: Path, target: Path, python_version: str) -> None:
    """The nvidia-pytriton wheel with only the backend stub of CPython `python_version`, LZMA-compressed.

    The wheel holds a stub per Python 3.8-3.13 and, for 3.13's, its own libpython (13 of its 55 MB);
    only the stub the GPU machine's Python loads is kept. LZMA (which `zipfile` unpacks) halves the rest.
    """
    minor = python_version.split(".")[1]
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_LZMA) as trimmed:
        for entry in wheel.infolist():
            name = entry.filename
            other_stub = "/python_backend_stubs/" in name and f"/python_backend_stubs/3.{minor}/" not in name
            other_libpython = name.startswith("nvidia_pytriton.libs/libpython3") and f".{minor}.so" not in name
            if not (other_stub or other_libpython):
                trimmed.writestr(entry, wheel.read(name), compress_type=zipfile.ZIP_LZMA)


def prepare(out: Path, data_dir: Path | None, wheel: Path | None = None, carried_wheels: list[Path] | None = None,
            python_version: str = GPU_PYTHON_VERSION) -> int:
    """Writes the carry folder; returns its size in bytes (ValueError when it would not fit).

    `wheel`: an nvidia-pytriton wheel already here; `carried_wheels`: the wheels of CARRIED_DISTRIBUTIONS
    already here (each None: pip download, the latter for CPython `python_version`).
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if wheel is not None:  # copied first: it may be the folder's own wheel, re-packed in place
            wheel = Path(shutil.copy2(wheel, scratch))
        for old in out.glob(WHEEL_GLOB):
            old.unlink()
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", scratch,
                            PYTRITON_REQUIREMENT], check=True)
            wheel = next(Path(scratch).glob(WHEEL_GLOB))
        trim_wheel(wheel, out / wheel.name, python_version)

    wheels = out / CARRIED_WHEELS
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    if carried_wheels is None:
        download_carried_wheels(wheels, python_version)
    else:
        for carried in carried_wheels:
            shutil.copy2(carried, wheels / carried.name)

    import tritonclient

    site = out / SITE
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(Path(tritonclient.__file__).parent, site / "tritonclient",
                    ignore=shutil.ignore_patterns("__pycache__"))

    if data_dir is None:
        raise ValueError("no data folder: pass --data-dir (it holds " + ", ".join(DATA_FILES) + ")")
    missing = [f for f in DATA_FILES if not (data_dir / f).is_file()]
    if missing:
        raise ValueError(f"{data_dir} lacks {', '.join(missing)}")
    with tarfile.open(out / DATA_ARCHIVE, "w:xz", preset=9) as archive:
        for name in DATA_FILES:
            archive.add(data_dir / name, arcname=name)
    (out / DECODER_DATA_ARCHIVE).unlink(missing_ok=True)
    decoder_files = [f for f in DECODER_DATA_FILES if (data_dir / f).is_file()]
    if decoder_files:
        # Preset 3: 1.85 MB in 3 s where 9 takes 8 s for 1.42 MB (the Qwen3 tokenizer.json, 11 MB).
        with tarfile.open(out / DECODER_DATA_ARCHIVE, "w:xz", preset=3) as archive:
            for name in decoder_files:
                archive.add(data_dir / name, arcname=name)

    size = folder_bytes(out)
    if size > LIMIT_BYTES - CHECKOUT_RESERVE_BYTES:
        raise ValueError(f"{out} holds {size / 2**20:.1f} MiB: more than the "
                         f"{(LIMIT_BYTES - CHECKOUT_RESERVE_BYTES) / 2**20:.0f} MiB a device call can carry with the checkout")
    return size


def missing_decoder_files(data_dir: Path | None) -> list[str]:
    """The decoder stage's files the data folder lacks (they are left out of the carry folder)."""
    return [f for f in DECODER_DATA_FILES if data_dir is None or not (data_dir / f).is_file()]


def _extract(archive_file: Path, into: Path) -> None:
    with tarfile.open(archive_file) as archive:
        # The "data" filter (no links out, no absolute paths) where this Python has it.
        archive.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _on_path(folder: Path) -> None:
    """First on sys.path, and on PYTHONPATH for every process started from here on."""
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)


def _make_executable(root: Path) -> None:
    """zipfile drops permission bits: the server and the backend stubs must be executable."""
    targets = [*root.glob("pytriton/tritonserver/bin/*"),
               *root.glob("pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub")]
    for path in targets:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def unpack(carry: Path, scratch: Path, installed: Callable[[str], bool] = _installed) -> dict:
    """Makes what the carry folder holds usable here; returns what it did (for the results)."""
    done: dict = {"carry": str(carry)}
    site = scratch / "site"
    data = scratch / "data"
    for archive in (DATA_ARCHIVE, DECODER_DATA_ARCHIVE):
        if (carry / archive).is_file():
            _extract(carry / archive, data)
            done["data_dir"] = str(data)
    if not installed("tritonclient") and (carry / SITE / "tritonclient").is_dir():
        _on_path(carry / SITE)
        done["tritonclient"] = str(carry / SITE)
    wheels = sorted(carry.glob(WHEEL_GLOB))
    if not installed("pytriton") and wheels:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(site)
        _make_executable(site)
        _on_path(site)
        done["pytriton"] = f"{wheels[-1].name} unpacked in {site}"
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m triton_rerank.bench.gpu.carry",
        description="Pack what the GPU check's served and decoder stages need on a GPU machine without it (the "
        "bundled tritonserver wheel, tritonclient, the data files) into one folder to carry with the device call.")
    p.add_argument("--out", default=".gpu-carry", help="the folder to write (default .gpu-carry, ignored by git)")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: the usual places)")
    p.add_argument("--wheel", default=None, help=f"an {PYTRITON_REQUIREMENT} wheel already here (default: pip download)")
    p.add_argument("--python-version", default=GPU_PYTHON_VERSION,
                   help=f"the GPU machine's Python: its backend stub is kept and the carried wheels are built for it "
                   f"(default {GPU_PYTHON_VERSION})")
    args = p.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    try:
        size = prepare(Path(args.out), data_dir, Path(args.wheel) if args.wheel else None,
                       python_version=args.python_version)
    except (ValueError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if missing := missing_decoder_files(data_dir):
        print(f"warning: {data_dir} lacks {', '.join(missing)}: the decoder stage needs them", file=sys.stderr)
    print(f"{args.out}: {size / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB with the checkout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
