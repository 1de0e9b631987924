"""Tests for kernels/swiglu.py (silu(gate) * up on a fused [..., 2 * intermediate] projection).

Two checks per case:

- the accuracy rule of the other kernels (flash-attention's): with ``ref64`` the reference on
  float64 copies of the same inputs and ``torch_lp`` Hugging Face's ``act_fn(gate) * up`` in the
  input dtype, ``max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor``;
- against HF's expression itself, element by element: the kernel rounds the fp32 result once
  (<= 0.5 ulp of the output), HF rounds silu(gate) (0.5 ulp of silu, i.e. <= 0.5 ulp of the
  product after multiplying by up) and then the product (0.5 ulp), so the two differ by at most
  ~1.5 ulps of the output dtype: ``rtol = 2 * eps(dtype)``, with an absolute floor for results in
  the subnormal range. In fp32 both compute in fp32 and only exp's last bits differ.

On CPU the kernel runs under TRITON_INTERPRET=1.
"""

import pytest
import torch
from transformers.activations import ACT2FN

from triton_rerank.kernels.swiglu import _launch_config, silu_mul, silu_mul_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (dtype, absolute floor of the float64 bound, rtol and atol against HF)
DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-6, 1e-7, id="fp32"),
    pytest.param(torch.float16, 1e-3, 2 * 2**-10, 1e-7, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, 2 * 2**-7, 1e-30, id="bf16", marks=pytest.mark.bf16),
]

# [rows..., 2 * intermediate] (ids: rows_i<intermediate>): 1 row, odd and non-power-of-two intermediate sizes, a size past the
# interpreter's 8192-column block (two column blocks per row), 3-D, and intermediate 1.
SHAPES = [
    pytest.param((1, 64), id="1_i32"),
    pytest.param((3, 2 * 80), id="3_i80"),
    pytest.param((5, 2 * 1000), id="5_i1000"),
    pytest.param((2, 2 * 8200), id="2_i8200"),
    pytest.param((2, 3, 2 * 48), id="2x3_i48"),
    pytest.param((4, 2), id="4_i1"),
]
if CUDA:
    SHAPES += [
        pytest.param((4099, 2 * 3072), id="4099_i3072"),
        pytest.param((257, 2 * 9728), id="257_i9728"),  # Qwen3-0.6B/4B/8B's intermediate sizes
    ]


