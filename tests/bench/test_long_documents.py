"""The long-document benchmark: its workload, its parity check and medians, and a miniature run end to end
(tiny BERT, real tritonserver, HF transformers chunking by hand)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from triton_rerank.bench import long_documents as ld
from triton_rerank.serving.tokenization import window_count


def word_counts(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def small_pool() -> ld.PassagePool:
    words = [f"w{i}" for i in range(50)]
    return ld.synthetic_pool(words, word_counts, seed=3, num_queries=4, passages_per_query=10)


def test_documents_are_seeded_sized_and_start_with_the_querys_own_passage():
    pool = small_pool()
    documents = ld.build_documents(pool, num_requests=3, docs_per_request=2, min_tokens=300, max_tokens=900, seed=7)
    again = ld.build_documents(pool, num_requests=3, docs_per_request=2, min_tokens=300, max_tokens=900, seed=7)
    assert documents.requests == again.requests and documents.num_documents == 6
    assert [len(r.documents) for r in documents.requests] == [2, 2, 2]
    assert len({r.query for r in documents.requests}) == 3
    # Within a passage of the target below it (a passage that would overshoot is skipped), never above.
    assert all(300 - 120 <= n <= 900 for n in documents.document_tokens)
    assert documents.document_tokens == word_counts(documents.documents())
    for request in documents.requests:
        q = pool.queries.index(request.query)
        for j, document in enumerate(request.documents):
            assert document.startswith(pool.passages[pool.own_passages[q][j]])
    other = ld.build_documents(pool, num_requests=3, docs_per_request=2, min_tokens=300, max_tokens=900, seed=8)
    assert other.requests != documents.requests


def test_more_requests_than_queries_reuse_the_queries():
    documents = ld.build_documents(small_pool(), num_requests=6, docs_per_request=1, min_tokens=100, max_tokens=200)
    assert len(documents.requests) == 6 and len({r.query for r in documents.requests}) == 4


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        ld.build_documents(small_pool(), 1, 1, min_tokens=500, max_tokens=100)


@pytest.mark.parametrize(("tokens", "windows"), [(10, 1), (500, 1), (501, 2), (968, 2), (969, 3), (1000, 3)])
def test_windows_per_document_follow_the_sliding_window(tokens, windows):
    # Room 500, overlap 32: windows start at 0, 468, 936, ...
    assert window_count(tokens, 500, 32) == windows


def test_windows_per_document_match_the_hf_tokenizer(tiny_model_dirs):
    from transformers import AutoTokenizer

    model_dir = tiny_model_dirs["bert"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    documents = ld.build_documents(ld.synthetic_pool(ld.vocabulary_words(model_dir / "tokenizer.json"),
                                                     ld.token_counter(model_dir)), 2, 3, 400, 2500)
    documents.document_tokens = ld.token_counter(model_dir)(documents.documents())
    window = ld.model_window(model_dir)
    for request in documents.requests:
        query_tokens = len(tokenizer(request.query, add_special_tokens=False)["input_ids"])
        room = window - tokenizer.num_special_tokens_to_add(pair=True) - query_tokens
        for document in request.documents:
            encoding = tokenizer(request.query, document, truncation="only_second", max_length=window, stride=32,
                                 return_overflowing_tokens=True)
            tokens = len(tokenizer(document, add_special_tokens=False)["input_ids"])
            assert window_count(tokens, room, 32) == len(encoding["input_ids"])


def one_pass(contender: str, concurrency: int, run: int, seconds: float, scores, chunks=(2, 3), tokens=(900, 1400)):
    return ld.Pass(contender, concurrency, run, seconds, [seconds / 2] * 2, np.asarray(scores, dtype=np.float32),
                   np.asarray(chunks, dtype=np.int32), np.asarray(tokens, dtype=np.int32))


def test_parity_reports_the_largest_difference_and_count_mismatches():
    passes = [one_pass(ld.HF_CONTENDER, 0, 1, 2.0, [0.5, -1.0]),
              one_pass(ld.SERVED_CONTENDER, 1, 1, 1.0, [0.5002, -1.0]),
              one_pass(ld.SERVED_CONTENDER, 2, 1, 1.0, [0.5, -1.0005])]
    check = ld.parity(passes, tolerance=1e-3)
    assert check.ok and check.max_abs_diff == pytest.approx(5e-4, abs=1e-6) and check.score_range == (-1.0, 0.5)
    passes.append(one_pass(ld.SERVED_CONTENDER, 1, 2, 1.0, [0.5, -1.0], chunks=(2, 4)))
    check = ld.parity(passes, tolerance=1e-3)
    assert not check.ok and check.mismatches == ["run 2 c=1: chunk_counts of document 1 is 4, HF 3"]
    assert not ld.parity(passes[:2], tolerance=1e-4).ok


def test_ratios_are_taken_within_each_run_then_the_median():
    passes = [one_pass(ld.HF_CONTENDER, 0, 1, 2.0, [0, 0]), one_pass(ld.SERVED_CONTENDER, 1, 1, 1.0, [0, 0]),
              one_pass(ld.HF_CONTENDER, 0, 2, 4.0, [0, 0]), one_pass(ld.SERVED_CONTENDER, 1, 2, 1.0, [0, 0]),
              one_pass(ld.HF_CONTENDER, 0, 3, 2.0, [0, 0]), one_pass(ld.SERVED_CONTENDER, 1, 3, 2.0, [0, 0])]
    raw = ld.with_ratios([ld.row_of(p, "backend") for p in passes])
    assert [r.ratio_vs_hf for r in raw if r.contender == ld.SERVED_CONTENDER] == [2.0, 4.0, 1.0]
    rows = {r.contender: r for r in ld.medians(raw)}
    served = rows[ld.SERVED_CONTENDER]
    assert served.runs == 3 and served.ratio_vs_hf == 2.0 and served.each_run_ratio == "2.00, 4.00, 1.00"
    assert served.windows == 5 and served.documents == 2 and served.windows_per_s == 5.0
    assert rows[ld.HF_CONTENDER].documents_per_s == 1.0


@pytest.mark.server
def test_long_documents_mini_run(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "triton_rerank", "bench-long-documents", "--model-dir", str(tiny_model_dirs["bert"]),
        "--source", "synthetic", "--requests", "3", "--docs-per-request", "2", "--min-doc-tokens", "600",
        "--max-doc-tokens", "1500", "--repeat", "2", "--concurrency", "1,2", "--out", str(out),
        "--work-dir", str(tmp_path / "work"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "window and token counts equal" in result.stdout
    with open(out / "long_documents.csv") as f:
        rows = {(r["contender"], r["concurrency"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(ld.HF_CONTENDER, "0"), (ld.SERVED_CONTENDER, "1"), (ld.SERVED_CONTENDER, "2")}
    for row in rows.values():
        assert row["runs"] == "2" and row["documents"] == "6"
        assert float(row["windows_per_s"]) > 0 and float(row["documents_per_s"]) > 0
        # Documents of 600-1500 tokens in a 512-token window: every one is chunked.
        assert int(row["windows"]) >= 12 and row["cpu"] and row["commit"]
    assert float(rows[(ld.SERVED_CONTENDER, "1")]["ratio_vs_hf"]) > 0
    with open(out / "long_documents_runs.csv") as f:
        assert {r["run"] for r in csv.DictReader(f)} == {"1", "2"}
    text = (out / "long_documents.md").read_text()
    difference = float(text.split("max abs difference **")[1].split("**")[0])
    assert difference <= 1e-3 and ": passed." in text and "| tokens |" in text
