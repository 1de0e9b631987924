"""Fused bias add + exact (erf) GELU, forward only.

Supported:
- ``bias_gelu(x, bias)`` = gelu(x + bias, approximate="none") with ``bias`` broadcast over the
  leading dims of x.
- x: [..., cols] contiguous, fp16 / bf16 / fp32; bias: [cols], contiguous, x's dtype or fp32.
- flat elementwise kernel over x.numel() elements; math in fp32 (``tl.math.erf``), output in x's
  dtype.

Not supported: the tanh approximation, backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device, check_tensor, is_interpreted


@triton.jit
def _bias_gelu_fwd_kernel(
    X,
    B,
    Y,
    n_elements,
    n_cols,
    BLOCK: tl.constexpr,
):
    # int64 offsets: an activation of rows * intermediate_size can exceed 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    h = x + b
    # Exact GELU as torch defines it: 0.5 * h * (1 + erf(h / sqrt(2))).
    y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


class BiasGeluLaunchConfig(NamedTuple):
    block: int
    num_warps: int


def _launch_config(on_gpu: bool = True) -> BiasGeluLaunchConfig:
    # 1024 elements x 4 warps = 8 per thread: 16-byte vector loads for fp16 and enough bytes in
    # flight per SM. Under the interpreter, bigger blocks mean fewer (slow) Python-level programs.
    return BiasGeluLaunchConfig(1024, 4) if on_gpu else BiasGeluLaunchConfig(4096, 4)


def _check_inputs(x, bias, dtypes):
    check_tensor("x", x, dtypes=dtypes)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (flat kernel), got strides {tuple(x.stride())}")
    check_tensor("bias", bias, ndim=1, dtypes=dtypes)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must have shape [{x.shape[-1]}] (x's last dim), got {tuple(bias.shape)}")
    if bias.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"bias dtype {bias.dtype} must be x's dtype ({x.dtype}) or float32")


def bias_gelu(x, bias):
    """gelu(x + bias) with the exact erf GELU; returns a new tensor shaped like x."""
    _check_inputs(x, bias, dtypes=SUPPORTED_DTYPES)
    device = check_device(_bias_gelu_fwd_kernel, x=x, bias=bias)
    out = torch.empty(x.shape, dtype=x.dtype, device=device)
    n = x.numel()
    if n == 0:
        return out
    cfg = _launch_config(on_gpu=not is_interpreted(_bias_gelu_fwd_kernel))
    grid = (triton.cdiv(n, cfg.block),)
    _bias_gelu_fwd_kernel[grid](x, bias, out, n, x.shape[-1], BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out


def bias_gelu_reference(x, bias):
    """torch version of ``bias_gelu``: fp32 math (float64 stays float64), cast back to x's dtype."""
    _check_inputs(x, bias, dtypes=SUPPORTED_DTYPES + (torch.float64,))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.gelu(x.to(compute) + bias.to(compute), approximate="none")
    return y.to(x.dtype)
