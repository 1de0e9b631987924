"""A packed (padding-free) cross-encoder: XLM-RoBERTa / RoBERTa / BERT with a one-logit head.

The whole model is in this file, in the manner of gpt-fast's ``model.py``: a config dataclass, a
few small modules with shape comments, a short table from Hugging Face weight names to ours, and
a strict loader. It covers ``XLMRobertaForSequenceClassification`` (BAAI/bge-reranker-v2-m3),
``RobertaForSequenceClassification`` and ``BertForSequenceClassification``
(cross-encoder/ms-marco-MiniLM-L-6-v2) with ``num_labels == 1``.

Inputs are packed: the tokens of all B sequences are concatenated into ``input_ids [T]`` and
``cu_seqlens int32 [B + 1]`` holds the offsets (sequence i is ``cu_seqlens[i]:cu_seqlens[i+1]``),
so every matmul and norm runs on the ``T`` real tokens only, never on padding. Only attention
needs to know where sequences start and end; two backends provide it:

* ``"triton"``: ``varlen_attention`` on the packed tokens, plus the fused ``add_layer_norm`` and
  ``bias_gelu`` kernels of this package (the default on CUDA).
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` on length buckets (the
  default elsewhere; see ``_plan_buckets`` for the design), with plain torch norms and GELU.

Inference only: ``load_cross_encoder`` returns the model in eval mode with ``requires_grad``
off; call it under ``torch.inference_mode()``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import families
from .checkpoint import assign_weights, read_state_dict, select_tensors
from .dtypes import QUANTIZE_NAMES, check_torch_dtype
from .int8_linear import Int8Linear, check_int8_support

ATTENTION_BACKENDS = ("triton", "sdpa")
# The linears `quantize="int8"` makes int8 (the head stays float32: see ClassificationHead).
QUANTIZED_LINEARS = ("qkv", "attn_out", "ffn_in", "ffn_out")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    model_type: str  # one of families.CROSS_ENCODER_TYPES
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    layer_norm_eps: float = 1e-12
    num_labels: int = 1
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.model_type not in families.CROSS_ENCODER_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: expected one of "
                f"{', '.join(families.CROSS_ENCODER_TYPES)}"
            )
        if self.num_labels != 1:
            raise ValueError(
                f"a cross-encoder reranker has one output logit, but this config has num_labels="
                f"{self.num_labels}; multi-label classification heads are not supported"
            )
        if self.hidden_act != "gelu":
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}: only 'gelu' (exact erf GELU) is implemented"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def is_roberta(self) -> bool:
        return self.model_type in families.ROBERTA_TYPES

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        # RoBERTa numbers positions from padding_idx + 1 (HF create_position_ids_from_input_ids on
        # unpadded input); BERT from 0.
        return families.position_offset(self.model_type, self.pad_token_id)

    @property
    def max_seqlen(self) -> int:
        """Longest sequence the position table covers: 8192 for bge-reranker-v2-m3, 512 for MiniLM.

        The same rule as the tokenizer step's (families.max_input_length).
        """
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf_dict(cls, d: dict) -> EncoderConfig:
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {d['position_embedding_type']!r}: only 'absolute'"
            )
        if "num_labels" in d:
            num_labels = int(d["num_labels"])
        elif "id2label" in d:
            num_labels = len(d["id2label"])
        else:
            num_labels = 2  # what transformers assumes when config.json names no labels
        return cls(
            model_type=d.get("model_type", ""),
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            # Absent or null (some configs write "pad_token_id": null): the family's own.
            pad_token_id=families.default_pad_token_id(d.get("model_type", "")) if d.get("pad_token_id") is None
            else d["pad_token_id"],
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            num_labels=num_labels,
            hidden_act=d.get("hidden_act", "gelu"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# Elementwise / norm ops: plain torch, or the fused Triton kernels of this package
# ----------------------------------------------------------------------------------------------


class _TorchOps:
    @staticmethod
    def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        # LayerNorm(x + residual) with the sum and statistics in fp32, result in x's dtype.
        h = x.float() if residual is None else x.float() + residual.float()
        return F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)

    @staticmethod
    def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
        # exact (erf) GELU, as HF's "gelu"; in x's dtype even where the bias is kept in float32 (int8 linears)
        return F.gelu(x + bias.to(x.dtype))


class _TritonOps:
    def __init__(self) -> None:
        # Imported here, not at module level: the sdpa backend must work without them, and the
        # kernels decide at import time whether they run compiled or under TRITON_INTERPRET.
        from ..kernels import add_layer_norm, bias_gelu, varlen_attention

        self.add_layer_norm = add_layer_norm
        self.bias_gelu = bias_gelu
        self.varlen_attention = varlen_attention


# ----------------------------------------------------------------------------------------------
# Attention over packed sequences
# ----------------------------------------------------------------------------------------------


@dataclass
class _Buckets:
    # One entry per bucket of nb sequences padded to L tokens:
    #   gather [nb, L] long: packed token index of each slot (padding slots repeat a real token)
    #   mask   [nb, 1, 1, L] bool: key padding mask, True = real token
    #   keep   [n] long: flat indices (into nb * L) of the real slots, in packed order per sequence
    buckets: list[tuple[Tensor, Tensor, Tensor]]
    inverse: Tensor  # [T] long: row of the concatenated bucket outputs holding packed token t


def _plan_buckets(cu_seqlens: Tensor, device: torch.device, min_bucket: int = 16) -> _Buckets:
    """Group sequences into power-of-two length buckets for SDPA.

    Why power-of-two buckets, padded within a bucket to the longest member and masked:
    * Padding everything to the global max costs up to (max/mean)x attention work and memory;
      a bucket spans lengths (2^(k-1), 2^k], so its padding is below 2x of its real tokens (in
      practice far less, since it pads to the bucket's longest member, not to 2^k).
    * The number of SDPA calls is bounded by log2(max_len) (about 6 for 512 tokens with
      min_bucket 16), whereas one call per distinct length (the exact, padding-free alternative)
      can mean hundreds of tiny launches per layer for a batch of mixed lengths.
    * Batch invariance: padding keys are masked out (weight exactly 0 after softmax) and padding
      query rows are dropped, so a sequence's output does not depend on its bucket mates beyond
      float summation order. A mask is passed even to buckets without padding so that SDPA picks
      the same kernel family whatever the bucket's composition.
    The plan is built once per forward (one host sync to read the lengths) and reused by every
    layer.
    """
    cu = cu_seqlens.to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]  # [B]
    # Bucket k holds lengths in (2^(k-1), 2^k]; float log2 of an integer is exact at powers of two.
    bucket = torch.log2(lens.clamp(min=min_bucket).double()).ceil().long()  # [B]
    buckets, dst = [], []
    for k in torch.unique(bucket).tolist():
        seqs = (bucket == k).nonzero().squeeze(1)  # [nb]
        starts, n = cu[seqs], lens[seqs]  # [nb], [nb]
        slot = torch.arange(int(n.max()))  # [L]
        valid = slot[None, :] < n[:, None]  # [nb, L]
        gather = torch.where(valid, starts[:, None] + slot[None, :], starts[:, None])  # [nb, L]
        keep = valid.flatten().nonzero().squeeze(1)  # [n_tokens]
        dst.append(gather.flatten()[keep])
        buckets.append((gather.to(device), valid[:, None, None, :].to(device), keep.to(device)))
    order = torch.cat(dst)  # packed token index of each row of the concatenated outputs
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return _Buckets(buckets, inverse.to(device))


def _sdpa_attention(qkv: Tensor, plan: _Buckets, scale: float) -> Tensor:
    # qkv [T, 3, heads, head_dim] -> [T, heads, head_dim]
    # index_select rather than advanced indexing: the same rows, 3-7x faster on a CPU.
    heads, head_dim = qkv.shape[2:]
    outs = []
    for gather, mask, keep in plan.buckets:
        nb, L = gather.shape
        rows = qkv.index_select(0, gather.flatten()).view(nb, L, 3, heads, head_dim)
        q, k, v = rows.permute(2, 0, 3, 1, 4).unbind(0)  # each [nb, heads, L, head_dim]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [nb, heads, L, hd]
        outs.append(o.transpose(1, 2).reshape(nb * L, heads, head_dim).index_select(0, keep))  # [n_real, heads, hd]
    return torch.cat(outs).index_select(0, plan.inverse)


def _check_cu_seqlens(cu_seqlens: Tensor, total_tokens: int, max_seqlen: int) -> None:
    """ValueError unless the host cu_seqlens [B+1] packs B non-empty sequences of T tokens, none > max_seqlen."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to total_tokens = {total_tokens}, "
                         f"got {int(cu[0])} .. {int(cu[-1])}")
    if bool((lens <= 0).any()):
        raise ValueError("every sequence must have at least one token (cu_seqlens must be increasing)")
    if int(lens.max()) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({int(lens.max())})")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None, ops) -> Tensor:
        # input_ids, position_ids, token_type_ids [T] -> [T, hidden]
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        # HF order: (word + token_type) + position, then LayerNorm.
        return ops.add_layer_norm(x, self.position_embeddings(position_ids), self.norm.weight,
                                  self.norm.bias, self.norm.eps)


