"""Tests for kernels/varlen_attention.py (bidirectional and causal, multi-head and grouped-query,
with and without a shared prefix).

Accuracy rule (flash-attention's): with ``ref64`` the reference on the float64 copies of the same
(already rounded) inputs, and ``torch_lp`` attention computed by torch in the input dtype (matmuls,
softmax and P @ V all in that dtype, flash-attention's ``attention_ref(upcast=False)``, with the
same causal mask and prefix keys, and the kv heads repeated for grouped-query attention),

    max|kernel - ref64| <= 2 * max|torch_lp - ref64| + floor

with a small absolute floor per dtype so fp32 cases where torch is nearly exact do not make the
bound zero. On CPU the kernels run under TRITON_INTERPRET=1 with tiny shapes; on CUDA the same tests
run compiled, with bf16 and longer sequences added.
"""

import sys
from itertools import pairwise

import pytest
import torch

from triton_rerank.kernels.varlen_attention import (
    AttnLaunchConfig,
    _launch_config,
    check_cu_seqlens_values,
    check_prefix_values,
    varlen_attention,
    varlen_attention_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (dtype, absolute floor of the error bound)
DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 5e-3, id="bf16", marks=pytest.mark.bf16),
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


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _make_qkv(lengths, heads, head_dim, dtype, seed=0, kv_heads=None):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    kv_heads = heads if kv_heads is None else kv_heads
    return [
        torch.randn(total, h, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
        for h in (heads, kv_heads, kv_heads)
    ]


def _torch_attention_in_dtype(q, k, v, cu_seqlens, scale, causal=False, prefix_starts=None, prefix_lens=None):
    """Attention the way torch computes it in q's dtype (no upcast): the error baseline."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    batch = len(bounds) - 1
    starts = [0] * batch if prefix_starts is None else prefix_starts.tolist()
    lens = [0] * batch if prefix_lens is None else prefix_lens.tolist()
    for (start, end), p_start, p_len in zip(pairwise(bounds), starts, lens, strict=True):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks, vs = (
            torch.cat((t[p_start : p_start + p_len], t[start:end]))
            .repeat_interleave(groups, dim=1)
            .transpose(0, 1)
            for t in (k, v)
        )
        scores = (qs @ ks.transpose(1, 2)) * scale
        if causal:
            above = torch.ones(end - start, p_len + end - start, dtype=torch.bool, device=q.device)
            scores = scores.masked_fill(above.triu(p_len + 1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vs.dtype)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def _check_accuracy(q, k, v, cu_seqlens, max_seqlen, floor, softmax_scale=None, causal=False, **prefix):
    """prefix: optionally prefix_starts= and prefix_lens=, passed to every attention computed here."""
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal=causal, **prefix)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out).all()

    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref64 = varlen_attention_reference(
        q64, k64, v64, cu_seqlens, max_seqlen, softmax_scale, causal=causal, **prefix
    )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    torch_lp = _torch_attention_in_dtype(q, k, v, cu_seqlens, scale, causal=causal, **prefix)

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


@pytest.mark.parametrize("causal, kv_heads", [(False, 2), (True, 1)], ids=["bidirectional", "causal_mqa"])
@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_reference_wrapper_agrees(dtype, floor, causal, kv_heads):
    # The fp32-math reference (what the fallback path uses) obeys the same bound.
    lengths = [3, 50]
    q, k, v = _make_qkv(lengths, 2, 32, dtype, seed=1, kv_heads=kv_heads)
    cu = _cu_seqlens(lengths)
    ref = varlen_attention_reference(q, k, v, cu, 50, causal=causal)
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu, 50, causal=causal)
    torch_lp = _torch_attention_in_dtype(q, k, v, cu, 32**-0.5, causal=causal)
    torchs = (torch_lp.double() - ref64).abs().max().item()
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


# (sequence lengths, heads, kv_heads, head_dim) for the causal and grouped-query variants. Lengths
# straddle the interpreter's tiles (BLOCK_M 64, BLOCK_N 32): 63/64/65 end just before, on and after
# a query block, 130 spans three, so a query block both skips whole key blocks (the unmasked part
# of the causal loop) and masks its diagonal ones; empty and 1-token sequences sit in between.
# Groups of 1 (multi-head), 2, 3, 4, and multi-query (kv_heads 1).
GQA_SHAPES = [
    pytest.param([1, 17, 63, 0, 130], 4, 2, 80, id="1-17-63-0-130_h4kv2_d80pad"),
    pytest.param([64, 65], 4, 1, 32, id="64-65_h4kv1_d32_mqa"),
    pytest.param([65, 0, 17], 2, 2, 128, id="65-0-17_h2kv2_d128"),
    pytest.param([130, 1], 8, 2, 64, id="130-1_h8kv2_d64"),
    pytest.param([5, 63], 3, 1, 64, id="5-63_h3kv1_d64_mqa"),
]
if CUDA:
    GQA_SHAPES += [
        pytest.param([512, 300, 1, 257, 64], 16, 8, 128, id="512-300-1-257-64_h16kv8_d128"),
        pytest.param([1000, 129, 2], 32, 4, 128, id="1000-129-2_h32kv4_d128"),
        pytest.param([200, 511], 6, 1, 96, id="200-511_h6kv1_d96pad_mqa"),
        pytest.param([777, 64, 65], 8, 8, 64, id="777-64-65_h8kv8_d64"),
    ]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("lengths, heads, kv_heads, head_dim", GQA_SHAPES)
def test_causal_and_gqa_match_float64_reference(lengths, heads, kv_heads, head_dim, dtype, floor, causal):
    q, k, v = _make_qkv(lengths, heads, head_dim, dtype, seed=10, kv_heads=kv_heads)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), max(lengths), floor, causal=causal)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_causal_peaked_scores(dtype, floor):
    # Large logits with the diagonal mask: the running max must come only from visible keys.
    lengths = [90, 31]
    q, k, v = _make_qkv(lengths, 4, 32, dtype, seed=11, kv_heads=2)
    q = (q.float() * 4).to(dtype)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), 90, floor, softmax_scale=0.6, causal=True)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_causal_first_token_sees_only_itself(kv_heads):
    # Query 0 of each sequence has exactly one visible key, so its output is its kv head's value row.
    lengths = [1, 40, 0, 70]
    q, k, v = _make_qkv(lengths, 4, 32, torch.float16, seed=12, kv_heads=kv_heads)
    out = varlen_attention(q, k, v, _cu_seqlens(lengths), max(lengths), causal=True)
    kv_of_head = torch.arange(4, device=DEVICE) // (4 // kv_heads)
    for start, end in pairwise(_cu_seqlens(lengths).tolist()):
        if end > start:
            torch.testing.assert_close(out[start], v[start, kv_of_head], rtol=0, atol=0)


def test_causal_ignores_later_tokens():
    """Changing the keys/values of tokens after position i must not change outputs 0..i at all."""
    lengths = [100, 45]
    q, k, v = _make_qkv(lengths, 2, 64, torch.float16, seed=13, kv_heads=1)
    cu = _cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 100, causal=True)
    k2, v2 = k.clone(), v.clone()
    # Tokens 70.. of sequence 0: inside the second query block (64..99), so the change lands both
    # in masked diagonal columns of rows 64..69 and in key blocks rows 0..63 never load.
    k2[70:100] = 100.0
    v2[70:100] = -100.0
    out2 = varlen_attention(q, k2, v2, cu, 100, causal=True)
    assert torch.equal(out[:70], out2[:70])
    assert torch.equal(out[100:], out2[100:])
    assert not torch.equal(out[70:100], out2[70:100])
    # Without the mask the earlier rows do see the change.
    assert not torch.equal(varlen_attention(q, k, v, cu, 100)[:70], varlen_attention(q, k2, v2, cu, 100)[:70])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gqa_equals_repeated_kv_heads(causal):
    # Grouped-query attention is multi-head attention on kv heads repeated in place
    # (repeat_interleave, Hugging Face's repeat_kv order); same arithmetic, so identical results.
    lengths = [33, 70]
    q, k, v = _make_qkv(lengths, 6, 32, torch.float32, seed=14, kv_heads=2)
    cu = _cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 70, causal=causal)
    k_rep, v_rep = (t.repeat_interleave(3, dim=1) for t in (k, v))
    assert torch.equal(out, varlen_attention(q, k_rep, v_rep, cu, 70, causal=causal))


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_fused_gqa_qkv_views(dtype, floor):
    """q/k/v as views of one [total, (heads + 2 * kv_heads) * head_dim] projection, as a decoder passes them."""
    lengths = [17, 1, 66]
    total, heads, kv_heads, head_dim = sum(lengths), 4, 2, 64
    gen = torch.Generator(device="cpu").manual_seed(15)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(total, width, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_width].view(total, heads, head_dim)
    k = qkv[:, q_width : q_width + kv_width].view(total, kv_heads, head_dim)
    v = qkv[:, q_width + kv_width :].view(total, kv_heads, head_dim)
    assert not k.is_contiguous() and k.stride(0) == width
    cu = _cu_seqlens(lengths)
    out = _check_accuracy(q, k, v, cu, max(lengths), floor, causal=True)
    out_contig = varlen_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lengths), causal=True
    )
    assert torch.equal(out, out_contig)


# Tile shapes the GPU configs use relative to each other: BLOCK_N > BLOCK_M (fp32: 32 x 64), where
# the causal diagonal spans part of one key block and the unmasked part must stop short of the
# query block's start; BLOCK_N == BLOCK_M; BLOCK_M = 4 * BLOCK_N (fp16/bf16 d96/128: 128 x 32).
@pytest.fixture(params=[(16, 32), (32, 32), (64, 16)], ids=["m16n32", "m32n32", "m64n16"])
def other_tiles(request, monkeypatch):
    """The wrapper launches (BLOCK_M, BLOCK_N) = request.param tiles for the test's duration."""
    block_m, block_n = request.param

    def config(head_dim, dtype, on_gpu=True):
        return AttnLaunchConfig(block_m, block_n, max(16, 1 << (head_dim - 1).bit_length()), 4, 1)

    # The package re-exports the function under the module's name, so reach the module via sys.modules.
    monkeypatch.setattr(sys.modules[varlen_attention.__module__], "_launch_config", config)


@pytest.mark.usefixtures("other_tiles")
def test_causal_with_other_tile_shapes():
    lengths = [1, 47, 16, 80]
    q, k, v = _make_qkv(lengths, 4, 32, torch.float32, seed=16, kv_heads=2)
    _check_accuracy(q, k, v, _cu_seqlens(lengths), max(lengths), 1e-6, causal=True)


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


def _zeros(names, *shape):
    """Changes for assert_rejects: the tensors named (of q, k, v) replaced by fp32 zeros of this shape."""
    return {name: (lambda a: torch.zeros(shape, device=DEVICE)) for name in names}


# (changes for conftest.py's assert_rejects, message) against _good_inputs().
INVALID = [
    pytest.param(dict(cu_seqlens=lambda a: a["cu_seqlens"].long()), "int32", id="cu_seqlens_int64"),
    pytest.param(dict(cu_seqlens=lambda a: a["cu_seqlens"].view(1, -1)), "1-D", id="cu_seqlens_2d"),
    pytest.param(dict(cu_seqlens=lambda a: a["cu_seqlens"].tolist()), "torch.Tensor", id="cu_seqlens_list"),
    pytest.param(
        dict(k=lambda a: a["k"][:, :1].contiguous()),
        "k and v must have the same shape",
        id="k_v_heads_differ",
    ),
    pytest.param(dict(v=lambda a: a["v"][:-1]), "k and v must have the same shape", id="v_fewer_tokens"),
    pytest.param(
        dict(k=lambda a: a["k"][:-1], v=lambda a: a["v"][:-1]),
        "q's total_tokens and head_dim",
        id="kv_fewer_tokens",
    ),
    pytest.param(_zeros("kv", 8, 2, 64), "q's total_tokens and head_dim", id="kv_other_head_dim"),
    pytest.param(
        _zeros("kv", 8, 4, 32),
        r"head count \(2\) must be a multiple of k and v's head count \(4\)",
        id="kv_more_heads",
    ),
    pytest.param(
        _zeros("q", 8, 3, 32),
        r"head count \(3\) must be a multiple of k and v's head count \(2\)",
        id="q_heads_not_multiple",
    ),
    pytest.param(_zeros("kv", 8, 0, 32), r"multiple of k and v's head count \(0\)", id="kv_zero_heads"),
    pytest.param(dict(causal=lambda a: 1), "causal must be a python bool", id="causal_int"),
    pytest.param(dict(causal=lambda a: None), "causal must be a python bool", id="causal_none"),
    pytest.param(dict(v=lambda a: a["v"].half()), "share a dtype", id="v_fp16"),
    pytest.param(dict(q=lambda a: a["q"].flatten(1)), "3-D", id="q_2d"),
    pytest.param(_zeros("qkv", 8, 2, 16), r"head_dim must be in \[32, 128\], got 16", id="head_dim_16"),
    pytest.param(_zeros("qkv", 8, 1, 256), r"head_dim must be in \[32, 128\], got 256", id="head_dim_256"),
    pytest.param(
        dict(q=lambda a: torch.zeros(8, 2, 64, device=DEVICE)[:, :, ::2]),
        "contiguous in its last dim",
        id="q_last_dim_strided",
    ),
    pytest.param(dict(max_seqlen=lambda a: 5.0), "python int", id="max_seqlen_float"),
    pytest.param(dict(max_seqlen=lambda a: -1), ">= 0", id="max_seqlen_negative"),
    pytest.param(dict(prefix_starts=lambda a: _i32([0, 0])), "given together", id="prefix_starts_only"),
    pytest.param(dict(prefix_lens=lambda a: _i32([0, 3])), "given together", id="prefix_lens_only"),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 0]).long(), prefix_lens=lambda a: _i32([0, 3])),
        "prefix_starts must be int32",
        id="prefix_starts_int64",
    ),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 0]), prefix_lens=lambda a: _i32([0, 3]).float()),
        "prefix_lens must be int32",
        id="prefix_lens_fp32",
    ),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 0]), prefix_lens=lambda a: [0, 3]),
        "prefix_lens must be a torch.Tensor",
        id="prefix_lens_list",
    ),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 0, 0]), prefix_lens=lambda a: _i32([0, 3, 0])),
        r"prefix_starts must be 1-D \[batch\] = \[2\], got shape \(3,\)",
        id="prefix_one_per_cu_seqlens_entry",
    ),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 0]), prefix_lens=lambda a: _i32([[0, 3]])),
        r"prefix_lens must be 1-D",
        id="prefix_lens_2d",
    ),
    pytest.param(
        dict(prefix_starts=lambda a: _i32([0, 9, 0, 9])[::2], prefix_lens=lambda a: _i32([0, 3])),
        "prefix_starts must be contiguous",
        id="prefix_starts_strided",
    ),
]


