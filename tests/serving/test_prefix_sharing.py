"""The shared-head plan: finding a request's common prefix, cutting micro-batches, packing them.

The engine here is a stand-in whose score is an exact function of a pair's whole token sequence
(positions included), so a head or a pair put back together wrongly changes a score; the real
decoder's shared forward is checked against its plain forward in tests/models and end to end.
"""

from itertools import pairwise

import numpy as np
import pytest
import torch

from triton_rerank.serving.packed_inputs import PackedRequest
from triton_rerank.serving.prefix_sharing import (
    SharingPairs,
    gather_shared,
    plan_shared_micro_batches,
    shared_prefix_length,
)
from triton_rerank.serving.scoring import score_requests


def packed(pairs: list[list[int]], windows: list[int] | None = None) -> PackedRequest:
    ids = np.concatenate([np.array(p, dtype=np.int32) for p in pairs])
    lengths = np.array([len(p) for p in pairs], dtype=np.int32)
    counts = np.array(windows or [1] * len(pairs), dtype=np.int32)
    return PackedRequest(ids, np.zeros_like(ids), lengths, counts)


def sequence_score(ids: torch.Tensor) -> float:
    # Depends on every token and its position: a reordering or a lost token changes it.
    weights = torch.arange(1, len(ids) + 1, dtype=torch.float64)
    return float(((ids.double() * 1.618) % 7.0 * weights).sum() % 1000.0)


class ExactEngine:
    """Scores a sequence by `sequence_score`; the shared path rebuilds each whole sequence first."""

    def __init__(self):
        self.plain_tokens = self.shared_tokens = 0

    def __call__(self, batch):
        self.plain_tokens += batch.input_ids.numel()
        cu = batch.cu_seqlens.tolist()
        return torch.tensor([sequence_score(batch.input_ids[a:b]) for a, b in pairwise(cu)], dtype=torch.float32)

    def score_shared(self, batch):
        self.shared_tokens += batch.tokens
        cu, heads = batch.cu_seqlens.tolist(), batch.prefix_cu.tolist()
        out = []
        for i, (a, b) in enumerate(pairwise(cu)):
            g = int(batch.groups[i])
            whole = torch.cat([batch.prefix_ids[heads[g]:heads[g + 1]], batch.input_ids[a:b]])
            assert len(whole) - (b - a) <= batch.max_prefix and b - a <= batch.max_seqlen
            out.append(sequence_score(whole))
        return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize(("pairs", "expected"), [
    ([[1, 2, 3, 4]], 0),  # one pair: nothing to share
    ([[1, 2, 3, 4], [1, 2, 3, 5]], 3),
    ([[1, 2, 3, 4], [1, 2, 3, 4]], 3),  # identical pairs keep their last token as their own
    ([[1, 2, 3], [1, 2, 3, 4, 5]], 2),  # a pair that is a prefix of another keeps its last token
    ([[9, 2, 3], [1, 2, 3]], 0),
    ([[1], [1, 2]], 0),
])
def test_shared_prefix_length(pairs, expected):
    request = packed(pairs)
    assert shared_prefix_length(request.input_ids, request.lengths) == expected


def test_shared_prefix_length_across_comparison_blocks():
    rng = np.random.default_rng(0)
    head = rng.integers(0, 1000, 700).tolist()
    pairs = [head + rng.integers(0, 1000, n).tolist() for n in (3, 50, 9)]
    pairs[2][650] = -1  # parts inside the third block of 256
    request = packed(pairs)
    assert shared_prefix_length(request.input_ids, request.lengths, block=256) == 650
    assert shared_prefix_length(request.input_ids, request.lengths, block=7) == 650


