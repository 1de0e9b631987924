"""The activation dtypes the service runs in, by the names the command line and config.pbtxt use.

The names are importable without torch (command-line parsers list them); ``torch_dtype`` maps a
name to torch's dtype. ``auto_dtype`` is what `dtype=auto` means on a device.
"""

from __future__ import annotations

from pathlib import Path

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Weight quantization of the encoder's linears: none, or int8 (CPUs; models/int8_linear.py).
QUANTIZE_NAMES = ("none", "int8")

# CPU flags (Linux /proc/cpuinfo) of bf16 matrix instructions, which torch's CPU kernels (oneDNN)
# use for bfloat16 matmuls: Intel AMX, or AVX512-BF16 (Intel Cooper Lake on, AMD Zen 4 on).
_BF16_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


# CPU flags of int8 dot-product instructions, which torch's int8 matmul (oneDNN) uses.
INT8_FLAGS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"))


def int8_instructions(flags: set[str] | None = None) -> list[str]:
    """Names of the int8 dot-product instructions this CPU has (empty: none)."""
    flags = cpu_flags() if flags is None else flags
    return [name for flag, name in INT8_FLAGS if flag in flags]


def auto_dtype(device_type: str, flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) that dtype=auto picks: float16 on CUDA; on a CPU bfloat16 where it has bf16
    matrix instructions (AMX or AVX512-BF16: 2-2.5x float32's matmul rate), else float32."""
    if device_type == "cuda":
        return "float16", "CUDA"
    flags = cpu_flags() if flags is None else flags
    for flag, name in _BF16_FLAGS:
        if flag in flags:
            return "bfloat16", f"this CPU has {name}"
    return "float32", "this CPU has no AMX or AVX512-BF16"


def torch_dtype(name: str):
    """torch's dtype for one of DTYPE_NAMES; ValueError naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def check_torch_dtype(dtype) -> None:
    """ValueError unless dtype is the torch dtype of one of DTYPE_NAMES."""
    if str(dtype).removeprefix("torch.") not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype}")
