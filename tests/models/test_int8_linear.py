"""Int8Linear (int8 weights per output channel, int8 activations per token) against float64 references."""

from __future__ import annotations

import pytest
import torch

from triton_rerank.models.int8_linear import (
    Int8Linear,
    check_int8_support,
    int8_instructions,
    int8_linear_reference,
    linear_reference,
    quantize_rows,
)

HAS_INT8 = bool(int8_instructions())
needs_int8 = pytest.mark.skipif(not HAS_INT8, reason="this CPU has no int8 dot-product instructions")


def _layer(in_features: int, out_features: int, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    b = torch.randn(out_features, generator=g) * 0.1 if bias else None
    return weight, b, Int8Linear(weight, b)


@needs_int8
@pytest.mark.parametrize("rows", [1, 2, 7, 33, 300])
@pytest.mark.parametrize("in_features, out_features", [(64, 192), (384, 1536), (1536, 384), (24, 40)])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_matches_its_float64_reference(rows, in_features, out_features, dtype, rtol):
    # The same int8 values multiplied in float64: only the final cast (and float32 scaling) differs.
    weight, bias, layer = _layer(in_features, out_features)
    x = (torch.randn(rows, in_features) * torch.rand(rows, 1) * 4).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    want = int8_linear_reference(x, layer)
    scale = want.abs().amax()
    assert float((got.double() - want).abs().max() / scale) <= rtol


@needs_int8
@pytest.mark.parametrize("in_features, out_features", [(384, 1152), (1536, 384)])
def test_error_against_the_unquantized_layer(in_features, out_features):
    # Per-token and per-channel int8: about 1% of the output's range on Gaussian data (bfloat16: 0.4%).
    weight, bias, layer = _layer(in_features, out_features)
    x = torch.randn(256, in_features)
    want = linear_reference(x, weight, bias)
    error = float((layer(x).double() - want).abs().max() / want.abs().max())
    assert 1e-4 < error < 3e-2, error


@needs_int8
def test_a_row_does_not_depend_on_the_others():
    # Per-token scales and exact int32 sums: a row computed alone is the same, bit for bit, as in
    # a batch, even next to a row 1000x larger (a per-call scale would crush its resolution).
    _, _, layer = _layer(64, 96)
    x = torch.randn(5, 64)
    x[3] *= 1000
    batched = layer(x)
    for i in range(5):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1])


@needs_int8
def test_matmul_is_forward_without_the_bias():
    _, bias, layer = _layer(64, 96)
    x = torch.randn(9, 64)
    torch.testing.assert_close(layer.matmul(x) + bias, layer(x), atol=1e-5, rtol=0)
    _, _, unbiased = _layer(64, 96, bias=False)
    assert torch.equal(unbiased(x), unbiased.matmul(x))


def test_rows_are_quantized_to_127_steps():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert q.abs().amax(dim=1).tolist() == [127, 0, 127]  # an all-zero row stays zero, with no division by 0
    torch.testing.assert_close(q.float() * scale, x, atol=float(scale.max()) / 2, rtol=0)


def test_int8_is_refused_where_it_cannot_pay():
    with pytest.raises(ValueError, match="for CPUs and this instance was placed on cuda: serve with --device cpu"):
        check_int8_support(torch.device("cuda"), {"avx512_vnni"})
    with pytest.raises(ValueError, match="int8 dot-product instructions .* this one has none"):
        check_int8_support(torch.device("cpu"), {"avx2", "avx512f"})
    assert check_int8_support(torch.device("cpu"), {"avx512_vnni", "amx_int8"}) == "AMX-INT8, AVX512-VNNI"
