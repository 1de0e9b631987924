"""Tests for kernels/rms_norm.py (RMSNorm with Hugging Face Qwen3RMSNorm's semantics, optional residual add).

Two checks per case:

- against HF's ``Qwen3RMSNorm`` module itself on the same inputs (and, with a residual, on HF's
  ``residual + hidden_states``): the new residual stream must be bit-identical, the output within
  ``ULPS`` units in the last place of the output dtype. Only the summation order of mean(h^2) and
  the rsqrt differ (a few fp32 ulps of the scale); in fp16/bf16 that flips the rounding of
  ``y.to(x.dtype)`` by one ulp at most, which the weight can scale to two ulps of the output, and
  in fp32 the few ulps pass through two roundings;
- the accuracy rule of the other kernels (flash-attention's): with ``ref64`` the reference on
  float64 copies of the same inputs and ``torch_lp`` HF's output in the input dtype,
  ``max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor``.

On CPU the kernel runs under TRITON_INTERPRET=1.
"""

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from triton_rerank.kernels.rms_norm import (
    MAX_HIDDEN,
    _launch_config,
    rms_norm,
    rms_norm_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-6  # Qwen3's rms_norm_eps
ULPS = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

DTYPES = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16", marks=pytest.mark.bf16),
]

# One row, a few rows, hidden sizes that are and are not powers of two, per-head norms on
# [tokens, heads, head_dim], and a 4-D input whose leading dims are merged.
SHAPES = [
    pytest.param((1, 32), id="1x32"),
    pytest.param((3, 80), id="3x80"),
    pytest.param((3, 1000), id="3x1000"),
    pytest.param((2, 1024), id="2x1024"),
    pytest.param((2, 4096), id="2x4096"),
    pytest.param((5, 3, 128), id="5x3x128_heads"),
    pytest.param((2, 3, 2, 64), id="2x3x2x64"),
]
if CUDA:
    SHAPES += [
        pytest.param((4097, 1024), id="4097x1024"),
        pytest.param((300, 5120), id="300x5120"),
        pytest.param((2049, 32, 128), id="2049x32x128_heads"),
    ]


