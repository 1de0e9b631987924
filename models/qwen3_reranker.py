"""A packed (padding-free) Qwen3 decoder that scores prompts the way Qwen3-Reranker does.

Qwen3-Reranker is a plain ``Qwen3ForCausalLM``: it reads a prompt holding the query and one
document and its relevance score is P("yes") against P("no") as the next token after the prompt.
This model returns ``logit(yes) - logit(no)`` at each sequence's last token, so that
``sigmoid(score) = softmax([logit(no), logit(yes)])[1] = P(yes)``; the full vocabulary is never
projected. The whole model is in this file, in the manner of gpt-fast's ``model.py`` (and of
cross_encoder.py): a config dataclass, a few small modules with shape comments, a short table from
Hugging Face weight names to ours, and a strict loader.

Inputs are packed as for the cross-encoder: ``input_ids [T]`` holds the tokens of all B sequences
back to back and ``cu_seqlens int32 [B + 1]`` their offsets. Matmuls and norms run on the T real
tokens; positions restart at 0 in every sequence; only attention needs to know where sequences
start and end. Two backends provide it:

* ``"triton"``: causal ``varlen_attention`` on the packed tokens, plus the ``rms_norm`` and
  ``silu_mul`` kernels of this package (the default on CUDA).
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on length
  buckets (cross_encoder._plan_buckets), with plain torch RMSNorm and SiLU (the default elsewhere).

``forward_shared`` scores a request's documents behind their shared prompt head, computing the
head once: every layer takes the tokens' rotary embedding (from explicit position ids) and an
``attention(q, k, v)`` function as inputs (``run``), so the same layers run the prefix tokens once
and give each document's tokens positions continuing after it and an attention over the prefix's
keys/values plus their own (the varlen kernel's ``prefix_starts``/``prefix_lens``, or SDPA on
buckets with an explicit mask: ``_plan_prefixed_buckets``).

Inference only: ``load_qwen3_reranker`` returns the model in eval mode with ``requires_grad``
off; call it under ``torch.inference_mode()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import assign_weights, read_state_dict, select_tensors
from .cross_encoder import ATTENTION_BACKENDS, _Buckets, _check_cu_seqlens, _plan_buckets
from .dtypes import check_torch_dtype

MODEL_TYPE = "qwen3"
# Token ids of "yes" and "no" in the Qwen3 vocabulary (tokenizer.json of Qwen/Qwen3-Reranker-*).
QWEN3_LABEL_TOKEN_IDS = (9693, 2152)
LABEL_TOKENS = ("yes", "no")

# (q, k, v) -> attention output: q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads, head_dim]
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
                f"{self.num_key_value_heads}: every key/value head must serve the same number of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embedding rotates pairs)")

    @property
    def max_seqlen(self) -> int:
        """Longest sequence: positions 0 .. max_position_embeddings - 1 (40960 for Qwen3-Reranker)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict) -> DecoderConfig:
        """From a Qwen3 config.json; what the model does not implement is refused by name.

        Absent fields take transformers' Qwen3Config defaults, so that both read a config alike
        (head_dim 128, not hidden / heads; num_key_value_heads 32, or the head count when null;
        rope_theta 10000; untied embeddings). The released configs name them all.
        """
        model_type = d.get("model_type", "")
        if model_type != MODEL_TYPE:
            raise ValueError(f"unsupported model_type {model_type!r}: only {MODEL_TYPE!r} decoders are implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: only 'silu' (SwiGLU) is implemented")
        if d.get("attention_bias", False):
            raise ValueError("unsupported attention_bias true: the q/k/v/o projections are implemented without bias")
        if d.get("use_sliding_window", False):
            raise ValueError("unsupported use_sliding_window true: only full causal attention is implemented")
        if any(t != "full_attention" for t in d.get("layer_types") or ()):
            raise ValueError(f"unsupported layer_types {sorted(set(d['layer_types']))}: only 'full_attention'")
        if d.get("rope_scaling") is not None:
            raise ValueError(f"unsupported rope_scaling {d['rope_scaling']!r}: only plain RoPE is implemented")
        # transformers 5 writes the RoPE settings as rope_parameters {rope_type, rope_theta}; older
        # releases and the Qwen3 model cards as a top-level rope_theta.
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_parameters {rope!r}: only rope_type 'default' is implemented")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", 32) or heads,
            head_dim=d.get("head_dim") or 128,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> DecoderConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# Norm / activation ops: plain torch, or the Triton kernels of this package