@pytest.mark.parametrize("changes, message", INVALID)
@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference], ids=["kernel", "reference"])
def test_invalid_inputs_raise(fn, changes, message, assert_rejects):
    assert_rejects(fn, _good_inputs(), changes, message)


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
    args = _good_inputs()
    args.update(prefix_starts=_i32([0, 0]), prefix_lens=_i32([0, 3]).cpu())
    with pytest.raises(ValueError, match="one device"):
        varlen_attention(**args)


# --------------------------------------------------------------------------------------------
# Shared prefix (prefix_starts / prefix_lens)
# --------------------------------------------------------------------------------------------


def _prefix_layout(entries):
    """entries: (own length, index of the entry whose tokens are its prefix, or None).

    Returns (lengths, prefix_starts, prefix_lens); entries without a prefix (the prefix segments
    themselves, or plain sequences) get prefix length 0.
    """
    lengths = [n for n, _ in entries]
    offsets = _cu_seqlens(lengths).tolist()
    starts = [0 if i is None else offsets[i] for _, i in entries]
    lens = [0 if i is None else lengths[i] for _, i in entries]
    return lengths, _i32(starts), _i32(lens)


# (entries as for _prefix_layout, heads, kv_heads, head_dim). Prefix lengths 1, 15 (< BLOCK_N:
# only the masked tail block), 64 (two whole key blocks, no tail), 65 and 100 (whole blocks plus a
# ragged tail); own lengths 1, 17, 63, 130 (three query blocks) and 0. One launch mixes several
# documents sharing a prefix, documents with different prefixes, the prefix segments themselves,
# plain sequences, and documents packed before their prefix.
PREFIX_SHAPES = [
    pytest.param(
        [(65, None), (17, 0), (130, 0), (1, 0), (1, None), (63, 4), (0, 0)], 4, 2, 64, id="p65x3-p1_h4kv2_d64"
    ),
    pytest.param(
        [(63, 1), (15, None), (100, None), (17, 2), (1, 2), (130, 1)], 4, 1, 32, id="p15-p100_h4kv1_d32"
    ),
    pytest.param([(64, None), (130, 0), (63, 0), (17, None)], 2, 2, 128, id="p64_h2kv2_d128"),
    pytest.param([(100, None), (17, 0), (1, 0)], 6, 2, 80, id="p100_h6kv2_d80pad"),
]
if CUDA:
    PREFIX_SHAPES += [
        pytest.param(
            [(300, None), (200, 0), (1, 0), (513, 0), (64, None), (257, 4), (0, 4)],
            16,
            8,
            128,
            id="cuda_p300_p64",
        ),
        pytest.param([(777, 1), (129, None), (129, 1), (65, None)], 32, 4, 128, id="cuda_p129"),
    ]


