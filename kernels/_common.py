"""Helpers shared by the Triton kernels of this package (host side only).

Nothing here launches a kernel: these are the input checks and launch-config rules the host
wrappers in ``varlen_attention.py``, ``layer_norm.py``, ``bias_gelu.py``, ``rms_norm.py`` and
``swiglu.py`` have in common, and those of the row-wise norms (``layer_norm.py``, ``rms_norm.py``:
one row of x [..., hidden] per program, an optional residual, per-column parameters and eps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

# Dtypes every kernel accepts; the math inside is always fp32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1.

    ``@triton.jit`` decides at decoration time whether it returns a compiled ``JITFunction`` or
    an ``InterpretedFunction``, so asking the kernel object is exact, whereas re-reading the
    environment variable later can disagree with how the module was imported.
    """
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=SUPPORTED_DTYPES) -> None:
    """Raise ValueError unless ``t`` is a tensor of an accepted dtype/rank with a unit last stride."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {names}")
    # Every kernel vectorises along the last dim and takes only the other strides as arguments.
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def check_device(kernel, **tensors) -> torch.device:
    """All tensors on one device, and a device the kernel can run on; returns that device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n}={d}" for n, d in devices.items())
            raise ValueError(f"all inputs must be on one device, got {listing} ({name} differs)")
    if not is_interpreted(kernel) and first.type != "cuda":
        raise ValueError(
            f"inputs are on {first}, but the Triton kernels need a CUDA device "
            "(set TRITON_INTERPRET=1 before importing the kernels to run them on CPU)"
        )
    return first


def check_row_norm_inputs(x, residual, params: dict, eps, max_hidden: int, dtypes) -> None:
    """The inputs of a row-wise norm over x's last dim, checked in argument order.

    x: [..., hidden] with 1 <= hidden <= max_hidden; residual: None or x's shape and dtype; params:
    name -> per-column parameter (weight, bias), [hidden], contiguous, in x's dtype or fp32; eps: a
    non-negative python number (the kernel takes it as a float: a tensor or a bool is a caller's bug).
    """
    check_tensor("x", x, dtypes=dtypes)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dim, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > max_hidden:
        raise ValueError(f"hidden size {hidden} exceeds the supported maximum {max_hidden}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=dtypes)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    for name, p in params.items():
        check_tensor(name, p, ndim=1, dtypes=dtypes)
        if p.shape[0] != hidden:
            raise ValueError(f"{name} must have shape [{hidden}] (x's last dim), got {tuple(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name} dtype {p.dtype} must be x's dtype ({x.dtype}) or float32")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative python float, got {eps!r}")


class RowLaunchConfig(NamedTuple):
    """Launch options of a one-row-per-program kernel: BLOCK columns (the whole row) and its warps."""

    block: int
    num_warps: int


def row_num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel (the rule Liger-Kernel's calculate_settings uses)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