# ----------------------------------------------------------------------------------------------


class _TorchOps:
    @staticmethod
    def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
        """RMSNorm over the last dim as HF's Qwen3RMSNorm; with residual: (norm(x + residual), x + residual).

        Statistics in fp32, the normalized value rounded to x's dtype before the weight (as HF), the
        residual sum in x's dtype (HF's ``residual + hidden_states``).
        """
        h = x if residual is None else x + residual
        h32 = h.float()
        out = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return out if residual is None else (out, h)

    @staticmethod
    def silu_mul(gate_up: Tensor) -> Tensor:
        # gate_up [rows, 2 * intermediate] -> silu(gate) * up [rows, intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class _TritonOps:
    def __init__(self) -> None:
        # Imported here, not at module level: the sdpa backend must work without them, and the
        # kernels decide at import time whether they run compiled or under TRITON_INTERPRET.
        from ..kernels import rms_norm, silu_mul, varlen_attention

        self.rms_norm = rms_norm
        self.silu_mul = silu_mul
        self.varlen_attention = varlen_attention


# ----------------------------------------------------------------------------------------------
# Rotary embedding and attention over packed sequences
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """[head_dim / 2] float32 on the CPU, as HF's Qwen3RotaryEmbedding buffer (the same values on every device)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """position_ids [T], inv_freq [head_dim / 2] -> cos, sin [T, 1, head_dim] in dtype, computed in fp32 as HF."""
    freqs = position_ids[:, None].float() * inv_freq  # [T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [T, heads, head_dim], cos/sin [T, 1, head_dim] -> [T, heads, head_dim] (HF's rotate_half form)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


_SDPA_HAS_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(enable_gqa=...)


# One SDPA call per bucket: (q_gather [nb, Lq], kv_gather [nb, Lk] rows of the packed q and k/v,
# mask [nb, 1, Lq, Lk] bool (True = visible) or None for is_causal, keep [n] real query slots).
_SdpaBucket = tuple[Tensor, Tensor, Tensor | None, Tensor]


def _sdpa_buckets(q: Tensor, k: Tensor, v: Tensor, buckets: list[_SdpaBucket], inverse: Tensor,
                  scale: float) -> Tensor:
    """q [R, heads, hd], k/v [R, kv_heads, hd] -> [len(inverse), heads, hd]: the buckets' real query
    rows, in the order ``inverse`` gives (row ``inverse[t]`` of the concatenated bucket outputs).

    GQA through ``enable_gqa=True``: on torch's CPU flash kernel it reads each key/value head for
    its query-head group without the copies repeat_interleave makes (same results, bit for bit, on
    torch 2.13); torch before 2.5, which lacks the argument, gets the copies.
    """
    heads, head_dim = q.shape[1:]
    group = heads // k.shape[1]
    gqa = {"enable_gqa": True} if group > 1 and _SDPA_HAS_GQA else {}
    if group > 1 and not gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [R, heads, hd]
    # index_select rather than advanced indexing: the same rows, 3-7x faster on a CPU.
    outs = []
    for q_gather, kv_gather, mask, keep in buckets:
        nb, L = q_gather.shape
        qb = q.index_select(0, q_gather.flatten()).view(nb, L, heads, head_dim).transpose(1, 2)  # [nb, heads, Lq, hd]
        kb, vb = (t.index_select(0, kv_gather.flatten()).view(*kv_gather.shape, *t.shape[1:]).transpose(1, 2)
                  for t in (k, v))  # [nb, heads or kv_heads, Lk, hd]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           **gqa)  # [nb, heads, Lq, hd]
        outs.append(o.transpose(1, 2).reshape(nb * L, heads, head_dim).index_select(0, keep))  # [n_real, heads, hd]
    return torch.cat(outs).index_select(0, inverse)


def _sdpa_causal_attention(q: Tensor, k: Tensor, v: Tensor, plan: _Buckets, scale: float) -> Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] -> [T, heads, hd], causal within each packed sequence.

    Sequences are padded on the right inside a bucket, so ``is_causal=True`` is exact for the
    real rows (their keys are the sequence's tokens up to themselves, never padding); padded rows
    are dropped. No mask is needed: causal masking hides right padding.
    """
    buckets = [(gather, gather, None, keep) for gather, _mask, keep in plan.buckets]
    return _sdpa_buckets(q, k, v, buckets, plan.inverse, scale)


