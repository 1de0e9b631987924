"""Tests for kernels/varlen_attention.py.

Accuracy rule (flash-attention's): with ``ref64`` the reference on the float64 copies of the same
(already rounded) inputs, and ``torch_lp`` attention computed by torch in the input dtype (matmuls,
softmax and P @ V all in that dtype, flash-attention's ``attention_ref(upcast=False)``),

    max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor

with a small absolute floor per dtype so fp32 cases where torch is nearly exact do not make the
bound zero. On CPU the kernels run under TRITON_INTERPRET=1 with tiny shapes; on CUDA the same tests
run compiled, with bf16 and longer sequences added.
"""

import os
from itertools import pairwise

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from triton_rerank.kernels.varlen_attention import (  # noqa: E402
    _launch_config,
    check_cu_seqlens_values,
    varlen_attention,
    varlen_attention_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 is wrong under the Triton interpreter (triton#11584)")

# (dtype, absolute floor of the error bound)
DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 5e-3, id="bf16", marks=needs_cuda),
]

# (sequence lengths packed in one batch, heads, head_dim). Lengths mix 1-token sequences with ones
# longer than the interpreter's BLOCK_M (64) and BLOCK_N (32), so several query blocks and several
# online-softmax steps run, with ragged tails in both.
SHAPES = [
    pytest.param([1, 17, 113], 2, 64, id="1-17-113_d64"),
    pytest.param([5, 64, 33], 2, 32, id="5-64-33_d32"),
    pytest.param([33, 1, 70], 2, 80, id="33-1-70_d80pad"),
    pytest.param([7, 40], 1, 128, id="7-40_d128"),
]
if CUDA:
    SHAPES += [
        pytest.param([512, 300, 1, 257, 64], 4, 64, id="512-300-1-257-64_d64"),
        pytest.param([384, 129, 2], 2, 128, id="384-129-2_d128"),
        pytest.param([200, 511], 3, 96, id="200-511_d96pad"),
    ]


