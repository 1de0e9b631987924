"""Tests for kernels/layer_norm.py (fused residual add + LayerNorm).

Accuracy rule (flash-attention's): with ``ref64`` the reference on float64 copies of the same
(already rounded) inputs and ``torch_lp`` what torch computes in the input dtype (x + residual
rounded to that dtype, then ``F.layer_norm`` on it),

    max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor

with a small absolute floor per dtype. On CPU the kernel runs under TRITON_INTERPRET=1.
"""

import pytest
import torch

from triton_rerank.kernels.layer_norm import (
    MAX_HIDDEN,
    _launch_config,
    add_layer_norm,
    add_layer_norm_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5

DTYPES = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16", marks=pytest.mark.bf16),
]

# x shapes: hidden sizes of real encoders (768, 1024), a non-power-of-two, tiny, and the maximum
# the encoder needs (4096); one 3-D input for the flattening of leading dims.
SHAPES = [
    pytest.param((5, 768), id="5x768"),
    pytest.param((3, 1000), id="3x1000"),
    pytest.param((2, 4096), id="2x4096"),
    pytest.param((4, 33), id="4x33"),
    pytest.param((2, 3, 1024), id="2x3x1024"),
]
if CUDA:
    SHAPES += [pytest.param((4097, 1024), id="4097x1024"), pytest.param((300, 4096), id="300x4096")]


def _randn(shape, dtype, gen, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(DEVICE, dtype)


def _make(shape, dtype, with_residual, param_dtype=None, seed=0, shift=0.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = shape[-1]
    param_dtype = param_dtype or dtype
    x = _randn(shape, dtype, gen, shift=shift)
    residual = _randn(shape, dtype, gen) if with_residual else None
    weight = _randn((hidden,), param_dtype, gen, scale=0.2, shift=1.0)
    bias = _randn((hidden,), param_dtype, gen, scale=0.2)
    return x, residual, weight, bias


def _torch_in_dtype(x, residual, weight, bias, eps):
    h = x if residual is None else x + residual
    return torch.nn.functional.layer_norm(h, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


def _check_accuracy(x, residual, weight, bias, floor, eps=EPS):
    out = add_layer_norm(x, residual, weight, bias, eps)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    r64 = None if residual is None else residual.double()
    ref64 = add_layer_norm_reference(x.double(), r64, weight.double(), bias.double(), eps)
    torch_lp = _torch_in_dtype(x, residual, weight, bias, eps)
    ours = (out.double() - ref64).abs().max().item()
    torchs = (torch_lp.double() - ref64).abs().max().item()
    bound = 2 * torchs + floor
    assert ours <= bound, f"kernel error {ours:.3e} > bound {bound:.3e} (torch {x.dtype} error {torchs:.3e})"
    return out


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype, floor, with_residual):
    _check_accuracy(*_make(shape, dtype, with_residual), floor)


@pytest.mark.parametrize("dtype, floor", [p for p in DTYPES if p.id != "fp32"])
def test_fp32_params_with_low_precision_activations(dtype, floor):
    _check_accuracy(*_make((3, 768), dtype, True, param_dtype=torch.float32, seed=1), floor)


def test_large_mean_offset():
    # mean ~1000, std ~1: a one-pass E[x^2] - E[x]^2 variance loses ~all fp32 digits here.
    x, residual, weight, bias = _make((4, 1024), torch.float32, True, seed=2, shift=1000.0)
    _check_accuracy(x, residual, weight, bias, 2e-5)


def test_residual_is_added():
    x, residual, weight, bias = _make((3, 256), torch.float32, True, seed=3)
    fused = add_layer_norm(x, residual, weight, bias, EPS)
    pre_added = add_layer_norm(x + residual, None, weight, bias, EPS)
    torch.testing.assert_close(fused, pre_added, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, add_layer_norm(x, None, weight, bias, EPS), atol=1e-2)


def test_row_strided_view():
    gen = torch.Generator(device="cpu").manual_seed(4)
    hidden = 384
    big = _randn((6, hidden + 128), torch.float16, gen)
    x = big[:, :hidden]
    residual = _randn((6, hidden + 64), torch.float16, gen)[:, 64:]
    assert x.stride(0) != hidden and residual.stride(0) != hidden
    weight = _randn((hidden,), torch.float16, gen)
    bias = _randn((hidden,), torch.float16, gen)
    out = _check_accuracy(x, residual, weight, bias, 2e-3)
    assert out.is_contiguous()
    assert torch.equal(out, add_layer_norm(x.contiguous(), residual.contiguous(), weight, bias, EPS))


def test_eps_is_used():
    # Row 0 is constant: zero variance, so the output is exactly bias and eps only keeps it finite.
    # Row 1 has variance ~3e-7: eps = 1e-12 normalises it to unit scale, eps = 1 leaves it tiny.
    x = torch.stack([torch.full((64,), 3.0), torch.linspace(-1e-3, 1e-3, 64)]).to(DEVICE)
    weight = torch.ones(64, device=DEVICE)
    bias = torch.linspace(-1, 1, 64, device=DEVICE)
    for eps in (1e-12, 1.0):
        out = add_layer_norm(x, None, weight, bias, eps)
        ref64 = add_layer_norm_reference(x.double(), None, weight.double(), bias.double(), eps)
        torch.testing.assert_close(out[0], bias)
        torch.testing.assert_close(out.double(), ref64, rtol=1e-5, atol=1e-5)
    small, large = (add_layer_norm(x, None, weight, bias, eps)[1] - bias for eps in (1e-12, 1.0))
    assert small.abs().max() > 1.5 and large.abs().max() < 2e-3


def test_empty_rows():
    x, residual, weight, bias = _make((0, 768), torch.float32, True)
    out = add_layer_norm(x, residual, weight, bias, EPS)
    assert out.shape == (0, 768)


@pytest.mark.parametrize("hidden", [1, 33, 768, 1024, 4096, MAX_HIDDEN])
def test_launch_config(hidden):
    cfg = _launch_config(hidden)
    assert cfg.block >= hidden and cfg.block & (cfg.block - 1) == 0 and cfg.block < 2 * max(hidden, 1)
    # <= 32 fp32 values of the row per thread keeps the row in registers without spilling.
    assert cfg.block // (32 * cfg.num_warps) <= 32


def _good_args():
    x, residual, weight, bias = _make((3, 64), torch.float32, True, seed=5)
    return dict(x=x, residual=residual, weight=weight, bias=bias, eps=EPS)


# row_norm_bad_input (conftest.py): the bad inputs rms_norm rejects the same way.
@pytest.mark.parametrize("fn", [add_layer_norm, add_layer_norm_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, row_norm_bad_input, assert_rejects):
    changes, message = row_norm_bad_input
    assert_rejects(fn, _good_args(), changes, message)


@pytest.mark.parametrize("fn", [add_layer_norm, add_layer_norm_reference], ids=["kernel", "reference"])
def test_invalid_bias_raises(fn, assert_rejects):
    assert_rejects(fn, _good_args(), dict(bias=lambda a: a["bias"].view(1, 64)), "bias must be 1-D")


def test_hidden_too_large():
    x = torch.zeros(1, MAX_HIDDEN + 1, device=DEVICE)
    w = torch.ones(MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        add_layer_norm(x, None, w, w, EPS)