@dataclass
class _PrefixedBuckets:
    buckets: list[_SdpaBucket]  # queries: own rows; keys: the group's prefix rows, then the own rows
    inverse: Tensor  # [T] long: row of the concatenated bucket outputs holding own token t


def _plan_prefixed_buckets(prefix_starts: Tensor, prefix_lens: Tensor, own_cu: Tensor, own_row0: int,
                           device: torch.device, min_bucket: int = 16) -> _PrefixedBuckets:
    """SDPA buckets for sequences behind a shared prefix (forward_shared's own rows).

    prefix_starts, prefix_lens [B] (host, long): the rows of each sequence's prefix; own_cu [B + 1]
    (host): offsets of the sequences' own tokens, which sit at rows own_row0 + own_cu[i] ...
    Query slots are a sequence's own rows; key slots are its prefix rows, then its own rows (the
    keys of the full sequence, in order), then padding (a repeated real row).

    Why this design:
    * SDPA has no packed or prefix form, so each sequence's keys are gathered next to each other.
      The prefix keys are gathered once per sequence (the attention over them is per sequence
      anyway); what is computed once per prefix are the projections, norms and MLPs of its rows.
    * Queries and keys differ in length, and SDPA's ``is_causal`` aligns the diagonal top-left
      (query j sees keys 0..j), which would hide most of the prefix. An explicit boolean mask,
      built here once per forward, is exact: key slot s is visible to query slot j iff
      s <= prefix_len + j (all of the prefix, own keys causally) and s < prefix_len + own_len
      (never padding). Padded query rows (dropped afterwards) still see key 0, so no row is all
      masked and no NaN appears. The mask costs a byte per (query, key) slot pair, less than one
      layer's gathered keys/values as long as the own length is below 2 * kv_heads * head_dim *
      itemsize (4096 for Qwen3-Reranker-0.6B in bfloat16).
    * Buckets are power-of-two classes of both the own length and the key length (prefix + own),
      so the padding is below 2x in each of the two dimensions of the Lq x Lk attention (bucketing
      on one of them alone leaves the other unbounded once prefix lengths differ). Within one group
      (the usual request) the key classes split each own-length class at most once, so the SDPA
      calls stay within twice what _plan_buckets makes of the own lengths.
    * Batch invariance as in _plan_buckets: padding keys get weight exactly 0 and padding queries
      are dropped, so a sequence's output does not depend on its bucket mates beyond float
      summation order; every bucket has a mask, so SDPA picks the same kernel family for all.
    """
    own_starts = own_cu[:-1].long()
    own_lens = own_cu[1:].long() - own_starts  # [B]
    key_lens = prefix_lens + own_lens  # [B]
    # Bucket (i, j): own length in (2^(i-1), 2^i], key length in (2^(j-1), 2^j]; float log2 of an
    # integer is exact at powers of two. Key lengths stay far below 2^32.
    own_class = torch.log2(own_lens.clamp(min=min_bucket).double()).ceil().long()
    key_class = torch.log2(key_lens.clamp(min=min_bucket).double()).ceil().long()
    bucket = (own_class << 32) + key_class  # [B]
    buckets, dst = [], []
    for k in torch.unique(bucket).tolist():
        seqs = (bucket == k).nonzero().squeeze(1)  # [nb]
        p_start, p_len = prefix_starts[seqs, None], prefix_lens[seqs, None]  # [nb, 1]
        o_start, o_len = own_row0 + own_starts[seqs, None], own_lens[seqs, None]  # [nb, 1]
        q_slot = torch.arange(int(o_len.max()))[None, :]  # [1, Lq]
        k_slot = torch.arange(int(key_lens[seqs].max()))[None, :]  # [1, Lk]
        q_valid = q_slot < o_len  # [nb, Lq]
        q_gather = torch.where(q_valid, o_start + q_slot, o_start)  # [nb, Lq]
        kv_gather = torch.where(k_slot < p_len, p_start + k_slot,
                                torch.where(k_slot < p_len + o_len, o_start + k_slot - p_len, o_start))  # [nb, Lk]
        mask = (k_slot[:, None, :] <= (p_len + q_slot)[:, :, None]) & (k_slot < p_len + o_len)[:, None, :]
        keep = q_valid.flatten().nonzero().squeeze(1)  # [n_tokens]
        dst.append(q_gather.flatten()[keep] - own_row0)
        buckets.append((q_gather.to(device), kv_gather.to(device), mask[:, None].to(device), keep.to(device)))
    order = torch.cat(dst)  # own token index of each row of the concatenated outputs
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return _PrefixedBuckets(buckets, inverse.to(device))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)  # rows: q, k, v
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows: gate, up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None, rope: tuple[Tensor, Tensor], attention: Attention,
                ops, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pre-norm block; returns (mlp output, residual stream): the next layer adds them (HF's order).

        x, residual [T, hidden] (residual None before the first layer) -> two [T, hidden], or
        [len(keep), hidden] when keep (row indices) is given.
        """
        if residual is None:
            h, residual = ops.rms_norm(x, self.input_norm.weight, self.input_norm.eps), x
        else:
            h, residual = ops.rms_norm(x, self.input_norm.weight, self.input_norm.eps, residual=residual)
        T = h.shape[0]
        qkv = self.qkv(h).view(T, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)  # views, last dim contiguous
        cos, sin = rope
        q = apply_rope(ops.rms_norm(q, self.q_norm.weight, self.q_norm.eps), cos, sin)  # [T, heads, hd]
        k = apply_rope(ops.rms_norm(k, self.k_norm.weight, self.k_norm.eps), cos, sin)  # [T, kv_heads, hd]
        a = attention(q, k, v).reshape(T, self.heads * self.head_dim)  # [T, heads * hd]
        if keep is not None:  # last layer: only the last tokens feed the head
            a, residual = a[keep], residual[keep]
        h, residual = ops.rms_norm(self.o_proj(a), self.post_attention_norm.weight, self.post_attention_norm.eps,
                                   residual=residual)
        return self.down_proj(ops.silu_mul(self.gate_up(h))), residual  # [rows, hidden] x 2


class LabelHead(nn.Module):
    """The final RMSNorm and the two LM-head rows of the label tokens ("yes", "no"): logit(yes) - logit(no).

    Kept in float32 whatever the decoder's dtype (load_qwen3_reranker), for the last tokens only:
    it costs nearly nothing, and in bfloat16 each logit would be rounded to 8 significant bits
    (a logit near 20 moves by up to 1/16) before the difference, tying documents that float32
    ranks apart. The residual sum feeding the norm is taken in float32 too.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.weight = nn.Parameter(torch.empty(2, cfg.hidden_size))  # rows: yes, no

    def forward(self, x: Tensor) -> Tensor:
        # x [B, hidden] float32 (the last token of each sequence) -> [B]
        h = _TorchOps.rms_norm(x, self.norm.weight, self.norm.eps)
        logits = F.linear(h, self.weight)  # [B, 2]
        return logits[:, 0] - logits[:, 1]


class PackedQwen3Reranker(nn.Module):
    def __init__(self, cfg: DecoderConfig, label_token_ids: tuple[int, int] = QWEN3_LABEL_TOKEN_IDS,
                 attention_backend: str = "sdpa") -> None:
        super().__init__()
        yes, no = label_token_ids
        for name, token_id in zip(LABEL_TOKENS, label_token_ids, strict=True):
            if not 0 <= token_id < cfg.vocab_size:
                raise ValueError(f"label token {name!r} id {token_id} is outside the vocabulary (size {cfg.vocab_size})")
        if yes == no:
            raise ValueError(f"the 'yes' and 'no' label tokens must differ, both are id {yes}")
        self.config = cfg
        self.label_token_ids = (yes, no)
        self.attention_backend = attention_backend
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = LabelHead(cfg)
        self._inv_freq: dict[torch.device, Tensor] = {}  # per device; not a buffer, so never a checkpoint tensor

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(device)
        return self._inv_freq[device]

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {name!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
        self._attention_backend = name

    @staticmethod
    def position_ids(cu_seqlens: Tensor, total_tokens: int) -> Tensor:
        # cu_seqlens [B+1] -> [T]: index of each token within its sequence (0, 1, ... per sequence)
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens,
                                      output_size=total_tokens)  # [T] sequence of each token
        return torch.arange(total_tokens, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """input_ids [T] long, cu_seqlens [B+1] int32 -> logit(yes) - logit(no) at each last token, [B] fp32.

        Pass cu_seqlens on the CPU (the server does): it is checked there once per forward, with no
        device sync (starts at 0, every sequence non-empty since its last token feeds the head,
        ends at T, longest <= max_seqlen <= ``config.max_seqlen``), then copied to the model's
        device once. A cu_seqlens already on a GPU is trusted unchecked, as a host read would sync.
        """
        cfg = self.config
        if input_ids.dim() != 1 or cu_seqlens.dim() != 1:
            raise ValueError("input_ids must be [total_tokens] and cu_seqlens [batch + 1] (packed, 1-D)")
        if max_seqlen > cfg.max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds the model's limit of {cfg.max_seqlen} tokens")
        T, B = input_ids.shape[0], cu_seqlens.shape[0] - 1
        if B <= 0:
            return torch.empty(0, dtype=torch.float32, device=input_ids.device)
        host_cu = cu_seqlens if cu_seqlens.device.type == "cpu" else None
        if host_cu is not None:
            _check_cu_seqlens(host_cu, T, max_seqlen)
        cu_seqlens = cu_seqlens.to(input_ids.device, torch.int32, non_blocking=True).contiguous()
        scale = cfg.head_dim**-0.5
        if self.attention_backend == "triton":
            ops = _TritonOps()

            def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, causal=True)
        else:
            ops = _TorchOps()
            plan = _plan_buckets(cu_seqlens if host_cu is None else host_cu, input_ids.device)

            def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return _sdpa_causal_attention(q, k, v, plan, scale)

        last = cu_seqlens[1:].long() - 1  # [B] index of each sequence's last token
        return self.run(input_ids, self.position_ids(cu_seqlens, T), attention, ops, last)

    def forward_shared(self, prefix_ids: Tensor, prefix_cu: Tensor, input_ids: Tensor, cu_seqlens: Tensor,
                       groups: Tensor, max_seqlen: int, max_prefix: int) -> Tensor:
        """Scores of sequences behind shared prefixes, each prefix computed once: [B] fp32.

        prefix_ids [P] long, prefix_cu int32 [G + 1]: G prefixes packed as forward packs sequences
        (every prefix non-empty, the longest <= max_prefix). input_ids [T] long, cu_seqlens int32
        [B + 1]: each sequence's own tokens, those after its prefix (every sequence non-empty, since
        its last token is scored; the longest <= max_seqlen). groups [B] int32/int64: the prefix of
        each sequence (a prefix no sequence names is computed for nothing). Returns what ``forward``
        returns for the sequences ``prefix[groups[i]] + own[i]``, whose lengths must not exceed
        ``config.max_seqlen``.

        All of the documents of a reranking request share a head (system prompt, instruction,
        query). In a causal model the head's keys/values do not depend on what follows, so one
        token-wise pass runs over rows = [all prefix tokens ; all own tokens] (embeddings, norms,
        projections and MLPs once per prefix token): prefix rows at positions 0 .. P_g - 1, attending
        causally within their prefix; own rows at positions P_g + j, attending to every row of their
        prefix, then causally to their own rows. The last layer runs o_proj and the MLP only for each
        sequence's last row (``run``). prefix_cu, cu_seqlens and groups are read on the host (pass
        them on the CPU: a GPU tensor costs a sync) and checked there once per forward.
        """
        cfg = self.config
        if any(t.dim() != 1 for t in (prefix_ids, prefix_cu, input_ids, cu_seqlens, groups)):
            raise ValueError("prefix_ids [prefix_tokens], prefix_cu [groups + 1], input_ids [total_tokens], "
                             "cu_seqlens [batch + 1] and groups [batch] must be 1-D (packed)")
        for name, value in (("max_seqlen", max_seqlen), ("max_prefix", max_prefix)):
            if value > cfg.max_seqlen:
                raise ValueError(f"{name} {value} exceeds the model's limit of {cfg.max_seqlen} tokens")
        P, T, G, B = prefix_ids.shape[0], input_ids.shape[0], prefix_cu.shape[0] - 1, cu_seqlens.shape[0] - 1
        if groups.shape[0] != max(B, 0):
            raise ValueError(f"groups has {groups.shape[0]} entries for {max(B, 0)} sequences (one per sequence)")
        if groups.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"groups must be int32 or int64, got {groups.dtype}")
        device = input_ids.device
        if B <= 0:
            return torch.empty(0, dtype=torch.float32, device=device)
        prefix_cu, cu, groups = (t.to("cpu", torch.int64) for t in (prefix_cu, cu_seqlens, groups))
        _check_cu_seqlens(cu, T, max_seqlen)
        prefix_lens = prefix_cu[1:] - prefix_cu[:-1]  # [G]
        if G <= 0:
            raise ValueError("prefix_cu must hold at least one prefix ([groups + 1] offsets)")
        if int(prefix_cu[0]) != 0 or int(prefix_cu[-1]) != P:
            raise ValueError(f"prefix_cu must run from 0 to prefix_tokens = {P}, "
                             f"got {int(prefix_cu[0])} .. {int(prefix_cu[-1])}")
        if bool((prefix_lens <= 0).any()):
            raise ValueError("every prefix must have at least one token (prefix_cu must be increasing)")
        if int(prefix_lens.max()) > max_prefix:
            raise ValueError(f"max_prefix = {max_prefix} is smaller than the longest prefix ({int(prefix_lens.max())})")
        if bool(((groups < 0) | (groups >= G)).any()):
            raise ValueError(f"groups must name prefixes 0 .. {G - 1}, got {int(groups.min())} .. {int(groups.max())}")
        own_lens = cu[1:] - cu[:-1]  # [B]
        seq_prefix_lens, seq_prefix_starts = prefix_lens[groups], prefix_cu[:-1][groups]  # [B]
        full = seq_prefix_lens + own_lens  # [B]
        if int(full.max()) > cfg.max_seqlen:
            i = int(full.argmax())
            raise ValueError(f"sequence {i} has {int(seq_prefix_lens[i])} prefix + {int(own_lens[i])} own tokens = "
                             f"{int(full[i])}, over the model's limit of {cfg.max_seqlen} tokens")

        rows = torch.cat([prefix_ids.to(device), input_ids])  # [P + T]: the prefixes, then the own tokens
        positions = torch.cat([self.position_ids(prefix_cu, P),
                               self.position_ids(cu, T) + torch.repeat_interleave(seq_prefix_lens, own_lens)])
        last = P + cu[1:] - 1  # [B] row of each sequence's last (own) token
        scale = cfg.head_dim**-0.5
        if self.attention_backend == "triton":
            ops = _TritonOps()
            # One launch per layer over G + B segments: the prefixes as ordinary causal sequences
            # (no prefix of their own), then each sequence's own rows behind its group's prefix.
            cu_all = torch.cat([prefix_cu, P + cu[1:]]).to(device, torch.int32)
            none = torch.zeros(G, dtype=torch.int64)
            starts = torch.cat([none, seq_prefix_starts]).to(device, torch.int32)
            lens = torch.cat([none, seq_prefix_lens]).to(device, torch.int32)
            max_all = max(max_prefix, max_seqlen)

            def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return ops.varlen_attention(q, k, v, cu_all, max_all, softmax_scale=scale, causal=True,
                                            prefix_starts=starts, prefix_lens=lens)
        else:
            ops = _TorchOps()
            prefix_plan = _plan_buckets(prefix_cu, device)  # prefix rows: causal, as forward's sequences
            own_plan = _plan_prefixed_buckets(seq_prefix_starts, seq_prefix_lens, cu, P, device)

            def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                return torch.cat([_sdpa_causal_attention(q[:P], k[:P], v[:P], prefix_plan, scale),
                                  _sdpa_buckets(q, k, v, own_plan.buckets, own_plan.inverse, scale)])

        return self.run(rows, positions.to(device), attention, ops, last.to(device))

    def run(self, input_ids: Tensor, position_ids: Tensor, attention: Attention, ops, last: Tensor) -> Tensor:
        """The decoder on T tokens at explicit positions with a given attention: scores of the rows `last`.

        input_ids, position_ids [T] long, attention(q, k, v) as the layers call it, ops _TorchOps
        or _TritonOps, last [B] long -> [B] float32. forward is this on packed sequences.
        """
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = rope_cos_sin(position_ids, self.inv_freq(x.device), x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, attention, ops, keep=last if i == len(self.layers) - 1 else None)
        h = x[last].float() if residual is None else x.float() + residual.float()  # [B, hidden]
        return self.head(h)  # [B] float32


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------