def test_split_and_gather_rebuild_every_pair():
    rng = np.random.default_rng(1)
    requests = []
    for head_length, count in ((5, 3), (12, 4)):
        head = rng.integers(0, 50, head_length).tolist()
        requests.append([head + rng.integers(0, 50, int(n)).tolist() for n in rng.integers(1, 9, count)])
    parts = [(packed(r).input_ids, packed(r).lengths, h) for r, h in zip(requests, (5, 12), strict=True)]
    pairs = SharingPairs.split(parts)
    assert [len(h) for h in pairs.heads] == [5, 12] and pairs.group.tolist() == [0, 0, 0, 1, 1, 1, 1]
    offsets = np.concatenate([[0], np.cumsum(pairs.own_lengths)[:-1]])
    batch = gather_shared(pairs, offsets, np.array([6, 0, 4]))
    assert batch.groups.tolist() == [1, 0, 1]  # heads of the requests present, in order
    cu, heads = batch.cu_seqlens.tolist(), batch.prefix_cu.tolist()
    flat = [p for r in requests for p in r]
    for i, pair in enumerate((6, 0, 4)):
        g = int(batch.groups[i])
        whole = batch.prefix_ids[heads[g]:heads[g + 1]].tolist() + batch.input_ids[cu[i]:cu[i + 1]].tolist()
        assert whole == flat[pair]
    assert batch.tokens == 5 + 12 + sum(len(flat[p]) for p in (6, 0, 4)) - 5 - 12 - 12


@pytest.mark.parametrize("budget", [1, 40, 100, 10_000])
def test_micro_batches_hold_every_pair_once_within_the_budget(budget):
    rng = np.random.default_rng(2)
    own = rng.integers(1, 30, 60).astype(np.int32)
    group = rng.integers(0, 5, 60)
    head_lengths = np.array([10, 3, 25, 7, 16])
    batches = plan_shared_micro_batches(own, group, head_lengths, budget)
    assert sorted(np.concatenate(batches).tolist()) == list(range(60))
    for batch in batches:
        cost = len(batch) * int(own[batch].max()) + int(head_lengths[np.unique(group[batch])].sum())
        assert cost <= budget or len(batch) == 1
    # Request by request: each request's pairs are contiguous, so a head is computed in as few
    # micro-batches as the budget allows (at most one more than its pairs need on their own).
    heads_computed = sum(len(np.unique(group[batch])) for batch in batches)
    assert heads_computed <= len(batches) + 5 - 1


def test_shared_scores_equal_plain_scores_and_heads_are_computed_once():
    rng = np.random.default_rng(3)
    head = rng.integers(0, 100, 40).tolist()
    other = rng.integers(0, 100, 30).tolist()
    requests = [
        packed([head + rng.integers(0, 100, int(n)).tolist() for n in rng.integers(1, 20, 6)]),
        packed([rng.integers(0, 100, 25).tolist()]),  # one document: the plain path
        packed([other + [1, 2], other + [1, 2, 3], other + [7]], windows=[2, 1]),  # windows of a chunked document
        packed([[5, 6, 7, 8], [5, 6, 9]]),  # a head too short to share
    ]
    plain_engine, shared_engine = ExactEngine(), ExactEngine()
    plain = score_requests(plain_engine, requests, 4096)
    shared = score_requests(shared_engine, requests, 4096, min_shared_prefix=16)
    for a, b in zip(plain, shared, strict=True):
        np.testing.assert_array_equal(a, b)
    assert shared_engine.shared_tokens == sum(len(r.input_ids) for r in requests[::2]) - 5 * 40 - 2 * 30
    assert shared_engine.plain_tokens == len(requests[1].input_ids) + len(requests[3].input_ids)
    assert plain_engine.shared_tokens == 0


def test_an_engine_without_a_shared_path_scores_everything_plainly():
    class PlainOnly:
        def __init__(self):
            self.engine = ExactEngine()

        def __call__(self, batch):
            return self.engine(batch)

    request = packed([[1] * 30 + [2], [1] * 30 + [3]])
    engine = PlainOnly()
    score_requests(engine, [request], 4096, min_shared_prefix=16)
    assert engine.engine.plain_tokens == 62