def _cu_seqlens(lengths):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def _make_qkv(lengths, heads, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    return [
        torch.randn(total, heads, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
        for _ in range(3)
    ]


def _torch_attention_in_dtype(q, k, v, cu_seqlens, scale):
    """Attention the way torch computes it in q's dtype (no upcast): the error baseline."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in pairwise(bounds):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1).to(vs.dtype)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def _check_accuracy(q, k, v, cu_seqlens, max_seqlen, floor, softmax_scale=None):
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out).all()

    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref64 = varlen_attention_reference(q64, k64, v64, cu_seqlens, max_seqlen, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    torch_lp = _torch_attention_in_dtype(q, k, v, cu_seqlens, scale)

    ours = (out.double() - ref64).abs().max().item()
    torchs = (torch_lp.double() - ref64).abs().max().item()
    bound = 2 * torchs + floor
    assert ours <= bound, f"kernel error {ours:.3e} > bound {bound:.3e} (torch {q.dtype} error {torchs:.3e})"
    return out


@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("lengths, heads, head_dim", SHAPES)
def test_matches_float64_reference(lengths, heads, head_dim, dtype, floor):
    q, k, v = _make_qkv(lengths, heads, head_dim, dtype)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), max(lengths), floor)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_reference_wrapper_agrees(dtype, floor):
    # The fp32-math reference (what the encoder's fallback path uses) obeys the same bound.
    lengths = [3, 50]
    q, k, v = _make_qkv(lengths, 2, 32, dtype, seed=1)
    cu = _cu_seqlens(lengths)
    ref = varlen_attention_reference(q, k, v, cu, 50)
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu, 50)
    torchs = (_torch_attention_in_dtype(q, k, v, cu, 32**-0.5).double() - ref64).abs().max().item()
    assert ref.dtype == dtype
    assert (ref.double() - ref64).abs().max().item() <= 2 * torchs + floor


@pytest.mark.parametrize("lengths", [[1], [0, 1, 0, 3, 1], [2, 0], [70, 1]])
def test_empty_and_single_token_sequences(lengths):
    q, k, v = _make_qkv(lengths, 2, 32, torch.float32, seed=2)
    out = _check_accuracy(q, k, v, _cu_seqlens(lengths), max(lengths), 1e-6)
    # A one-token sequence attends only to itself: its output is exactly its own value row.
    bounds = _cu_seqlens(lengths).tolist()
    for start, end in pairwise(bounds):
        if end - start == 1:
            torch.testing.assert_close(out[start], v[start], rtol=1e-6, atol=1e-6)


def test_sequences_are_isolated():
    """Changing one sequence's keys/values must not change another sequence's output at all."""
    lengths = [45, 38, 20]
    q, k, v = _make_qkv(lengths, 2, 64, torch.float16, seed=3)
    cu = _cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, max(lengths))
    k2, v2 = k.clone(), v.clone()
    k2[45:83] = 100.0
    v2[45:83] = -100.0
    out2 = varlen_attention(q, k2, v2, cu, max(lengths))
    assert torch.equal(out[:45], out2[:45])
    assert torch.equal(out[83:], out2[83:])
    assert not torch.equal(out[45:83], out2[45:83])


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_fused_qkv_views(dtype, floor):
    """q/k/v as strided views of one [total, 3, heads, head_dim] projection, as the encoder passes them."""
    lengths = [17, 1, 66]
    total, heads, head_dim = sum(lengths), 2, 64
    gen = torch.Generator(device="cpu").manual_seed(4)
    qkv = torch.randn(total, 3, heads, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous() and q.stride(0) == 3 * heads * head_dim
    cu = _cu_seqlens(lengths)
    out = _check_accuracy(q, k, v, cu, max(lengths), floor)
    # Same arithmetic on contiguous copies: only the addressing differs, so results are identical.
    out_contig = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lengths))
    assert torch.equal(out, out_contig)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_softmax_scale_and_peaked_scores(dtype, floor):
    # Large logits (|s| up to ~50): fails without the running-max subtraction (exp overflow) or
    # with a wrong rescale of the accumulator when the max changes between key blocks.
    lengths = [90, 31]
    q, k, v = _make_qkv(lengths, 2, 32, dtype, seed=5)
    q = (q.float() * 4).to(dtype)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), 90, floor, softmax_scale=0.6)


def test_scale_changes_output():
    lengths = [20]
    q, k, v = _make_qkv(lengths, 1, 32, torch.float32, seed=6)
    cu = _cu_seqlens(lengths)
    default = varlen_attention(q, k, v, cu, 20)
    explicit = varlen_attention(q, k, v, cu, 20, softmax_scale=32**-0.5)
    doubled = varlen_attention(q, k, v, cu, 20, softmax_scale=2 * 32**-0.5)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, doubled)


def test_max_seqlen_larger_than_needed():
    # Extra query blocks past every sequence's end must exit without writing anything wrong.
    lengths = [10, 3]
    q, k, v = _make_qkv(lengths, 2, 32, torch.float32, seed=7)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), 200, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
def test_launch_config(head_dim, dtype):
    for on_gpu in (True, False):
        cfg = _launch_config(head_dim, dtype, on_gpu=on_gpu)
        assert cfg.block_d >= head_dim and cfg.block_d & (cfg.block_d - 1) == 0
        assert min(cfg.block_m, cfg.block_n, cfg.block_d) >= 16  # tl.dot minimum
        assert cfg.num_warps in (1, 2, 4, 8, 16) and cfg.num_stages >= 1
    interp = _launch_config(head_dim, dtype, on_gpu=False)
    # The CPU test shapes above only exercise multi-block loops if the interpreter tiles are small.
    assert interp.block_n < 113 and interp.block_m < 113


def _good_inputs():
    q, k, v = _make_qkv([3, 5], 2, 32, torch.float32, seed=8)
    return dict(q=q, k=k, v=v, cu_seqlens=_cu_seqlens([3, 5]), max_seqlen=5)


def _replace(**changes):
    def make():
        args = _good_inputs()
        for key, fn in changes.items():
            args[key] = fn(args)
        return args

    return make


INVALID = [
    pytest.param(_replace(cu_seqlens=lambda a: a["cu_seqlens"].long()), "int32", id="cu_seqlens_int64"),
    pytest.param(_replace(cu_seqlens=lambda a: a["cu_seqlens"].view(1, -1)), "1-D", id="cu_seqlens_2d"),
    pytest.param(
        _replace(cu_seqlens=lambda a: a["cu_seqlens"].tolist()), "torch.Tensor", id="cu_seqlens_list"
    ),
    pytest.param(_replace(k=lambda a: a["k"][:, :1].contiguous()), "same shape", id="k_fewer_heads"),
    pytest.param(_replace(v=lambda a: a["v"][:-1]), "same shape", id="v_fewer_tokens"),
    pytest.param(_replace(v=lambda a: a["v"].half()), "share a dtype", id="v_fp16"),
    pytest.param(_replace(q=lambda a: a["q"].flatten(1)), "3-D", id="q_2d"),
    pytest.param(
        _replace(**{n: (lambda a, n=n: torch.zeros(8, 2, 16, device=DEVICE)) for n in "qkv"}),
        r"head_dim must be in \[32, 128\], got 16",
        id="head_dim_16",
    ),
    pytest.param(
        _replace(**{n: (lambda a, n=n: torch.zeros(8, 1, 256, device=DEVICE)) for n in "qkv"}),
        r"head_dim must be in \[32, 128\], got 256",
        id="head_dim_256",
    ),
    pytest.param(
        _replace(q=lambda a: torch.zeros(8, 2, 64, device=DEVICE)[:, :, ::2]),
        "contiguous in its last dim",
        id="q_last_dim_strided",
    ),
    pytest.param(_replace(max_seqlen=lambda a: 5.0), "python int", id="max_seqlen_float"),
    pytest.param(_replace(max_seqlen=lambda a: -1), ">= 0", id="max_seqlen_negative"),
]


@pytest.mark.parametrize("make_args, message", INVALID)
@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, make_args, message):
    args = make_args()
    with pytest.raises(ValueError, match=message):
        fn(**args)


def test_reference_accepts_float64_but_kernel_does_not():
    args = _good_inputs()
    args.update(q=args["q"].double(), k=args["k"].double(), v=args["v"].double())
    assert varlen_attention_reference(**args).dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        varlen_attention(**args)


BAD_CU = [
    pytest.param([1, 3, 8], 8, 5, "start at 0", id="not_from_zero"),
    pytest.param([0, 5, 3, 8], 8, 5, "non-decreasing", id="decreasing"),
    pytest.param([0, 3, 7], 8, 5, "must equal total_tokens", id="short_of_total"),
    pytest.param([0, 3, 8], 8, 4, "smaller than the longest", id="max_seqlen_too_small"),
]


@pytest.mark.parametrize("offsets, total, max_seqlen, message", BAD_CU)
def test_cu_seqlens_value_checks(offsets, total, max_seqlen, message):
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens_values(cu, total, max_seqlen)
    q, k, v = _make_qkv([total], 2, 32, torch.float32)
    # The reference always checks values; the kernel wrapper checks them when cu_seqlens is on the
    # CPU (on CUDA it skips them to avoid a device sync per call).
    with pytest.raises(ValueError, match=message):
        varlen_attention_reference(q, k, v, cu, max_seqlen)
    if cu.device.type == "cpu":
        with pytest.raises(ValueError, match=message):
            varlen_attention(q, k, v, cu, max_seqlen)


def test_mixed_devices_rejected():
    if not CUDA:
        pytest.skip("needs a CUDA device to mix devices")
    args = _good_inputs()
    args["cu_seqlens"] = args["cu_seqlens"].cpu()
    with pytest.raises(ValueError, match="one device"):
        varlen_attention(**args)
