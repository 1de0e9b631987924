"""Fused residual add + LayerNorm over the last dim (forward only).

Supported:
- ``add_layer_norm(x, residual, weight, bias, eps)`` = LayerNorm(x + residual) with an affine
  weight and bias; ``residual=None`` gives a plain LayerNorm.
- x / residual: [..., hidden] in fp16 / bf16 / fp32 (same dtype and shape), last dim contiguous;
  leading dims are flattened into rows (row stride is an argument, so row-strided 2-D views work).
- weight / bias: [hidden], contiguous, x's dtype or fp32.
- hidden up to 16384: one row per program, the whole row in registers (BLOCK = next_power_of_2).
- statistics (mean, biased variance) and the normalisation in fp32; output in x's dtype.

Not supported: RMSNorm, no-affine LayerNorm, returning the pre-norm sum, backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, RowLaunchConfig, check_device, check_row_norm_inputs, row_num_warps

MAX_HIDDEN = 16384


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    stride_x,
    stride_r,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    # Upcast right after the load: the sum x + residual and the statistics are fp32, so fp16
    # inputs lose nothing before the normalisation (torch's fp16 layer_norm does the same).
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)

    mean = tl.sum(x, axis=0) / n_cols
    # Two-pass variance on the register-resident row: no E[x^2] - E[x]^2 cancellation. Padded
    # lanes are zeroed so they do not contribute (x - mean) ** 2.
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch_config(hidden: int) -> RowLaunchConfig:
    """BLOCK covers the whole row; warps grow with it so each thread keeps <= ~16 fp32 values."""
    block = triton.next_power_of_2(hidden)
    return RowLaunchConfig(block, row_num_warps(block))


def _check_inputs(x, residual, weight, bias, eps, dtypes):
    check_row_norm_inputs(x, residual, {"weight": weight, "bias": bias}, eps, MAX_HIDDEN, dtypes)


def add_layer_norm(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dim (residual may be None); returns a new tensor."""
    _check_inputs(x, residual, weight, bias, eps, dtypes=SUPPORTED_DTYPES)
    device = check_device(_add_layer_norm_fwd_kernel, x=x, residual=residual, weight=weight, bias=bias)
    hidden = x.shape[-1]
    # reshape is a view whenever the leading dims can be merged, a copy otherwise (still correct:
    # the kernel only reads x and residual); the last dim stays unit-stride either way.
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=device)
    out2 = out.view(-1, hidden)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out
    cfg = _launch_config(hidden)
    _add_layer_norm_fwd_kernel[(n_rows,)](
        x2,
        r2,  # unused when HAS_RESIDUAL is False; any valid pointer will do
        weight,
        bias,
        out2,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        hidden,
        float(eps),
        BLOCK=cfg.block,
        HAS_RESIDUAL=residual is not None,
        num_warps=cfg.num_warps,
    )
    return out


def add_layer_norm_reference(x, residual, weight, bias, eps):
    """torch version of ``add_layer_norm``: add and layer_norm in fp32 (float64 stays float64)."""
    _check_inputs(x, residual, weight, bias, eps, dtypes=SUPPORTED_DTYPES + (torch.float64,))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute)
    if residual is not None:
        h = h + residual.to(compute)
    y = torch.nn.functional.layer_norm(h, (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return y.to(x.dtype)