class Linear(nn.Linear):
    """nn.Linear that also gives its product without the bias, for a bias fused into the next op
    (int8_linear.Int8Linear has the same two calls)."""

    def matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows: query, key, value
        self.attn_out = Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, attention, ops, keep: Tensor | None = None) -> Tensor:
        # x [T, hidden] -> [T, hidden], or [len(keep), hidden] when keep (row indices) is given
        T, hidden = x.shape
        qkv = self.project(x).view(T, 3, self.num_heads, self.head_dim)  # [T, 3, heads, head_dim]
        a = attention(qkv).reshape(T, hidden)  # [T, hidden]
        if keep is not None:  # last layer: only the first tokens feed the head
            a, x = a[keep], x[keep]
        return self.finish(a, x, ops)

    # The layer around attention, in two blocks that torch.compile may fuse (PackedCrossEncoder.compile_layers).

    def project(self, x: Tensor) -> Tensor:
        return self.qkv(x)  # [rows, hidden] -> [rows, 3 * hidden]

    def finish(self, a: Tensor, x: Tensor, ops) -> Tensor:
        # a (attention output), x (residual) [rows, hidden] -> [rows, hidden]
        x = ops.add_layer_norm(self.attn_out(a), x, self.attn_norm.weight, self.attn_norm.bias,
                               self.attn_norm.eps)
        h = ops.bias_gelu(self.ffn_in.matmul(x), self.ffn_in.bias)  # [rows, intermediate]
        return ops.add_layer_norm(self.ffn_out(h), x, self.ffn_norm.weight, self.ffn_norm.bias,
                                  self.ffn_norm.eps)