@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("entries, heads, kv_heads, head_dim", PREFIX_SHAPES)
def test_prefix_matches_float64_reference(entries, heads, kv_heads, head_dim, dtype, floor):
    lengths, starts, lens = _prefix_layout(entries)
    q, k, v = _make_qkv(lengths, heads, head_dim, dtype, seed=20, kv_heads=kv_heads)
    cu = _cu_seqlens(lengths)
    _check_accuracy(q, k, v, cu, max(lengths), floor, causal=True, prefix_starts=starts, prefix_lens=lens)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_prefix_bidirectional(dtype, floor):
    # Without the causal mask a document's rows see the whole prefix and all of their own keys.
    lengths, starts, lens = _prefix_layout([(15, None), (63, 0), (65, None), (17, 2), (1, 0)])
    q, k, v = _make_qkv(lengths, 4, 32, dtype, seed=21, kv_heads=2)
    cu = _cu_seqlens(lengths)
    _check_accuracy(q, k, v, cu, 65, floor, causal=False, prefix_starts=starts, prefix_lens=lens)


@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_prefix_reference_wrapper_agrees(dtype, floor):
    # The fp32-math reference (what the fallback path uses) obeys the same bound with a prefix.
    lengths, starts, lens = _prefix_layout([(20, None), (33, 0), (5, 0)])
    q, k, v = _make_qkv(lengths, 4, 32, dtype, seed=22, kv_heads=1)
    cu, prefix = _cu_seqlens(lengths), dict(prefix_starts=starts, prefix_lens=lens)
    ref = varlen_attention_reference(q, k, v, cu, 33, causal=True, **prefix)
    ref64 = varlen_attention_reference(q.double(), k.double(), v.double(), cu, 33, causal=True, **prefix)
    torch_lp = _torch_attention_in_dtype(q, k, v, cu, 32**-0.5, causal=True, **prefix)
    torchs = (torch_lp.double() - ref64).abs().max().item()
    assert ref.dtype == dtype
    assert (ref.double() - ref64).abs().max().item() <= 2 * torchs + floor


