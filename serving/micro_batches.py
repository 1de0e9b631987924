"""Micro-batches of packed pairs: the plan (length-sorted groups under a token budget), one group
packed into a batch, and that batch padded for engines that pad (transformers, OpenVINO).

Kept apart from the engines so that every engine module can use them without importing the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def plan_micro_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Index groups of pairs, sorted by length, each group's padded size <= max_batch_tokens.

    The budget counts `len(group) * longest_in_group` so it bounds padded engines too; for a
    packed engine on length-sorted pairs that is close to the real token count. A single pair
    longer than the budget gets a micro-batch of its own.
    """
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        # Sorted ascending, so the newest pair is the longest of the group.
        if end < len(order) and (end + 1 - start) * int(lengths[order[end]]) <= max_batch_tokens:
            continue
        groups.append(order[start:end])
        start = end
    return groups


@dataclass
class PackedBatch:
    """Pairs of one micro-batch, packed: ids and types [total_tokens], cu_seqlens [B+1]."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def gather_pairs(
    input_ids: np.ndarray, token_type_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
    group: np.ndarray,
) -> PackedBatch:
    """Packs the pairs `group` (indices into offsets/lengths) into one contiguous batch."""
    group_lengths = lengths[group]
    # Token positions of every selected pair, built without a Python loop over tokens.
    starts = np.repeat(offsets[group], group_lengths)
    within = np.arange(int(group_lengths.sum())) - np.repeat(np.cumsum(group_lengths) - group_lengths, group_lengths)
    index = starts + within
    cu_seqlens = np.zeros(len(group) + 1, dtype=np.int32)
    np.cumsum(group_lengths, out=cu_seqlens[1:])
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids[index].astype(np.int64)),
        token_type_ids=torch.from_numpy(token_type_ids[index].astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(group_lengths.max()),
    )


def micro_batches(input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray,
                  max_batch_tokens: int) -> Iterator[tuple[np.ndarray, PackedBatch]]:
    """(indices of its pairs, the packed batch) for each micro-batch of a packed set of pairs."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    for group in plan_micro_batches(lengths, max_batch_tokens):
        yield group, gather_pairs(input_ids, token_type_ids, offsets, lengths, group)


def padded_inputs(batch: PackedBatch, pad_token_id: int, with_token_types: bool) -> dict[str, torch.Tensor]:
    """A packed (CPU) batch as Hugging Face inputs: [B, max_seqlen] ids padded on the right, the
    attention mask, and token types when the model has them."""
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    size = (len(lengths), batch.max_seqlen)
    mask = torch.arange(batch.max_seqlen)[None, :] < lengths[:, None]
    ids = torch.full(size, pad_token_id, dtype=torch.long)
    ids[mask] = batch.input_ids
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    if with_token_types:
        types = torch.zeros(size, dtype=torch.long)
        types[mask] = batch.token_type_ids
        inputs["token_type_ids"] = types
    return inputs