class ClassificationHead(nn.Module):
    """RoBERTa's classifier (dense, tanh, out_proj) and BERT's pooler + classifier compute the same.

    Kept in float32 whatever the encoder's dtype (load_cross_encoder): one token per pair makes it
    nearly free, and in bfloat16 the score itself would be rounded to 8 significant bits (a logit
    near 4 moves by up to 1/64), which ties pairs that float32 ranks apart.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        # x [B, hidden] (first token of each sequence) -> [B]
        return self.out_proj(torch.tanh(self.dense(x))).squeeze(-1)


class PackedCrossEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend = attention_backend
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = ClassificationHead(cfg)

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {name!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
        self._attention_backend = name

    def quantize_int8(self) -> None:
        """Replaces every layer's linears by int8 ones, quantized from their current (float32) weights."""
        for layer in self.layers:
            for name in QUANTIZED_LINEARS:
                setattr(layer, name, Int8Linear.from_linear(getattr(layer, name)))

    def compile_layers(self) -> None:
        """torch.compile each layer's blocks around attention, for any token count (attention and the
        bucketing stay eager). Compiling happens on the first calls: warm_up() makes them."""
        import torch._dynamo
        import torch._inductor.config

        if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
            raise RuntimeError("compiling the encoder (compile, or quantize int8) needs a C++ compiler, which "
                               "torch.compile runs on a CPU: install g++ (apt-get install g++), or turn both off")
        # Compile in this process: the model may run inside a server's worker, where a pool of
        # compiler processes is not wanted.
        torch._inductor.config.compile_threads = 1
        # Every layer (of every model in the process) shares the blocks' code, whose compiled variants
        # torch caps (8 by default, then runs eager): two per shape and precision are needed.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for layer in self.layers:
            layer.project = torch.compile(layer.project, dynamic=True)
            layer.finish = torch.compile(layer.finish, dynamic=True)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Runs the shapes that make compiled blocks compile (one token and one sequence, which torch
        specializes, then any other count), so that no request pays for it."""
        device = self.embeddings.word_embeddings.weight.device
        for lengths in ([1], [2, 3]):
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            ids = torch.full((int(cu[-1]),), self.config.pad_token_id, dtype=torch.long, device=device)
            self(ids, cu, max(lengths), torch.zeros_like(ids))

    def position_ids(self, cu_seqlens: Tensor, total_tokens: int) -> Tensor:
        # cu_seqlens [B+1] -> [T]: offset + index of each token within its sequence
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens,
                                      output_size=total_tokens)  # [T] sequence of each token
        tok = torch.arange(total_tokens, device=cu_seqlens.device)  # [T]
        return tok - cu_seqlens[:-1].long()[seq] + self.config.position_offset

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids [T] long, cu_seqlens [B+1] int32, token_type_ids [T] long or None -> logits [B] fp32.

        Pass cu_seqlens on the CPU (the server does): it is checked there once per forward, with no
        device sync (starts at 0, every sequence non-empty since its first token feeds the head,
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
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if self.attention_backend == "triton":
            ops = _TritonOps()

            def attention(qkv: Tensor) -> Tensor:
                q, k, v = qkv.unbind(1)  # views [T, heads, head_dim] of the fused projection
                return ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale)
        else:
            ops = _TorchOps()
            plan = _plan_buckets(cu_seqlens if host_cu is None else host_cu, input_ids.device)

            def attention(qkv: Tensor) -> Tensor:
                return _sdpa_attention(qkv, plan, scale)

        first = cu_seqlens[:-1].long()  # [B] index of each sequence's first token (<s> / [CLS])
        x = self.embeddings(input_ids, self.position_ids(cu_seqlens, T), token_type_ids, ops)  # [T, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(x, attention, ops, keep=first if i == len(self.layers) - 1 else None)
        if not self.layers:
            x = x[first]
        return self.head(x.float())  # [B] float32

    def forward_padded(self, input_ids: Tensor, attention_mask: Tensor,
                       token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask [B, L] (right-padded: mask 1 on real tokens), token_type_ids [B, L]
        or None -> logits [B] fp32: the head on first_token_states."""
        return self.head(self.first_token_states(input_ids, attention_mask, token_type_ids).float())

    def first_token_states(self, input_ids: Tensor, attention_mask: Tensor,
                           token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask [B, L] (right-padded: mask 1 on real tokens), token_type_ids [B, L]
        or None -> [B, hidden]: the encoder's output at each sequence's first token, what the head reads.

        The model on padded batches in plain torch ops, for graph runtimes that take a traced model
        (serving/openvino_engine.py, which runs the head itself in float32): one graph for any B and L
        up to config.max_seqlen. As in forward, the last layer computes keys and values for every
        token and the rest only for the first tokens; that is most of a layer's work saved (a sixth
        of MiniLM-L6's).
        """
        cfg = self.config
        B, L = input_ids.shape
        H, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        ops = _TorchOps()
        # Real tokens sit first, so their positions are those of the unpadded sequence; padding's
        # positions do not matter, as no query attends to padding.
        positions = (torch.arange(L, device=input_ids.device) + cfg.position_offset).expand(B, L)  # [B, L]
        x = self.embeddings(input_ids, positions, token_type_ids, ops)  # [B, L, hidden]
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: the keys every query may attend to
        scale = 1.0 / math.sqrt(head_dim)
        for i, layer in enumerate(self.layers):
            if i < len(self.layers) - 1:
                q, k, v = layer.project(x).view(B, L, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, heads, L, head_dim]
                x = layer.finish(a.transpose(1, 2).reshape(B, L, H), x, ops)  # [B, L, hidden]
            else:
                first = x[:, 0]  # [B, hidden]
                q = F.linear(first, layer.qkv.weight[:H], layer.qkv.bias[:H]).view(B, heads, 1, head_dim)
                k, v = F.linear(x, layer.qkv.weight[H:], layer.qkv.bias[H:]).view(
                    B, L, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, heads, 1, head_dim]
                x = layer.finish(a.reshape(B, H), first, ops)  # [B, hidden]
        return x if self.layers else x[:, 0]


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------

# Our module name -> HF name(s) (several: concatenated along dim 0). "{p}" is "roberta." or "bert.".
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings.weight": "{p}embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "{p}embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "{p}embeddings.token_type_embeddings.weight",
    "embeddings.norm.{wb}": "{p}embeddings.LayerNorm.{wb}",
}
_LAYER_NAMES = {  # layers.{i}.<ours>.{wb} <- {p}encoder.layer.{i}.<theirs>.{wb}
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn_out": ("attention.output.dense",),
    "attn_norm": ("attention.output.LayerNorm",),
    "ffn_in": ("intermediate.dense",),
    "ffn_out": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}
_HEAD_NAMES = {
    "roberta": {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"},
    "bert": {"head.dense": "bert.pooler.dense", "head.out_proj": "classifier"},
}


def _is_ignored(name: str, cfg: EncoderConfig) -> bool:
    """Tensors a checkpoint may carry that the model does not use, and that are safe to drop.

    * ``*.embeddings.position_ids`` / ``*.embeddings.token_type_ids``: buffers (an arange and
      zeros) that older transformers versions saved with the weights.
    * ``roberta.pooler.*`` in a RoBERTa/XLM-R checkpoint: the base model's pooler, which the
      sequence-classification model does not have (HF drops it too).
    """
    if name.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
        return True
    return cfg.is_roberta and name.startswith("roberta.pooler.")


def hf_name_map(cfg: EncoderConfig) -> dict[str, tuple[str, ...]]:
    """Module parameter name -> the HF checkpoint name(s) it is built from."""
    p = "roberta." if cfg.is_roberta else "bert."
    table: dict[str, tuple[str, ...]] = {}
    for ours, theirs in _EMBEDDING_NAMES.items():
        for wb in ("weight", "bias") if "{wb}" in ours else ("",):
            table[ours.format(wb=wb)] = (theirs.format(p=p, wb=wb),)
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in _LAYER_NAMES.items():
            for wb in ("weight", "bias"):
                table[f"layers.{i}.{ours}.{wb}"] = tuple(f"{p}encoder.layer.{i}.{t}.{wb}" for t in theirs)
    for ours, theirs in _HEAD_NAMES["roberta" if cfg.is_roberta else "bert"].items():
        for wb in ("weight", "bias"):
            table[f"{ours}.{wb}"] = (f"{theirs}.{wb}",)
    return table


def convert_hf_state_dict(cfg: EncoderConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an HF state dict to this module's names (fusing QKV); strict about missing/unexpected names."""
    # Checkpoints converted from TF name LayerNorm parameters gamma/beta (HF renames them on load).
    hf = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in hf.items()}
    return select_tensors(hf, hf_name_map(cfg), model_name=f"{cfg.model_type} cross-encoder",
                          ignored=lambda name: _is_ignored(name, cfg))


