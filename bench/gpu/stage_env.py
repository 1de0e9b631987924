"""GPU-check stage 1, ``env``: versions, the card, and its measured dense matmul rate.

The measured bf16 rate, not the data-sheet peak, is the denominator of the encoder's model
FLOP utilisation: it is what this card, clocks and cuBLAS actually deliver.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess

import torch

from ...models.dtypes import torch_dtype
from ..report import cpu_model
from .stage_recorder import StageRecorder, error_text, guarded, log
from .timing import bench_ms

VERSIONED_MODULES = ("triton", "transformers", "tokenizers", "safetensors", "numpy")


def _record_versions(rec: StageRecorder) -> dict[str, str | None]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in VERSIONED_MODULES:
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:
            versions[mod] = f"unavailable ({error_text(exc)})"
    rec.data.update(versions)
    rec.set("triton_interpret", os.environ.get("TRITON_INTERPRET"))
    return versions


def _record_cuda_device(rec: StageRecorder) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    props = torch.cuda.get_device_properties(0)
    rec.data["device_name"] = props.name
    rec.data["capability"] = f"{props.major}.{props.minor}"
    rec.data["sm_count"] = props.multi_processor_count
    rec.data["memory_gib"] = round(props.total_memory / 2**30, 1)
    rec.set("device_count", torch.cuda.device_count())
    with guarded(rec, "nvidia-smi"):
        q = "name,driver_version,clocks.max.sm,clocks.max.memory,power.limit,temperature.gpu"
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15,
        )
        rec.set("nvidia_smi", (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "")


def _measure_matmul(rec: StageRecorder, device: str) -> None:
    # 8192^3 saturates an H100/H200; 512 keeps the CPU smoke run short.
    n = 8192 if device == "cuda" else 512
    rec.set("matmul_n", n)
    rates: dict[str, float] = {}
    for name in ("bfloat16", "float16"):
        with guarded(rec, f"matmul {name}"):
            dt = torch_dtype(name)
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            c = torch.empty(n, n, device=device, dtype=dt)
            ms = bench_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device, warmup=10, iters=50)
            rates[name] = 2.0 * n**3 / (ms * 1e-3) / 1e12
            rec.set("matmul_tflops", dict(rates))
            log(f"env: {name} {n}^3 matmul {ms:.3f} ms -> {rates[name]:.1f} TFLOP/s")
            del a, b, c


def stage_env(args: argparse.Namespace, rec: StageRecorder) -> None:
    versions = _record_versions(rec)
    if args.device == "cuda":
        _record_cuda_device(rec)
    else:
        rec.data["device_name"] = f"cpu ({cpu_model()}, {os.cpu_count()} cores)"
        rec.set("memory_gib", None)
    log(f"env: {rec.data.get('device_name')} torch {versions['torch']} triton {versions.get('triton')}")
    _measure_matmul(rec, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
