"""Variable-length (packed) attention forward, bidirectional or causal, flash-attention style.

Supported:
- q: [total_tokens, heads, head_dim]; k, v: [total_tokens, kv_heads, head_dim] with heads a
  multiple of kv_heads (grouped-query attention: query head h reads kv head
  h // (heads // kv_heads); kv_heads == heads is multi-head, kv_heads == 1 multi-query attention).
- one dtype among fp16 / bf16 / fp32; any token and head strides (e.g. views into a fused
  [total, 3, heads, head_dim] or [total, heads + 2 * kv_heads, head_dim] QKV projection) as long
  as the last dim is contiguous.
- head_dim 32..128; non-powers of two (e.g. 80, 96) are padded to the next power of two with masking.
- sequences packed back to back and described by ``cu_seqlens`` (int32, [batch + 1], starting at
  0, non-decreasing; empty sequences are allowed).
- no mask besides the sequence boundaries (inputs are unpadded, so no key-padding mask is
  needed), or with ``causal=True`` a causal mask: query i of a sequence attends to keys 0..i of
  the same sequence (queries and keys have the same length, so top-left and bottom-right
  alignment coincide). Key blocks entirely above the diagonal are never loaded.
- a shared prefix per sequence (``prefix_starts`` / ``prefix_lens``, int32 [batch], both or
  neither): sequence s's queries also attend, before their own keys and with no mask, to the
  ``prefix_lens[s]`` keys/values starting at token ``prefix_starts[s]`` of the same k/v tensors
  (0 = no prefix). This is how a decoder reranker scores many documents behind one prompt head:
  in a causal model the head's keys/values do not depend on what follows, so the head is packed
  once per request as an ordinary causal sequence (prefix length 0) and every document of the
  request is packed as a sequence of its own tokens only, naming the head as its prefix. The
  document rows then equal the rows of the full head + document sequence run causally. With
  ``causal=False`` the own keys are all visible, as without a prefix.
- forward only; online softmax with fp32 statistics and accumulator; output has q's dtype.

Not supported: arbitrary masks, sliding windows, query and key lengths that differ otherwise
(KV cache), dropout, backward.
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
def _attn_key_blocks(
    state,
    query,
    keys,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
):
    """Online-softmax update of state with the key blocks starting at lo, lo + BLOCK_N, ... < hi.

    state: (acc, l_i, m_i), the fp32 accumulator [BLOCK_M, BLOCK_D] and the rows' running sums and
    maxes [BLOCK_M]; the updated triple is returned.
    query: (q, offs_m, offs_d, d_mask, qk_scale), the query tile, its rows' positions, the head-dim
    lanes and their mask (BLOCK_D may pad HEAD_DIM), and the score scale (log2 units).
    keys: (k_base, v_base, stride_kt, stride_vt, seqlen), one key range of K and V (the sequence's
    own keys or its prefix): pointers to its first token in this kv head, token strides, length.
    MASK_KEYS: a block may reach past seqlen, the end of the key range; loads and scores are
    masked per column.
    MASK_CAUSAL: a block may hold keys after some of the queries (scores above the diagonal get
    -inf). Callers turn both off for blocks that need neither, so those run without the compares.
    """
    acc, l_i, m_i = state
    q, offs_m, offs_d, d_mask, qk_scale = query
    k_base, v_base, stride_kt, stride_vt, seqlen = keys
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_KEYS:
            n_mask = cols < seqlen
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)

        # fp32 inputs: tl.dot defaults to tf32 on tensor cores (~1e-3 relative error); ask for
        # exact fp32 so the fp32 path is a faithful reference-grade kernel.
        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        # Masked scores get -inf so they vanish from max and sum. The first key block of every
        # program is block 0 (of the prefix when there is one, else of the sequence itself), and
        # key 0 is visible to every query row (seqlen >= 1 here, and key 0 is on or below the
        # diagonal of every row; prefix keys are never masked), so m_new is finite from the first
        # step on (later calls start from that finite m_i) and exp2(m_i - m_new) never sees
        # inf - inf.
        if MASK_KEYS:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        if MASK_CAUSAL:
            qk = tl.where(cols[None, :] <= offs_m[:, None], qk, float("-inf"))

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
    return acc, l_i, m_i


@triton.jit
def _varlen_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    cu_seqlens,
    prefix_starts,  # int32 [batch] when HAS_PREFIX, else None
    prefix_lens,  # int32 [batch] when HAS_PREFIX, else None
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    num_heads,
    num_kv_groups,  # query heads per kv head: num_heads // kv_heads
    qk_scale,  # softmax_scale * log2(e): the softmax runs on exp2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
):
    # Heads on axis 0 (limit 2**31 - 1 programs) so batch * heads never hits axis 1's 65535 limit.
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    seq = pid_bh // num_heads
    head = pid_bh % num_heads
    # Grouped-query attention: consecutive query heads share one kv head (Hugging Face's
    # repeat_kv order), so the programs of one group read the same K/V tiles.
    kv_head = head // num_kv_groups

    seq_start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - seq_start
    # The grid is sized by max_seqlen; query blocks past this sequence's end have nothing to do.
    if start_m * BLOCK_M >= seqlen:
        return

    # int64 token offsets: total_tokens * token_stride can exceed 2**31 for big packed batches.
    tok0 = seq_start.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seqlen

    q_ptrs = Q + (tok0 + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = K + tok0 * stride_kt + kv_head * stride_kh
    v_base = V + tok0 * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    state = (acc, l_i, m_i)
    query = (q, offs_m, offs_d, d_mask, qk_scale)

    if HAS_PREFIX:
        # The shared prefix first: every query row sees all of its keys, so only the last, partial
        # key block needs a (bounds) mask. Its block 0 holds key 0, visible to every row, so the
        # running max is finite from the first step on, as the own-key loops below assume. An
        # empty prefix runs neither loop and leaves the state as it was.
        prefix_start = tl.load(prefix_starts + seq).to(tl.int64)
        prefix_len = tl.load(prefix_lens + seq)
        tail = prefix_len // BLOCK_N * BLOCK_N  # where the partial last block (if any) starts
        pk_base = K + prefix_start * stride_kt + kv_head * stride_kh
        pv_base = V + prefix_start * stride_vt + kv_head * stride_vh
        prefix = (pk_base, pv_base, stride_kt, stride_vt, prefix_len)
        state = _attn_key_blocks(
            state, query, prefix, 0, tail, BLOCK_N, IEEE_DOT, MASK_KEYS=False, MASK_CAUSAL=False
        )
        state = _attn_key_blocks(
            state, query, prefix, tail, prefix_len, BLOCK_N, IEEE_DOT, MASK_KEYS=True, MASK_CAUSAL=False
        )

    own = (k_base, v_base, stride_kt, stride_vt, seqlen)
    if CAUSAL:
        # Key blocks that end at or before this query block's first row lie below the diagonal
        # for every row and inside the sequence: they run without masks. The remaining blocks,
        # up to this block's last row, need the diagonal mask; keys past the last row are above
        # the diagonal for every row and are never loaded.
        lo = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N
        hi = tl.minimum(seqlen, (start_m + 1) * BLOCK_M)
        state = _attn_key_blocks(
            state, query, own, 0, lo, BLOCK_N, IEEE_DOT, MASK_KEYS=False, MASK_CAUSAL=False
        )
    else:
        lo = 0
        hi = seqlen
    acc, l_i, m_i = _attn_key_blocks(
        state, query, own, lo, hi, BLOCK_N, IEEE_DOT, MASK_KEYS=True, MASK_CAUSAL=CAUSAL
    )

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


def check_prefix_values(prefix_starts: torch.Tensor, prefix_lens: torch.Tensor, total_tokens: int) -> None:
    """Value checks on prefix_starts / prefix_lens (host reads, so they synchronise CUDA tensors).

    Every prefix range [start, start + len) must lie inside the packed k/v tokens [0, total_tokens)
    and len >= 0; a sequence with len 0 has no prefix, and its start must still be in
    [0, total_tokens]. ``varlen_attention`` runs these only when the tensors live on the CPU, as
    for ``check_cu_seqlens_values``: on CUDA, validate once per batch with this function.
    """
    starts, lens = prefix_starts.tolist(), prefix_lens.tolist()
    for s, (start, n) in enumerate(zip(starts, lens, strict=True)):
        if n < 0:
            raise ValueError(f"prefix_lens must be >= 0, got prefix_lens[{s}] = {n}")
        if start < 0 or start + n > total_tokens:
            raise ValueError(
                f"prefix of sequence {s} (prefix_starts[{s}] = {start}, prefix_lens[{s}] = {n}) is out of "
                f"range: it must lie inside the {total_tokens} packed tokens"
            )


def _check_inputs(
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, prefix_starts, prefix_lens, dtypes
) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=dtypes)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [total_tokens, kv_heads, head_dim], got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k and v must have q's total_tokens and head_dim (only their head count may differ), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"q's head count ({heads}) must be a multiple of k and v's head count ({kv_heads}) "
            f"for grouped-query attention; got q {tuple(q.shape)}, k {tuple(k.shape)}"
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
    # It becomes a constexpr (a separate compiled variant): a tensor or None here would be a bug.
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a python bool, got {type(causal).__name__}")
    if (prefix_starts is None) != (prefix_lens is None):
        raise ValueError("prefix_starts and prefix_lens must be given together (or neither)")
    batch = cu_seqlens.numel() - 1
    for name, t in (("prefix_starts", prefix_starts), ("prefix_lens", prefix_lens)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != 1 or t.numel() != batch:
            raise ValueError(f"{name} must be 1-D [batch] = [{batch}], got shape {tuple(t.shape)}")
        if t.numel() > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    return max_seqlen


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=False, prefix_starts=None, prefix_lens=None
):
    """softmax(q k^T * scale) v within each packed sequence (causal: key j <= query i); a new contiguous tensor.

    With ``prefix_starts`` / ``prefix_lens`` (int32 [batch]) the keys of sequence s are its prefix
    k/v[prefix_starts[s] : prefix_starts[s] + prefix_lens[s]] (all visible) followed by its own.
    """
    max_seqlen = _check_inputs(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, prefix_starts, prefix_lens, SUPPORTED_DTYPES
    )
    device = check_device(
        _varlen_attn_fwd_kernel,
        q=q,
        k=k,
        v=v,
        cu_seqlens=cu_seqlens,
        prefix_starts=prefix_starts,
        prefix_lens=prefix_lens,
    )
    total, heads, head_dim = q.shape
    if cu_seqlens.device.type == "cpu":
        check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    has_prefix = prefix_starts is not None
    if has_prefix and prefix_starts.device.type == "cpu":
        check_prefix_values(prefix_starts, prefix_lens, total)
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=device)
    batch = cu_seqlens.numel() - 1
    if total == 0 or batch == 0 or max_seqlen == 0 or heads == 0:
        return out

    cfg = _launch_config(head_dim, q.dtype, on_gpu=not is_interpreted(_varlen_attn_fwd_kernel))
    grid = (batch * heads, triton.cdiv(max_seqlen, cfg.block_m))
    _varlen_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        prefix_starts,  # None without a prefix: a constexpr, so those variants have no such argument
        prefix_lens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        heads,
        heads // k.shape[1],
        scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        IEEE_DOT=q.dtype == torch.float32,
        CAUSAL=causal,
        HAS_PREFIX=has_prefix,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def varlen_attention_reference(
    q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, causal=False, prefix_starts=None, prefix_lens=None
):
    """Plain torch version of ``varlen_attention``: a loop over sequences, math in fp32.

    Also accepts float64 inputs (then the math is float64), which the tests use as ground truth.
    """
    dtypes = SUPPORTED_DTYPES + (torch.float64,)
    max_seqlen = _check_inputs(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, prefix_starts, prefix_lens, dtypes=dtypes
    )
    total, heads, head_dim = q.shape
    check_cu_seqlens_values(cu_seqlens, total, max_seqlen)
    batch = cu_seqlens.numel() - 1
    if prefix_starts is None:
        prefixes = [(0, 0)] * batch
    else:
        check_prefix_values(prefix_starts, prefix_lens, total)
        prefixes = list(zip(prefix_starts.tolist(), prefix_lens.tolist(), strict=True))
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((total, heads, head_dim), dtype=q.dtype, device=q.device)
    if heads == 0:
        return out
    # Grouped-query attention: kv head j serves query heads j * groups ... (j + 1) * groups - 1,
    # which is what repeat_interleave along the head dim produces (Hugging Face's repeat_kv).
    groups = heads // k.shape[1]
    bounds = cu_seqlens.tolist()
    for (start, end), (p_start, p_len) in zip(pairwise(bounds), prefixes, strict=True):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1).to(compute)  # [H, L, D]
        # Keys: the prefix (if any), then the sequence's own tokens.
        ks, vs = (
            torch.cat((t[p_start : p_start + p_len], t[start:end]))
            .repeat_interleave(groups, dim=1)
            .transpose(0, 1)
            .to(compute)
            for t in (k, v)
        )
        scores = (qs @ ks.transpose(1, 2)) * scale
        if causal:
            # Row i sees every prefix key and own keys 0..i, i.e. key column j <= p_len + i.
            above = torch.ones(end - start, p_len + end - start, dtype=torch.bool, device=q.device)
            scores = scores.masked_fill(above.triu(p_len + 1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out
