"""A request's shared prompt head, computed once: the plan for decoder rerankers.

Every prompt of one decoder-reranker request starts with the same tokens (system prompt,
instruction, query: 60-80 tokens for Qwen3-Reranker with a typical query). In a causal model the
keys and values of those tokens do not depend on what follows them, so the scoring step runs them
once per request and lets each document's own tokens attend to them (models/qwen3_reranker.py,
`forward_shared`). Scores do not change; the work on the head is done once instead of once per
document.

- `shared_prefix_length`: the longest common token prefix of a request's pairs, found on the
  token ids themselves (exact by construction: no template or string boundary is guessed), and
  capped so every pair keeps at least its last token (the one scored) as its own.
- `plan_shared_micro_batches`: the pairs of sharing requests cut into micro-batches request by
  request, a request's head counted once in each micro-batch that holds any of its pairs.
- `gather_shared`: one micro-batch packed as `forward_shared` takes it.

numpy and torch only (torch for the batch tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Below this many shared tokens the plain path is taken. Measured (`triton-rerank bench-prefix-threshold`,
# results/cpu-prefix-threshold: the 0.6B shape, bfloat16, 2 CPU cores): a head of h tokens saves
# (documents - 1) x h tokens of every layer's projections and MLP, and the measured gain follows that
# count (94-109% of it) from the first token, with no fixed cost that shows. Under ~12 tokens at two
# documents a request the saving (under 6%) is within the machine's noise: two runs found the
# shared path faster in 3 of 4 repeats at every head from 8 and from 16 tokens on; 16 is where both
# agree. Not measured on a GPU, where fixed costs weigh more against a short head. Qwen3-Reranker's
# system prompt alone is about 40 tokens, so real heads are far above it either way.
DEFAULT_MIN_SHARED_PREFIX = 16


def shared_prefix_length(input_ids: np.ndarray, lengths: np.ndarray, block: int = 256) -> int:
    """Tokens every pair of one request starts with, at most the shortest pair's length less one.

    Compared block by block, so a request whose pairs part after a few tokens costs a few
    comparisons, not its whole shortest pair.
    """
    if len(lengths) < 2:
        return 0
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    limit = int(lengths.min()) - 1
    done = 0
    while done < limit:
        width = min(block, limit - done)
        columns = input_ids[starts[:, None] + np.arange(done, done + width)[None, :]]  # [pairs, width]
        same = (columns == columns[0]).all(axis=0)
        if not same.all():
            return done + int(np.argmin(same))
        done += width
    return limit


@dataclass(frozen=True)
class SharingPairs:
    """Pairs of the requests that share their head, own tokens only, and each request's head.

    own_ids [own_tokens] int32 and own_lengths [pairs]: each pair without its request's head;
    group [pairs]: the request (index into heads) each pair belongs to; heads: each request's
    head tokens (int32 arrays).
    """

    own_ids: np.ndarray
    own_lengths: np.ndarray
    group: np.ndarray
    heads: list[np.ndarray]

    @classmethod
    def split(cls, requests: list[tuple[np.ndarray, np.ndarray, int]]) -> SharingPairs:
        """(ids, lengths, head length) of each request -> its head once and every pair's own tokens."""
        own_ids, own_lengths, group, heads = [], [], [], []
        for g, (ids, lengths, head) in enumerate(requests):
            starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            keep = np.ones(len(ids), dtype=bool)
            keep[(starts[:, None] + np.arange(head)[None, :]).ravel()] = False  # every pair's head
            own_ids.append(ids[keep])
            own_lengths.append(lengths - head)
            group.append(np.full(len(lengths), g, dtype=np.int64))
            heads.append(ids[:head])
        return cls(np.concatenate(own_ids), np.concatenate(own_lengths).astype(np.int32), np.concatenate(group),
                   heads)


def plan_shared_micro_batches(own_lengths: np.ndarray, group: np.ndarray, head_lengths: np.ndarray,
                              max_batch_tokens: int) -> list[np.ndarray]:
    """Index groups of pairs, request by request and by own length within a request; a micro-batch's
    cost is its pairs' padded own tokens plus the head of every request it holds, at most
    max_batch_tokens (a pair whose own tokens and head alone exceed it gets a micro-batch of its own).

    Request by request, not by length across requests as the plain plan sorts: a head is computed
    once in every micro-batch holding any of its request's pairs, so pairs of one request kept
    together pay for it once; length order across requests would spread every request over every
    micro-batch. Attention pads at most within power-of-two length buckets (SDPA) or not at all
    (Triton), so the order inside a micro-batch costs little.
    """
    order = np.lexsort((own_lengths, group))
    batches: list[np.ndarray] = []
    start, heads, head_tokens, longest = 0, set(), 0, 0
    for end, pair in enumerate(order):
        g = int(group[pair])
        added = 0 if g in heads else int(head_lengths[g])
        widest = max(longest, int(own_lengths[pair]))
        if end > start and (end + 1 - start) * widest + head_tokens + added > max_batch_tokens:
            batches.append(order[start:end])
            start, heads, head_tokens, widest = end, set(), 0, int(own_lengths[pair])
            added = int(head_lengths[g])
        heads.add(g)
        head_tokens += added
        longest = widest
    if start < len(order):
        batches.append(order[start:])
    return batches


@dataclass
class SharedBatch:
    """One micro-batch as `forward_shared` takes it (host tensors).

    prefix_ids [P] and prefix_cu int32 [G+1]: the heads of the G requests present; input_ids [T]
    and cu_seqlens int32 [B+1]: each pair's own tokens; groups [B]: the head (0..G-1) of each pair.
    """

    prefix_ids: torch.Tensor
    prefix_cu: torch.Tensor
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    groups: torch.Tensor
    max_seqlen: int
    max_prefix: int

    @property
    def tokens(self) -> int:
        """Tokens this micro-batch computes: each head once, every pair's own tokens."""
        return int(self.prefix_ids.numel() + self.input_ids.numel())


def gather_shared(pairs: SharingPairs, own_offsets: np.ndarray, batch: np.ndarray) -> SharedBatch:
    """The pairs `batch` (indices into pairs) packed with the heads of their requests."""
    present, local = np.unique(pairs.group[batch], return_inverse=True)
    heads = [pairs.heads[g] for g in present]
    head_lengths = np.array([len(h) for h in heads], dtype=np.int32)
    lengths = pairs.own_lengths[batch]
    index = np.repeat(own_offsets[batch], lengths) + (
        np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    cu = np.zeros(len(batch) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    prefix_cu = np.zeros(len(heads) + 1, dtype=np.int32)
    np.cumsum(head_lengths, out=prefix_cu[1:])
    return SharedBatch(
        prefix_ids=torch.from_numpy(np.concatenate(heads).astype(np.int64)),
        prefix_cu=torch.from_numpy(prefix_cu),
        input_ids=torch.from_numpy(pairs.own_ids[index].astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu),
        groups=torch.from_numpy(local.astype(np.int64)),
        max_seqlen=int(lengths.max()),
        max_prefix=int(head_lengths.max()),
    )