_LAYER_NAMES = {  # layers.{i}.<ours>.weight <- model.layers.{i}.<theirs>.weight (several: concatenated)
    "input_norm": ("input_layernorm",),
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "q_norm": ("self_attn.q_norm",),
    "k_norm": ("self_attn.k_norm",),
    "o_proj": ("self_attn.o_proj",),
    "post_attention_norm": ("post_attention_layernorm",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}


def hf_name_map(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
    """Module parameter name -> the HF checkpoint name(s) it is built from.

    ``head.weight`` is built from two rows (yes, no) of the named tensor: the LM head, or the
    token embedding when the config ties them.
    """
    table = {"embed_tokens.weight": ("model.embed_tokens.weight",)}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in _LAYER_NAMES.items():
            table[f"layers.{i}.{ours}.weight"] = tuple(f"model.layers.{i}.{t}.weight" for t in theirs)
    table["head.norm.weight"] = ("model.norm.weight",)
    table["head.weight"] = ("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",)
    return table


def convert_hf_state_dict(cfg: DecoderConfig, hf: dict[str, Tensor],
                          label_token_ids: tuple[int, int]) -> dict[str, Tensor]:
    """Map an HF Qwen3ForCausalLM state dict to this module's names (fusing QKV and gate/up, keeping
    the two label rows of the LM head); strict about missing/unexpected names and the head's shape."""
    table = hf_name_map(cfg)
    # A tied checkpoint may still carry lm_head.weight (some exporters write the shared tensor
    # twice); transformers ignores it and uses the embedding, so do we.
    state = select_tensors(hf, table, model_name="Qwen3 decoder",
                           ignored=lambda name: cfg.tie_word_embeddings and name == "lm_head.weight")
    (source,) = table["head.weight"]
    lm_head = state["head.weight"]
    if lm_head.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"tensor for head.weight ({source}) has shape {tuple(lm_head.shape)}, config implies "
                         f"{(cfg.vocab_size, cfg.hidden_size)}")
    state["head.weight"] = lm_head[list(label_token_ids)]  # [2, hidden]: yes, no
    return state


def label_token_ids(model_dir: str | Path) -> tuple[int, int]:
    """(id of "yes", id of "no") in the directory's tokenizer.json: (9693, 2152) for Qwen3."""
    from tokenizers import Tokenizer

    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}: it names the ids of the label tokens "
                                f"{' and '.join(map(repr, LABEL_TOKENS))}; pass label_token_ids explicitly")
    tokenizer = Tokenizer.from_file(str(file))
    ids = tuple(tokenizer.token_to_id(token) for token in LABEL_TOKENS)
    if missing := [token for token, i in zip(LABEL_TOKENS, ids, strict=True) if i is None]:
        raise ValueError(f"{file} has no token {' or '.join(map(repr, missing))}: a Qwen3 reranker scores the "
                         f"next-token logits of {' and '.join(map(repr, LABEL_TOKENS))}")
    return ids  # type: ignore[return-value]