# (dtype, atol = rtol) for "shared prefix == full sequence": the two runs split the same keys into
# different key blocks, so they differ by rounding only (fp16/bf16: P is rounded to the input dtype
# against a different running max, and the output is rounded once more).
PREFIX_EQUIVALENCE_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16", marks=pytest.mark.bf16),
]

# (prefix length, document lengths, heads, kv_heads, head_dim)
PREFIX_EQUIVALENCE_SHAPES = [
    pytest.param(1, [63, 17], 2, 2, 32, id="p1_docs63-17_h2kv2_d32"),
    pytest.param(15, [130, 1], 4, 1, 64, id="p15_docs130-1_h4kv1_d64"),
    pytest.param(64, [17, 1], 4, 2, 128, id="p64_docs17-1_h4kv2_d128"),
    pytest.param(65, [63], 8, 2, 64, id="p65_doc63_h8kv2_d64"),
    pytest.param(100, [17, 1, 63], 4, 2, 32, id="p100_docs17-1-63_h4kv2_d32"),
]
if CUDA:
    PREFIX_EQUIVALENCE_SHAPES += [
        pytest.param(700, [300, 1, 129], 32, 8, 128, id="p700_docs300-1-129_h32kv8_d128"),
    ]


@pytest.mark.parametrize("dtype, tol", PREFIX_EQUIVALENCE_DTYPES)
@pytest.mark.parametrize("prefix_len, doc_lens, heads, kv_heads, head_dim", PREFIX_EQUIVALENCE_SHAPES)
def test_prefix_equals_full_sequence(prefix_len, doc_lens, heads, kv_heads, head_dim, dtype, tol):
    """The point of the prefix form: a document's rows equal those of prefix + document run causally.

    Shared-prefix packing: [prefix][doc 0][doc 1]..., the prefix an ordinary causal sequence
    (prefix length 0) that every document names. Full packing: [prefix][doc 0][prefix][doc 1]...,
    plain causal sequences. Same tokens, so the prefix rows and every document's rows agree.
    """
    shared_lengths = [prefix_len, *doc_lens]
    q, k, v = _make_qkv([sum(shared_lengths)], heads, head_dim, dtype, seed=23, kv_heads=kv_heads)
    shared_cu = _cu_seqlens(shared_lengths)
    starts, lens = _i32([0] * len(shared_lengths)), _i32([0] + [prefix_len] * len(doc_lens))
    out = varlen_attention(
        q, k, v, shared_cu, max(shared_lengths), causal=True, prefix_starts=starts, prefix_lens=lens
    )

    doc_bounds = list(pairwise(shared_cu.tolist()[1:]))
    head = list(range(prefix_len))
    rows = torch.tensor([t for a, b in doc_bounds for t in [*head, *range(a, b)]], device=DEVICE)
    full_lengths = [prefix_len + n for n in doc_lens]
    full_cu = _cu_seqlens(full_lengths)
    full = varlen_attention(q[rows], k[rows], v[rows], full_cu, max(full_lengths), causal=True)

    for (a, b), (fa, fb) in zip(doc_bounds, pairwise(full_cu.tolist()), strict=True):
        torch.testing.assert_close(out[a:b], full[fa + prefix_len : fb], atol=tol, rtol=tol)
        torch.testing.assert_close(out[:prefix_len], full[fa : fa + prefix_len], atol=tol, rtol=tol)