def load_cross_encoder(model_path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu",
                       attention_backend: str | None = None, quantize: str = "none",
                       compile: bool = False) -> PackedCrossEncoder:
    """Load an HF cross-encoder directory (config.json + weights) as a PackedCrossEncoder in eval mode.

    attention_backend None picks "triton" on CUDA and "sdpa" elsewhere. The weights are copies
    the model owns (see models/checkpoint.py for why that matters to reproducibility).
    quantize "int8" (CPUs with int8 dot-product instructions) makes the encoder layers' linears
    int8 (models/int8_linear.py), quantized from the checkpoint's float32 weights, with `dtype`
    for everything else (activations, norms, attention); their blocks are compiled and warmed up
    here, which takes seconds, so that no request pays for it. compile compiles them whatever the
    precision (on a CPU: fused norms, GELU and casts around the matmuls).
    """
    check_torch_dtype(dtype)
    if quantize not in QUANTIZE_NAMES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {quantize!r}")
    path = Path(model_path)
    device = torch.device(device)
    if quantize == "int8":
        check_int8_support(device)
    if compile and device.type != "cpu":
        raise ValueError(f"compile is for CPUs (on {device.type} the encoder's own kernels fuse these ops); "
                         "turn it off, or serve with --device cpu")
    if attention_backend is None:
        attention_backend = "triton" if device.type == "cuda" else "sdpa"
    cfg = EncoderConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = PackedCrossEncoder(cfg, attention_backend=attention_backend)
    state = convert_hf_state_dict(cfg, read_state_dict(path))
    assign_weights(model, state, dtype=torch.float32 if quantize == "int8" else dtype, device=device,
                   source_names=hf_name_map(cfg))
    if quantize == "int8":
        model.quantize_int8()
        for param in model.parameters():  # what stays float: embeddings, norms (the int8 linears hold buffers)
            param.data = param.data.to(dtype)
    model.head.float()  # see ClassificationHead
    model = model.eval().requires_grad_(False)
    if compile or quantize == "int8":
        # Eager, the quantizing around each int8 product costs what int8 saves (models/int8_linear.py).
        model.compile_layers()
        model.warm_up()
    return model
