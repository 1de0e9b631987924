"""Int8 linear layers for CPUs: weights int8 per output channel, activations int8 per token.

y = x @ W^T + b computed as
    x_q = round(x / s_x)      s_x = max|x| / 127 of each row (token), on every call
    W_q = round(W / s_w)      s_w = max|W| / 127 of each output channel, once at load
    y   = (x_q @ W_q^T) * s_x * s_w + b      (int8 x int8 products summed exactly in int32)

on the CPU's int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-INT8) through
`torch._int_mm`. Why per token rather than one scale per call (torch.ao's dynamic quantization,
fbgemm): a per-call scale is set by the largest activation of the whole micro-batch, so a pair's
score would depend on which other requests share its micro-batch. Per token, a row's result
depends on that row alone (the int32 sums are exact), and small rows keep their resolution.

What it costs is the quantizing and rescaling around the product: in eager mode those passes over
memory eat the int8 gain (a MiniLM-shaped forward of 2,048 tokens on a 2-core AMD EPYC Zen 4:
eager int8 linears with float32 elsewhere took 308-375 ms, bfloat16 176-216 ms); fused into their
neighbours by torch.compile they do not (int8 linears, bfloat16 elsewhere: 138-148 ms). So the models compile the layer blocks that hold these linears
(models/cross_encoder.py).

`Int8Linear.forward` takes and returns the model's activation dtype (float32 or bfloat16); the
bias stays float32, and the scales too, as the checkpoint's float32 weights are quantized.
`int8_linear_reference` is the same computation in float64 from the same int8 values, for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dtypes import int8_instructions


def check_int8_support(device: torch.device, flags: set[str] | None = None) -> str:
    """The instructions int8 will run on; ValueError saying what to do where it cannot run well."""
    if device.type != "cpu":
        raise ValueError(f"quantize int8 is for CPUs and this instance was placed on {device.type}: serve with "
                         "--device cpu (device cpu in config.pbtxt), or use dtype float16 on the GPU")
    names = int8_instructions(flags)
    if not names:
        raise ValueError("quantize int8 needs a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI "
                         "or AMX-INT8) and this one has none: without them int8 is slower than float32; "
                         "leave quantize at none")
    return ", ".join(names)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [n, k] float -> (int8 [n, k], float32 scale [n, 1]) with x ~= q * scale, |q| <= 127."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
    return torch.round(x.float() / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A linear layer of `in_features` -> `out_features` with int8 weights (see the module's docstring).

    `forward(x)` is x @ W^T + b and `matmul(x)` the same without the bias (for a bias fused into
    the next op), both in x's dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        weight = weight.detach().float()  # [out, in]
        q, scale = quantize_rows(weight)
        self.out_features, self.in_features = weight.shape
        # Stored transposed, [in, out], as the product takes it; a view of the [out, in] rows.
        self.register_buffer("weight_t", q.t(), persistent=False)
        self.register_buffer("weight_scale", scale.squeeze(1), persistent=False)  # [out] float32
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def matmul(self, x: Tensor) -> Tensor:
        # x [n, in] -> [n, out], in x's dtype
        q, scale = quantize_rows(x)
        return (torch._int_mm(q, self.weight_t).float() * (scale * self.weight_scale)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return self.matmul(x)
        q, scale = quantize_rows(x)
        return (torch._int_mm(q, self.weight_t).float() * (scale * self.weight_scale) + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x per token"


def int8_linear_reference(x: Tensor, layer: Int8Linear) -> Tensor:
    """What Int8Linear computes, in float64 from the same int8 values (the product's only rounding
    is the final cast): for tests."""
    q, scale = quantize_rows(x)
    w = layer.weight_t.double() * layer.weight_scale.double()  # [in, out]
    y = (q.double() * scale.double()) @ w
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The unquantized layer in float64: what int8 approximates."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())