def test_prefix_sees_only_its_range():
    """Keys outside [prefix_start, prefix_start + prefix_len) and the own tokens are never seen.

    Sequence 0 (tokens 0..99, no prefix) holds both prefixes: sequence 1 names tokens 0..64 (two
    whole key blocks and a one-key tail), sequence 2 tokens 30..44 (an unaligned start, a tail block
    only). Changing keys/values outside a document's prefix leaves its output bit-identical.
    """
    lengths = [100, 20, 9]
    q, k, v = _make_qkv(lengths, 2, 32, torch.float16, seed=24, kv_heads=1)
    cu, starts, lens = _cu_seqlens(lengths), _i32([0, 0, 30]), _i32([0, 65, 15])
    out = varlen_attention(q, k, v, cu, 100, causal=True, prefix_starts=starts, prefix_lens=lens)
    seq0, seq1, seq2 = slice(0, 100), slice(100, 120), slice(120, 129)

    def changed(*token_ranges):
        k2, v2 = k.clone(), v.clone()
        for a, b in token_ranges:
            k2[a:b] = 100.0
            v2[a:b] = -100.0
        return varlen_attention(q, k2, v2, cu, 100, causal=True, prefix_starts=starts, prefix_lens=lens)

    out2 = changed((65, 100))
    assert torch.equal(out[:65], out2[:65]) and not torch.equal(out[65:100], out2[65:100])
    assert torch.equal(out[seq1], out2[seq1]) and torch.equal(out[seq2], out2[seq2])
    out2 = changed((0, 30), (45, 100))
    assert torch.equal(out[seq2], out2[seq2])
    assert not torch.equal(out[seq0], out2[seq0]) and not torch.equal(out[seq1], out2[seq1])
    # The last key of each prefix is seen (by every row of the document).
    for token, rows in ((64, seq1), (44, seq2)):
        out2 = changed((token, token + 1))
        assert (out[rows] != out2[rows]).flatten(1).any(dim=1).all()  # every row differs somewhere


