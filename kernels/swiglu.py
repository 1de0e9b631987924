"""SwiGLU activation on a fused gate/up projection: silu(gate) * up, forward only.

Supported:
- ``silu_mul(gate_up)`` with gate_up [..., 2 * intermediate]: gate is the first half of the last
  dim and up the second (gate_proj and up_proj weights concatenated along the output dim, as a
  packed Llama / Qwen MLP runs them as one matmul); returns [..., intermediate].
- fp16 / bf16 / fp32, last dim contiguous; a row stride is an argument (leading dims that cannot
  merge into one strided dim are copied first). The output is a new contiguous tensor in
  gate_up's dtype.
- math in fp32, one rounding at the end. Hugging Face's ``act_fn(gate_proj(x)) * up_proj(x)``
  rounds twice in low precision (silu's result, then the product), so the two differ by up to
  ~1.5 units in the last place of the output dtype; against a float64 reference this kernel is
  the more accurate of the two.

Not supported: other activations (GELU-gated MLPs), separate gate and up tensors, backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device, check_tensor, is_interpreted

# Grid axis 1 (column blocks of one row) is limited to 65535 programs.
_MAX_COL_BLOCKS = 65535


@triton.jit
def _silu_mul_fwd_kernel(
    GU,
    Y,
    stride_gu,
    stride_y,
    n_cols,  # intermediate size: up starts n_cols elements after gate
    BLOCK: tl.constexpr,
):
    # Rows on axis 0 (up to 2**31 - 1 programs), column blocks on axis 1: no integer division per
    # element to find the row, and row strides come for free.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptr = GU + row * stride_gu + cols
    g = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptr + n_cols, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g) = g / (1 + exp(-g)): for g << 0, exp(-g) overflows to inf and the
    # quotient is -0, the correct limit, rather than a NaN.
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


class SiluMulLaunchConfig(NamedTuple):
    block: int
    num_warps: int


def _launch_config(intermediate: int, on_gpu: bool = True) -> SiluMulLaunchConfig:
    # GPU: 1024 columns x 4 warps = 8 per thread: 16-byte vector loads for fp16 (the bias_gelu
    # rule). Interpreter: cost is per program, so one block covers a whole (test-sized) row.
    if on_gpu:
        return SiluMulLaunchConfig(1024, 4)
    return SiluMulLaunchConfig(max(16, min(triton.next_power_of_2(intermediate), 8192)), 4)


def _check_inputs(gate_up, dtypes):
    check_tensor("gate_up", gate_up, dtypes=dtypes)
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2 != 0:
        raise ValueError(
            "gate_up must have a non-empty, even last dim [..., 2 * intermediate] (gate then up), "
            f"got shape {tuple(gate_up.shape)}"
        )


def silu_mul(gate_up):
    """silu(gate) * up of the fused projection [..., 2 * intermediate]; returns [..., intermediate]."""
    _check_inputs(gate_up, dtypes=SUPPORTED_DTYPES)
    device = check_device(_silu_mul_fwd_kernel, gate_up=gate_up)
    intermediate = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], intermediate), dtype=gate_up.dtype, device=device)
    if out.numel() == 0:
        return out
    cfg = _launch_config(intermediate, on_gpu=not is_interpreted(_silu_mul_fwd_kernel))
    col_blocks = triton.cdiv(intermediate, cfg.block)
    if col_blocks > _MAX_COL_BLOCKS:
        raise ValueError(f"intermediate size {intermediate} needs more than {_MAX_COL_BLOCKS} column blocks")
    gu2 = gate_up.reshape(-1, gate_up.shape[-1])
    out2 = out.view(-1, intermediate)
    _silu_mul_fwd_kernel[(gu2.shape[0], col_blocks)](
        gu2,
        out2,
        gu2.stride(0),
        out2.stride(0),
        intermediate,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return out


def silu_mul_reference(gate_up):
    """torch version of ``silu_mul``: fp32 math (float64 stays float64), rounded once to gate_up's dtype."""
    _check_inputs(gate_up, dtypes=SUPPORTED_DTYPES + (torch.float64,))
    compute = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
