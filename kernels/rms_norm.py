"""RMSNorm over the last dim, optionally fused with the residual add before it (forward only).

Semantics are Hugging Face's Qwen3RMSNorm (also Llama's, Qwen2's, Mistral's), rounding included:

    h   = x.float()                              # or, with a residual: s = residual + x in x's
                                                 # dtype (the new residual stream), h = s.float()
    y   = h * rsqrt(mean(h ** 2) + eps)          # fp32
    out = weight * y.to(x.dtype)                 # rounded to x's dtype

Supported:
- ``rms_norm(x, weight, eps)`` -> out; ``rms_norm(x, weight, eps, residual=r)`` -> (out, s) with
  s = r + x rounded to x's dtype, exactly what a pre-norm decoder's
  ``hidden_states = residual + hidden_states`` followed by the next norm computes (the norm reads
  the rounded s, so low-precision models keep HF's rounding of the residual stream).
- x / residual: [..., hidden] in fp16 / bf16 / fp32 (same dtype and shape), last dim contiguous.
  The dim before hidden and the (merged) dims before that keep their own strides, so per-head q/k
  norms on [tokens, heads, head_dim] views into a fused QKV projection run without a copy; leading
  dims that cannot merge into one strided dim are copied first.
- weight: [hidden], contiguous, x's dtype or fp32. In x's dtype the product is bit-for-bit HF's
  (the fp32 product of two fp16 / bf16 values is exact, then rounded once); with an fp32 weight
  the product is rounded to x's dtype, where HF would return fp32.
- hidden up to 16384: one row per program, the whole row in registers (BLOCK = next_power_of_2).
- outputs are new contiguous tensors shaped like x, in x's dtype.

Not supported: a weight offset (Gemma's 1 + weight), casting to the weight's dtype, in-place
outputs, backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, RowLaunchConfig, check_device, check_row_norm_inputs, row_num_warps

MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    S,
    stride_xt,
    stride_xh,
    stride_rt,
    stride_rh,
    n_inner,  # rows per index of the outer leading dim (heads of a [tokens, heads, head_dim] input)
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    x = tl.load(X + outer * stride_xt + inner * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + outer * stride_rt + inner * stride_rh + cols, mask=mask, other=0.0)
        # The residual stream is kept in x's dtype (HF adds in the model dtype), and the norm
        # reads that rounded sum. fp32 has more than 2p + 2 bits for p = 11 (fp16) or 8 (bf16),
        # so rounding the fp32 sum again gives the correctly rounded low-precision sum.
        s = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * n_cols + cols, s, mask=mask)
        h = s.to(tl.float32)
    else:
        h = x.to(tl.float32)

    # Padded lanes load 0 and add nothing to the sum of squares.
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    # Round the normalised row to x's dtype before the weight, as HF does; the product of two
    # fp16/bf16 values is exact in fp32, so the single rounding below matches a low-precision multiply.
    y = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (y * w).to(Y.dtype.element_ty), mask=mask)


def _launch_config(hidden: int) -> RowLaunchConfig:
    """BLOCK covers the whole row. Rows below 1024 (per-head norms: head_dim 64/128) get fewer
    warps: 4 warps on a 128-wide row would hold one value per thread and need a cross-warp
    (shared memory) reduction, one warp reduces with shuffles alone."""
    block = triton.next_power_of_2(hidden)
    num_warps = row_num_warps(block) if block >= 1024 else max(1, block // 256)
    return RowLaunchConfig(block, num_warps)


def _check_inputs(x, weight, eps, residual, dtypes):
    check_row_norm_inputs(x, residual, {"weight": weight}, eps, MAX_HIDDEN, dtypes)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[outer, inner, hidden] view (a copy only when leading dims before the last two cannot merge)."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def rms_norm(x, weight, eps, residual=None):
    """Qwen3RMSNorm(x) -> out, or with ``residual``: s = residual + x, Qwen3RMSNorm(s) -> (out, s)."""
    _check_inputs(x, weight, eps, residual, dtypes=SUPPORTED_DTYPES)
    device = check_device(_rms_norm_fwd_kernel, x=x, weight=weight, residual=residual)
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=device) if residual is not None else None
    n_rows = x.numel() // hidden
    if n_rows > 0:
        x3 = _as_3d(x)
        r3 = _as_3d(residual) if residual is not None else x3
        cfg = _launch_config(hidden)
        _rms_norm_fwd_kernel[(n_rows,)](
            x3,
            r3,  # unused when HAS_RESIDUAL is False; any valid pointer will do
            weight,
            out,
            summed if summed is not None else out,  # likewise
            x3.stride(0),
            x3.stride(1),
            r3.stride(0),
            r3.stride(1),
            x3.shape[1],
            hidden,
            float(eps),
            BLOCK=cfg.block,
            HAS_RESIDUAL=residual is not None,
            num_warps=cfg.num_warps,
        )
    return out if residual is None else (out, summed)


def rms_norm_reference(x, weight, eps, residual=None):
    """torch version of ``rms_norm``, HF's arithmetic step for step (float64 inputs stay float64)."""
    _check_inputs(x, weight, eps, residual, dtypes=SUPPORTED_DTYPES + (torch.float64,))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    summed = None if residual is None else residual + x
    h = (x if summed is None else summed).to(compute)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.to(compute) * y.to(x.dtype).to(compute)).to(x.dtype)
    return out if residual is None else (out, summed)
