"""The prefix-threshold benchmark: its synthetic requests share exactly the head asked for, its token
counts follow the server's plan, its threshold rule, and a small run end to end (tiny Qwen3 decoder)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from triton_rerank.bench import prefix_threshold as pt
from triton_rerank.serving.prefix_sharing import DEFAULT_MIN_SHARED_PREFIX, shared_prefix_length


@pytest.mark.parametrize("documents, head, own", [(2, 1, (60, 130)), (5, 16, (1, 3)), (8, 64, (1, 1)), (3, 0, (4, 9))])
def test_synthetic_requests_share_exactly_the_head(documents, head, own):
    request = pt.synthetic_request(documents, head, own, np.random.default_rng(documents))
    assert shared_prefix_length(request.input_ids, request.lengths) == head
    assert len(request.lengths) == documents and int(request.lengths.sum()) == len(request.input_ids)
    assert all(own[0] <= n - head <= own[1] for n in request.lengths)
    assert request.chunk_counts.tolist() == [1] * documents
    again = pt.synthetic_request(documents, head, own, np.random.default_rng(documents))
    assert np.array_equal(request.input_ids, again.input_ids)


def test_planned_tokens_count_the_head_once_per_micro_batch():
    request = pt.synthetic_request(6, 20, (10, 10), np.random.default_rng(0))
    own = 6 * 10
    assert pt.planned_tokens(request, 20, max_batch_tokens=4096) == own + 20
    # 20 head + 10 own per pair: two pairs fit 40 tokens of budget, so three micro-batches, three heads.
    assert pt.planned_tokens(request, 20, max_batch_tokens=40) == own + 3 * 20


def point(documents: int, head: int, gain: float) -> pt.Point:
    return pt.Point(documents, head, 90.0, 100, 90, 10.0, 10.0 / gain, gain, gain, gain, 0.0)


def test_break_even_is_the_shortest_head_that_pays_from_there_on_at_every_size():
    points = [point(2, 1, 0.98), point(2, 4, 1.01), point(2, 8, 0.99), point(2, 16, 1.04), point(2, 32, 1.2),
              point(8, 1, 1.00), point(8, 4, 1.02), point(8, 8, 1.05), point(8, 16, 1.3), point(8, 32, 1.6)]
    assert pt.break_even(points) == 16  # 4 pays at two documents, but 8 does not
    assert pt.break_even([p for p in points if p.documents == 8]) == 1
    assert pt.break_even(points + [point(4, 32, 0.9)]) is None
    assert "from **16 tokens**" in pt.conclusion(points, 16)
    assert "no threshold" in pt.conclusion(points + [point(4, 32, 0.9)], 16)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny random Qwen3 decoder with a word-level tokenizer naming the label tokens (no data folder needed)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from triton_rerank.bench.random_model import random_decoder, save_model_dir, tiny_decoder_config

    out = save_model_dir(tmp_path_factory.mktemp("decoder"), random_decoder(tiny_decoder_config(), dtype=torch.float32))
    Tokenizer(WordLevel({"[UNK]": 0, "yes": 1, "no": 2}, unk_token="[UNK]")).save(str(out / "tokenizer.json"))
    return out


def test_a_small_run_end_to_end(decoder_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "triton_rerank", "bench-prefix-threshold", "--model-dir", str(decoder_dir),
               "--docs", "2,3", "--heads", "1,24", "--own-tokens", "5-20", "--repeat", "2", "--dtype", "float32",
               "--threads", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "threshold.csv")))
    assert [(int(r["documents"]), int(r["head"])) for r in rows] == [(2, 1), (2, 24), (3, 1), (3, 24)]
    for r in rows:
        documents, head = int(r["documents"]), int(r["head"])
        assert int(r["whole_tokens"]) - int(r["shared_tokens"]) == 2 * (documents - 1) * head  # 2 repeats
        assert float(r["gain_q1"]) <= float(r["gain"]) <= float(r["gain_q3"])
        assert float(r["max_abs_diff"]) < 1e-4  # float32: sharing leaves scores as they were
    markdown = (out / "threshold.md").read_text()
    assert "| 3 | 24 |" in markdown and f"min_shared_prefix is {DEFAULT_MIN_SHARED_PREFIX}" in markdown


def test_help_and_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-prefix-threshold", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "min_shared_prefix" in result.stdout
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-prefix-threshold", "--own-tokens", "9-3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "LOW <= HIGH" in result.stderr
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-prefix-threshold", "--docs", "1,4",
                             "--model-dir", "unused"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "one document has no head to share" in result.stderr