@pytest.mark.usefixtures("other_tiles")
def test_prefix_with_other_tile_shapes():
    lengths, starts, lens = _prefix_layout([(47, None), (16, 0), (1, 0), (15, None), (40, 3)])
    q, k, v = _make_qkv(lengths, 4, 32, torch.float32, seed=25, kv_heads=2)
    cu = _cu_seqlens(lengths)
    _check_accuracy(q, k, v, cu, max(lengths), 1e-6, causal=True, prefix_starts=starts, prefix_lens=lens)


def test_prefix_lens_zero_is_no_prefix():
    # All-zero prefix lengths (any in-range starts) give exactly the output without prefix arguments.
    lengths = [17, 70]
    q, k, v = _make_qkv(lengths, 4, 64, torch.float32, seed=26, kv_heads=1)
    cu = _cu_seqlens(lengths)
    plain = varlen_attention(q, k, v, cu, 70, causal=True)
    out = varlen_attention(
        q, k, v, cu, 70, causal=True, prefix_starts=_i32([5, 87]), prefix_lens=_i32([0, 0])
    )
    assert torch.equal(out, plain)


# (prefix_starts, prefix_lens, message) for _good_inputs (two sequences, 8 tokens).
BAD_PREFIX = [
    pytest.param([0, 8], [0, 1], "out of range", id="start_at_total"),
    pytest.param([5, 0], [4, 0], "out of range", id="end_past_total"),
    pytest.param([-1, 0], [2, 0], "out of range", id="negative_start"),
    pytest.param([0, 9], [0, 0], "out of range", id="empty_but_start_past_total"),
    pytest.param([0, 0], [-1, 0], r"prefix_lens must be >= 0, got prefix_lens\[0\] = -1", id="negative_len"),
]


@pytest.mark.parametrize("starts, lens, message", BAD_PREFIX)
def test_prefix_value_checks(starts, lens, message):
    args = _good_inputs()
    args.update(prefix_starts=_i32(starts), prefix_lens=_i32(lens))
    with pytest.raises(ValueError, match=message):
        check_prefix_values(args["prefix_starts"], args["prefix_lens"], 8)
    # As for cu_seqlens: the reference always checks, the kernel wrapper when the tensors are on the CPU.
    with pytest.raises(ValueError, match=message):
        varlen_attention_reference(**args)
    if not CUDA:
        with pytest.raises(ValueError, match=message):
            varlen_attention(**args)