def _randn(shape, dtype, gen, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(DEVICE, dtype)


def _make(shape, dtype, with_residual, weight_dtype=None, seed=0, scale=1.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = _randn(shape, dtype, gen, scale=scale)
    residual = _randn(shape, dtype, gen, scale=scale) if with_residual else None
    weight = _randn((shape[-1],), weight_dtype or dtype, gen, scale=0.2, shift=1.0)
    return x, weight, residual


def _hf(x, weight, eps, residual=None):
    """HF's own module (weight in its dtype) on x, or on ``residual + x`` as its decoder layer adds them."""
    module = Qwen3RMSNorm(x.shape[-1], eps=eps).to(device=DEVICE, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        summed = None if residual is None else residual + x
        return module(x if summed is None else summed), summed


def _ulp(t):
    """Spacing of t's dtype at |t| (the subnormal spacing at 0)."""
    a = t.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def _check(x, weight, floor, residual=None, eps=EPS):
    result = rms_norm(x, weight, eps, residual=residual)
    out, summed = (result, None) if residual is None else result
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    assert torch.isfinite(out).all()

    hf_out, hf_summed = _hf(x, weight, eps, residual)
    if residual is not None:
        assert summed.shape == x.shape and summed.dtype == x.dtype and summed.is_contiguous()
        assert torch.equal(summed, hf_summed)
    if weight.dtype == x.dtype:
        gap = (out.double() - hf_out.double()).abs()
        ulps = (gap / _ulp(hf_out).double()).max().item()
        assert ulps <= ULPS[x.dtype], f"{ulps} ulps from HF's Qwen3RMSNorm"

    r64 = None if residual is None else residual.double()
    ref64 = rms_norm_reference(x.double(), weight.double(), eps, residual=r64)
    if residual is not None:
        ref64 = ref64[0]
    ours = (out.double() - ref64).abs().max().item()
    hfs = (hf_out.double() - ref64).abs().max().item()
    bound = 2 * hfs + floor
    assert ours <= bound, f"kernel error {ours:.3e} > bound {bound:.3e} (HF {x.dtype} error {hfs:.3e})"
    return result


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_hf_and_float64_reference(shape, dtype, floor, with_residual):
    x, weight, residual = _make(shape, dtype, with_residual)
    _check(x, weight, floor, residual=residual)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_reference_is_hf(dtype, floor):
    # The torch reference (a fallback path's arithmetic) is HF's step for step: identical results.
    x, weight, residual = _make((4, 3, 96), dtype, True, seed=1)
    hf_out, hf_summed = _hf(x, weight, EPS, residual)
    out, summed = rms_norm_reference(x, weight, EPS, residual=residual)
    assert torch.equal(summed, hf_summed) and torch.equal(out, hf_out)
    assert torch.equal(rms_norm_reference(x, weight, EPS), _hf(x, weight, EPS)[0])


@pytest.mark.parametrize("dtype, floor", [p for p in DTYPES if p.id != "fp32"])
def test_fp32_weight_with_low_precision_activations(dtype, floor):
    # HF would promote the output to fp32 here; ours stays in x's dtype, so only the float64 rule applies.
    x, weight, residual = _make((3, 768), dtype, True, weight_dtype=torch.float32, seed=2)
    out, _ = _check(x, weight, floor, residual=residual)
    assert out.dtype == dtype


def test_fp16_squares_beyond_fp16_range():
    # |x| ~ 300: x^2 overflows fp16 (max 65504); the statistics must be fp32 as in HF.
    x, weight, residual = _make((3, 256), torch.float16, True, seed=3, scale=300.0)
    _check(x, weight, 2e-3, residual=residual)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_per_head_views_of_fused_qkv(dtype, floor):
    """q/k norms on [tokens, heads, head_dim] views into one projection, as a decoder passes them."""
    tokens, heads, kv_heads, head_dim = 7, 4, 2, 64
    gen = torch.Generator(device="cpu").manual_seed(4)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = _randn((tokens, width), dtype, gen)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    weight = _randn((head_dim,), dtype, gen, scale=0.2, shift=1.0)
    for t in (q, k):
        assert not t.is_contiguous() and t.stride(0) == width
        out = _check(t, weight, floor)
        # Same arithmetic on a contiguous copy: only the addressing differs.
        assert torch.equal(out, rms_norm(t.contiguous(), weight, EPS))


def test_other_strided_views():
    gen = torch.Generator(device="cpu").manual_seed(5)
    weight = _randn((48,), torch.float16, gen, scale=0.2, shift=1.0)
    # [tokens, heads, head_dim] with heads as the outer memory dim: strides (48, tokens * 48, 1).
    x = _randn((3, 5, 48), torch.float16, gen).transpose(0, 1)
    # Residual with padded rows: strides (3 * 64, 64, 1).
    residual = _randn((5, 3, 64), torch.float16, gen)[:, :, :48]
    out, summed = _check(x, weight, 2e-3, residual=residual)
    expected = rms_norm(x.contiguous(), weight, EPS, residual=residual.contiguous())
    assert torch.equal(out, expected[0]) and torch.equal(summed, expected[1])
    # 4-D with leading dims that cannot merge into one strided dim (reshape copies them).
    x4 = _randn((4, 3, 2, 48), torch.float16, gen).transpose(0, 1)
    assert torch.equal(_check(x4, weight, 2e-3), rms_norm(x4.contiguous(), weight, EPS))


def test_residual_is_added_first():
    x, weight, residual = _make((3, 256), torch.float32, True, seed=6)
    out, summed = rms_norm(x, weight, EPS, residual=residual)
    assert torch.equal(out, rms_norm(residual + x, weight, EPS))
    assert not torch.allclose(out, rms_norm(x, weight, EPS), atol=1e-2)


def test_one_dim_input():
    x, weight, _ = _make((80,), torch.float32, False, seed=7)
    out = _check(x, weight, 2e-6)
    assert out.shape == (80,)


def test_eps_is_used():
    # Row 0 is zero: the output is exactly 0 and eps only keeps rsqrt finite. Row 1 has mean square
    # ~3e-7: eps = 1e-12 normalises it to unit scale, eps = 1 leaves it tiny.
    x = torch.stack([torch.zeros(64), torch.linspace(-1e-3, 1e-3, 64)]).to(DEVICE)
    weight = torch.ones(64, device=DEVICE)
    for eps in (1e-12, 1.0):
        out = rms_norm(x, weight, eps)
        assert torch.equal(out[0], torch.zeros(64, device=DEVICE))
        torch.testing.assert_close(out, _hf(x, weight, eps)[0], rtol=1e-6, atol=1e-7)
    small, large = (rms_norm(x, weight, eps)[1] for eps in (1e-12, 1.0))
    assert small.abs().max() > 1.5 and large.abs().max() < 2e-3


def test_empty_rows():
    x, weight, residual = _make((0, 3, 128), torch.float32, True)
    out, summed = rms_norm(x, weight, EPS, residual=residual)
    assert out.shape == summed.shape == (0, 3, 128)
    assert rms_norm(x, weight, EPS).shape == (0, 3, 128)


@pytest.mark.parametrize("hidden", [1, 33, 64, 128, 1000, 1024, 4096, 5120, MAX_HIDDEN])
def test_launch_config(hidden):
    cfg = _launch_config(hidden)
    assert cfg.block >= hidden and cfg.block & (cfg.block - 1) == 0 and cfg.block < 2 * max(hidden, 1)
    assert cfg.num_warps in (1, 2, 4, 8, 16)
    # <= 32 fp32 values of the row per thread keeps the row in registers without spilling.
    assert cfg.block // (32 * cfg.num_warps) <= 32


# row_norm_bad_input (conftest.py): the bad inputs layer_norm rejects the same way.
@pytest.mark.parametrize("fn", [rms_norm, rms_norm_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, row_norm_bad_input, assert_rejects):
    x, weight, residual = _make((3, 64), torch.float32, True, seed=8)
    changes, message = row_norm_bad_input
    assert_rejects(fn, dict(x=x, weight=weight, eps=EPS, residual=residual), changes, message)


def test_hidden_too_large():
    x = torch.zeros(1, MAX_HIDDEN + 1, device=DEVICE)
    w = torch.ones(MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        rms_norm(x, w, EPS)