def _make(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _hf(gate_up):
    """HF's Qwen3MLP arithmetic, act_fn(gate_proj(x)) * up_proj(x), on the two halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACT2FN["silu"](gate) * up


def _check(gate_up, floor, rtol, atol):
    out = silu_mul(gate_up)
    half = gate_up.shape[-1] // 2
    assert out.shape == (*gate_up.shape[:-1], half) and out.dtype == gate_up.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    hf = _hf(gate_up)
    torch.testing.assert_close(out, hf, rtol=rtol, atol=atol)
    ref64 = silu_mul_reference(gate_up.double())
    ours = (out.double() - ref64).abs().max().item()
    hfs = (hf.double() - ref64).abs().max().item()
    bound = 2 * hfs + floor
    assert ours <= bound, f"kernel error {ours:.3e} > bound {bound:.3e} (HF {gate_up.dtype} error {hfs:.3e})"
    return out


@pytest.mark.parametrize("dtype, floor, rtol, atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_hf_and_float64_reference(shape, dtype, floor, rtol, atol):
    _check(_make(shape, dtype), floor, rtol, atol)


# The interpreter evaluates exp with numpy, which warns on the (intended) overflow to inf.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype, floor, rtol, atol", DTYPES)
def test_extreme_gates(dtype, floor, rtol, atol):
    # Gates of +-60 (fp16) / +-1e4 (others): exp(-g) overflows fp32 for very negative g, and the
    # result must be the limit (-0 times up), not NaN; large positive g gives g * up.
    big = 60.0 if dtype == torch.float16 else 1e4
    gate = torch.tensor([-big, -30.0, -1.0, -0.0, 0.0, 1e-3, 1.0, 30.0, big], dtype=torch.float64)
    up = torch.linspace(-2, 2, gate.numel(), dtype=torch.float64)
    gate_up = torch.cat([gate, up]).view(1, -1).to(DEVICE, dtype)
    out = _check(gate_up, floor, rtol, atol)
    assert out[0, 0].abs().item() == 0.0


@pytest.mark.parametrize("dtype, floor, rtol, atol", DTYPES)
def test_reference_wrapper(dtype, floor, rtol, atol):
    gate_up = _make((3, 2 * 100), dtype, seed=1)
    ref = silu_mul_reference(gate_up)
    assert ref.dtype == dtype
    torch.testing.assert_close(ref, _hf(gate_up), rtol=rtol, atol=atol)


def test_row_strided_view():
    # A slice of a wider buffer: rows 3 * 64 apart, the last dim contiguous.
    gate_up = _make((5, 3 * 64), torch.float16, seed=2)[:, 32 : 32 + 2 * 48]
    assert not gate_up.is_contiguous()
    out = _check(gate_up, 1e-3, 2 * 2**-10, 1e-7)
    assert torch.equal(out, silu_mul(gate_up.contiguous()))


def test_gate_is_first_half():
    gate_up = torch.cat([torch.zeros(2, 8), torch.ones(2, 8)], dim=1).to(DEVICE)
    assert torch.equal(silu_mul(gate_up), torch.zeros(2, 8, device=DEVICE))  # silu(0) * 1
    swapped = torch.cat([torch.ones(2, 8), torch.zeros(2, 8)], dim=1).to(DEVICE)
    assert torch.equal(silu_mul(swapped), torch.zeros(2, 8, device=DEVICE))  # silu(1) * 0
    gate_up = torch.cat([torch.full((1, 4), 2.0), torch.full((1, 4), 3.0)], dim=1).to(DEVICE)
    expected = torch.nn.functional.silu(torch.tensor(2.0)) * 3 * torch.ones(1, 4)
    torch.testing.assert_close(silu_mul(gate_up), expected.to(DEVICE))


def test_empty_rows():
    assert silu_mul(_make((0, 64), torch.float32)).shape == (0, 32)
    assert silu_mul(_make((2, 0, 64), torch.float32)).shape == (2, 0, 32)


@pytest.mark.parametrize("intermediate", [1, 80, 1000, 3072, 9728, 25600])
def test_launch_config(intermediate):
    for on_gpu in (True, False):
        cfg = _launch_config(intermediate, on_gpu=on_gpu)
        assert cfg.block >= 16 and cfg.block & (cfg.block - 1) == 0
        assert cfg.num_warps in (1, 2, 4, 8)
    # The 8200-column test shape only spans two column blocks if the interpreter caps its block.
    assert _launch_config(8200, on_gpu=False).block < 8200


INVALID = [
    pytest.param(lambda: _make((3, 7), torch.float32), "even last dim", id="odd_last_dim"),
    pytest.param(lambda: _make((3, 0), torch.float32), "non-empty", id="empty_last_dim"),
    pytest.param(lambda: torch.tensor(1.0, device=DEVICE), "non-empty", id="scalar"),
    pytest.param(lambda: _make((3, 8), torch.float32).long(), "gate_up has dtype", id="int"),
    pytest.param(lambda: _make((8, 3), torch.float32).t(), "contiguous in its last dim", id="transposed"),
    pytest.param(lambda: [1.0, 2.0], "torch.Tensor", id="list"),
]


@pytest.mark.parametrize("make_input, message", INVALID)
@pytest.mark.parametrize("fn", [silu_mul, silu_mul_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, make_input, message):
    with pytest.raises(ValueError, match=message):
        fn(make_input())


def test_reference_accepts_float64_but_kernel_does_not():
    gate_up = _make((2, 16), torch.float64)
    assert silu_mul_reference(gate_up).dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        silu_mul(gate_up)
