"""Tests for kernels/bias_gelu.py (fused bias add + exact erf GELU).

Accuracy rule (flash-attention's): with ``ref64`` the reference on float64 copies of the same
(already rounded) inputs and ``torch_lp`` = ``F.gelu(x + bias)`` computed by torch in the input
dtype,

    max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor

with a small absolute floor per dtype. On CPU the kernel runs under TRITON_INTERPRET=1.
"""

import pytest
import torch

from triton_rerank.kernels.bias_gelu import _launch_config, bias_gelu, bias_gelu_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, id="bf16", marks=pytest.mark.bf16),
]

# Sizes that are not multiples of the block (interpreter 4096, GPU 1024), a column count that does
# not divide the block (so a block spans rows with different bias offsets), 3-D, and 1-column.
SHAPES = [
    pytest.param((3, 100), id="3x100"),
    pytest.param((7, 3072), id="7x3072"),
    pytest.param((2, 5, 384), id="2x5x384"),
    pytest.param((1, 1), id="1x1"),
    pytest.param((33, 1), id="33x1"),
]
if CUDA:
    SHAPES += [pytest.param((4099, 4096), id="4099x4096"), pytest.param((257, 3071), id="257x3071")]


def _make(shape, dtype, bias_dtype=None, seed=0, scale=2.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64).to(DEVICE, bias_dtype or dtype)
    return x, bias


def _check_accuracy(x, bias, floor):
    out = bias_gelu(x, bias)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    ref64 = bias_gelu_reference(x.double(), bias.double())
    torch_lp = torch.nn.functional.gelu(x + bias.to(x.dtype), approximate="none")
    ours = (out.double() - ref64).abs().max().item()
    torchs = (torch_lp.double() - ref64).abs().max().item()
    bound = 2 * torchs + floor
    assert ours <= bound, f"kernel error {ours:.3e} > bound {bound:.3e} (torch {x.dtype} error {torchs:.3e})"
    return out


@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype, floor):
    _check_accuracy(*_make(shape, dtype), floor)


@pytest.mark.parametrize("dtype, floor", [p for p in DTYPES if p.id != "fp32"])
def test_fp32_bias_with_low_precision_activations(dtype, floor):
    _check_accuracy(*_make((4, 512), dtype, bias_dtype=torch.float32, seed=1), floor)


def test_tails_and_exactness():
    # Covers the saturated tails of erf and tells the exact GELU from the tanh approximation,
    # which differs from it by up to ~5e-4 around |x| ~ 2-3 (far above the fp32 error).
    x = torch.linspace(-12, 12, 4801, dtype=torch.float64).view(1, -1).to(DEVICE, torch.float32)
    bias = torch.zeros(x.shape[-1], device=DEVICE)
    out = _check_accuracy(x, bias, 1e-6)
    tanh_approx = torch.nn.functional.gelu(x, approximate="tanh")
    assert (out - tanh_approx).abs().max() > 1e-4
    assert torch.equal(out[0, :50], out[0, :50].clamp(max=0))  # very negative inputs give -0..0
    torch.testing.assert_close(out[0, -50:], x[0, -50:])  # very positive inputs pass through


def test_bias_broadcasts_over_rows():
    x = torch.zeros(3, 8, device=DEVICE)
    bias = torch.arange(8, dtype=torch.float32, device=DEVICE) - 4
    out = bias_gelu(x, bias)
    expected = torch.nn.functional.gelu(bias).expand(3, 8)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_empty():
    x, bias = _make((0, 64), torch.float32)
    assert bias_gelu(x, bias).shape == (0, 64)


def test_launch_config():
    for on_gpu in (True, False):
        cfg = _launch_config(on_gpu=on_gpu)
        assert cfg.block & (cfg.block - 1) == 0 and cfg.block >= 32 * cfg.num_warps
    # The CPU shapes above only cross block boundaries if the interpreter block is this size.
    assert _launch_config(on_gpu=False).block < 7 * 3072


# (changes for conftest.py's assert_rejects, message) against good x [4, 64] and bias [64], fp32.
INVALID = [
    pytest.param(dict(bias=lambda a: a["bias"][:32]), r"bias must have shape \[64\]", id="bias_len"),
    pytest.param(dict(bias=lambda a: a["bias"].view(1, 64)), "bias must be 1-D", id="bias_2d"),
    pytest.param(dict(x=lambda a: torch.zeros(8, 64, device=DEVICE)[::2]), "contiguous", id="x_row_strided"),
    pytest.param(dict(x=lambda a: torch.zeros(64, 4, device=DEVICE).t()), "last dim", id="x_transposed"),
    pytest.param(
        dict(x=lambda a: a["x"].half(), bias=lambda a: a["bias"].bfloat16()), "bias dtype", id="bias_bf16"
    ),
    pytest.param(dict(x=lambda a: a["x"].int()), "x has dtype", id="x_int"),
    pytest.param(dict(x=lambda a: torch.tensor(1.0, device=DEVICE)), "non-empty last dim", id="x_scalar"),
]


@pytest.mark.parametrize("changes, message", INVALID)
@pytest.mark.parametrize("fn", [bias_gelu, bias_gelu_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, changes, message, assert_rejects):
    x, bias = _make((4, 64), torch.float32, seed=2)
    assert_rejects(fn, dict(x=x, bias=bias), changes, message)
