"""Variable-length (packed) bidirectional attention forward, flash-attention style.

Supported:
- q, k, v: [total_tokens, heads, head_dim], one dtype among fp16 / bf16 / fp32; any token and
  head strides (e.g. views into a fused [total, 3, heads, head_dim] QKV projection) as long as the
  last dim is contiguous.
- head_dim 32..128; non-powers of two (e.g. 80, 96) are padded to the next power of two with masking.
- sequences packed back to back and described by ``cu_seqlens`` (int32, [batch + 1], starting at
  0, non-decreasing; empty sequences are allowed).
- non-causal attention with no mask besides the sequence boundaries (cross-encoder inputs are
  unpadded, so no key-padding mask is needed).
- forward only; online softmax with fp32 statistics and accumulator; output has q's dtype.

Not supported: causal masks, dropout, GQA/MQA (different head counts), backward.
"""

from __future__ import annotations

import math
import operator
from itertools import pairwise
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device, check_tensor, is_interpreted

MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 128
_LOG2E = math.log2(math.e)


@triton.jit
def _varlen_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    cu_seqlens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    num_heads,
    qk_scale,  # softmax_scale * log2(e): the softmax runs on exp2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    # Heads on axis 0 (limit 2**31 - 1 programs) so batch * heads never hits axis 1's 65535 limit.
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads

    seq_start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - seq_start
    # The grid is sized by max_seqlen; query blocks past this sequence's end have nothing to do.
    if start_m * BLOCK_M >= seqlen:
        return

    # int64 token offsets: total_tokens * token_stride can exceed 2**31 for big packed batches.
    tok0 = seq_start.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seqlen

    q_ptrs = Q + (tok0 + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = K + tok0 * stride_kt + head * stride_kh
    v_base = V + tok0 * stride_vt + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < seqlen
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)

        # fp32 inputs: tl.dot defaults to tf32 on tensor cores (~1e-3 relative error); ask for
        # exact fp32 so the fp32 path is a faithful reference-grade kernel.
        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        # Padded key columns get -inf so they vanish from max and sum. Column 0 of the first
        # block is always valid (seqlen >= 1 here), so m_new is finite from the first step and
        # exp2(m_i - m_new) never sees inf - inf.
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # P is rounded to V's dtype so the second product also runs on tensor cores (as in
        # flash-attention); the accumulator stays fp32.
        if IEEE_DOT:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + (tok0 + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


class AttnLaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _launch_config(head_dim: int, dtype: torch.dtype, on_gpu: bool = True) -> AttnLaunchConfig:
    """Tile sizes and launch options the wrapper uses (the AOT test compiles exactly these).

    No @triton.autotune: it needs a driver at import/benchmark time and makes the compiled variant
    depend on the machine. Every tl.dot operand dim stays >= 16.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not on_gpu:
        # Interpreter: cost is per program and per loop step, not per element. BLOCK_N < BLOCK_M
        # keeps small test sequences spanning several key blocks, so the online-softmax rescaling
        # and the multi-block query grid are actually exercised.
        return AttnLaunchConfig(64, 32, block_d, 4, 1)
    if dtype == torch.float32:
        # fp32 with exact (ieee) dots runs on FMA units, not tensor cores, and its operands take
        # twice the registers: 64-row tiles spill badly (10x slower on H200), 32-row ones do not.
        return AttnLaunchConfig(32, 64 if block_d <= 64 else 32, block_d, 4, 2)
    if block_d <= 64:
        return AttnLaunchConfig(128, 64, block_d, 4, 3)
    # d = 96/128: narrower key tiles keep the 128-row fp32 accumulator plus K/V stages in 4 warps'
    # registers and ~80 KB of shared memory (fastest of the configs tried on an H200).
    return AttnLaunchConfig(128, 32, block_d, 4, 3)


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> None:
    """Value checks on cu_seqlens (reads it on the host, so it synchronises a CUDA tensor).

    ``varlen_attention`` runs these only when cu_seqlens lives on the CPU; on CUDA it skips them
    to avoid a device sync per layer, so callers should validate once per batch with this function
    (e.g. before copying cu_seqlens to the GPU).
    """
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in pairwise(bounds)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] != total_tokens:
        raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} must equal total_tokens = {total_tokens}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({longest})")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dtypes) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=dtypes)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [total_tokens, heads, head_dim], got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    head_dim = q.shape[2]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() > 1 and cu_seqlens.stride(0) != 1:
        raise ValueError("cu_seqlens must be contiguous")
    if isinstance(max_seqlen, bool):
        raise ValueError("max_seqlen must be a python int, got bool")
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise ValueError(f"max_seqlen must be a python int, got {type(max_seqlen).__name__}") from None
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a python float or None, got {type(softmax_scale).__name__}")
    return max_seqlen


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None):
    """softmax(q k^T * scale) v within each packed sequence; returns a new contiguous tensor."""
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dtypes=SUPPORTED_DTYPES)
    device = check_device(_varlen_attn_fwd_kernel, q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    total, heads, head_dim = q.shape
    if cu_seqlens.device.type == "cpu":
        check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0 or max_seqlen == 0:
        return out

    cfg = _launch_config(head_dim, q.dtype, on_gpu=not is_interpreted(_varlen_attn_fwd_kernel))
    grid = (batch * heads, triton.cdiv(max_seqlen, cfg.block_m))
    _varlen_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        heads,
        scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None):
    """Plain torch version of ``varlen_attention``: a loop over sequences, math in fp32.

    Also accepts float64 inputs (then the math is float64), which the tests use as ground truth.
    """
    dtypes = SUPPORTED_DTYPES + (torch.float64,)
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dtypes=dtypes)
    total, heads, head_dim = q.shape
    check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((total, heads, head_dim), dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in pairwise(bounds):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).to(compute) for t in (q, k, v))  # [H, L, D]
        probs = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out