_label_token_ids_of = label_token_ids  # load_qwen3_reranker's argument of the same name shadows it


def load_qwen3_reranker(model_path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attention_backend: str | None = None,
                        label_token_ids: tuple[int, int] | None = None) -> PackedQwen3Reranker:
    """Load an HF Qwen3ForCausalLM directory (config.json + weights) as a PackedQwen3Reranker in eval mode.

    label_token_ids (yes, no) None reads them from the directory's tokenizer.json.
    attention_backend None picks "triton" on CUDA and "sdpa" elsewhere. The weights are copies the
    model owns (see models/checkpoint.py); the label head is float32 from the checkpoint's values
    whatever ``dtype`` (see LabelHead).
    """
    check_torch_dtype(dtype)
    path = Path(model_path)
    device = torch.device(device)
    if attention_backend is None:
        attention_backend = "triton" if device.type == "cuda" else "sdpa"
    cfg = DecoderConfig.from_json(path / "config.json")
    labels = _label_token_ids_of(path) if label_token_ids is None else tuple(label_token_ids)
    with torch.device("meta"):
        model = PackedQwen3Reranker(cfg, label_token_ids=labels, attention_backend=attention_backend)
    state = convert_hf_state_dict(cfg, read_state_dict(path), model.label_token_ids)
    assign_weights(model, state, dtype=dtype, device=device, source_names=hf_name_map(cfg))
    model.head.float()
    with torch.no_grad():  # the checkpoint's values, not their round trip through dtype
        for name, param in model.head.named_parameters():
            param.copy_(state[f"head.{name}"])
    return model.eval().requires_grad_(False)
