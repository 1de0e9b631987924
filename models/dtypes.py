"""The activation dtypes the service runs in, by the names the command line and config.pbtxt use.

The names are importable without torch (command-line parsers list them); ``torch_dtype`` maps a
name to torch's dtype.
"""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")


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
