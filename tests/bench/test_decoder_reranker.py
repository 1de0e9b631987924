"""The decoder-reranker benchmark: its HF recipe's prompts against the served tokenizer's, its parity and
rank helpers, and a --quick run end to end (tiny Qwen3 decoder, real tritonserver, the HF recipe)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest

from triton_rerank.bench import decoder_reranker as dr
from triton_rerank.bench import long_documents as ld
from triton_rerank.bench.random_model import QWEN3_TOKENIZER_FILE
from triton_rerank.bench.workload import Request, resolve_data_dir

DATA_DIR = resolve_data_dir(None)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """The --quick model (tiny Qwen3 decoder, the real Qwen3 tokenizer of the data folder), or a skip."""
    if DATA_DIR is None or not (DATA_DIR / QWEN3_TOKENIZER_FILE).is_file():
        pytest.skip(f"no {QWEN3_TOKENIZER_FILE} in the shared data folder")
    return dr.build_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", DATA_DIR)


DOCUMENTS = [
    "The giant panda is a bear species endemic to China.",
    " Beijing, 北京, has been the capital for centuries 🏯.",
    "",
    "ends with a space and a newline \n",
    "Gravity is a force that attracts two bodies towards each other. " * 20,
]


@pytest.mark.parametrize("max_length", [2048, 120])
def test_the_recipes_prompts_are_the_served_tokenizers(decoder_dir, max_length):
    """Token for token, with and without truncation of the document."""
    from transformers import AutoTokenizer

    from triton_rerank.serving.prompt_tokenization import PromptTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder_dir, padding_side="left")
    prefix = tokenizer.encode(dr.RECIPE_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(dr.RECIPE_SUFFIX, add_special_tokens=False)
    query = "what is the capital of China?"
    recipe = dr.recipe_prompts(tokenizer, prefix, suffix, query, DOCUMENTS, max_length)
    packed = PromptTokenizer(decoder_dir, max_length=max_length).encode(query, DOCUMENTS)
    served = np.split(packed.input_ids, np.cumsum(packed.lengths)[:-1])
    assert [ids.tolist() for ids in served] == recipe
    assert max(map(len, recipe)) == max_length if max_length == 120 else max(map(len, recipe)) < max_length


def test_spearman_ranks_ties_and_constants():
    assert dr.average_ranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert dr.spearman(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.5, 0.4])) == pytest.approx(0.5)
    assert dr.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(dr.spearman(np.array([1.0, 2.0]), np.array([0.5, 0.5])))
    assert math.isnan(dr.spearman(np.array([1.0]), np.array([1.0])))


def test_sigmoid_of_the_logit_difference_is_the_recipes_p_yes():
    no, yes = np.array([0.3, 2.0, -1.0]), np.array([1.1, -0.5, -1.0])
    log_softmax = yes - np.logaddexp(no, yes)
    np.testing.assert_allclose(dr.sigmoid(yes - no), np.exp(log_softmax), rtol=1e-12)


def one_pass(contender: str, concurrency: int, run: int, seconds: float, scores, tokens=(90, 95, 100)):
    return ld.Pass(contender, concurrency, run, seconds, [seconds / 2] * 2, np.asarray(scores, dtype=np.float64),
                   np.ones(len(scores), dtype=np.int32), np.asarray(tokens, dtype=np.int32))


REQUESTS = [Request("q1", ("a", "b")), Request("q2", ("c",))]
HF, SHARED, WHOLE = ld.HF_CONTENDER, dr.SHARED_CONTENDER, dr.WHOLE_CONTENDER  # as the passes are labelled


def test_parity_per_request_per_variant_and_its_verdicts():
    passes = [one_pass(HF, 0, 1, 2.0, [0.2, 0.6, 0.5]),
              one_pass(SHARED, 1, 1, 1.0, [0.2, 0.60005, 0.5]),
              one_pass(WHOLE, 1, 1, 1.0, [0.2, 0.6, 0.50002]),
              one_pass(SHARED, 4, 1, 1.0, [0.2, 0.6, 0.50001])]
    check = dr.parity(passes, REQUESTS, tolerance=1e-4, judged=True, docs_per_request=2)
    assert check.ok and check.verdict == "passed"
    assert [r.documents for r in check.requests] == [2, 1]
    assert check.requests[0].vs_hf[SHARED] == pytest.approx(5e-5, rel=1e-6) and check.requests[0].vs_hf[WHOLE] == 0
    assert check.requests[0].max_abs_diff == pytest.approx(5e-5, rel=1e-6)
    # Shared against whole: only passes of the same run and level (c=4 has no whole pass).
    assert check.requests[0].shared_vs_whole == pytest.approx(5e-5, rel=1e-6)
    assert check.requests[1].shared_vs_whole == pytest.approx(2e-5, rel=1e-6)
    assert check.vs_hf(SHARED) == pytest.approx(5e-5, rel=1e-6) and check.vs_hf(WHOLE) == pytest.approx(2e-5, rel=1e-6)
    assert check.requests[0].spearman_min == pytest.approx(1.0) and math.isnan(check.requests[1].spearman_min)
    assert check.spearman() == pytest.approx((1.0, 1.0))
    line = dr.parity_line(check)
    assert line.startswith("2 documents per request") and "triton-shared vs triton-whole **5.00e-05**" in line
    assert "prompt token counts equal: passed" in line
    table = dr.parity_table([check])
    assert "max abs diff triton-whole vs HF" in table and "| 2 | 2 | q2 | 1.00e-05 | 2.00e-05 | 2.00e-05 |" in table
    # Shared and whole apart by more than the tolerance, each within it of HF: failed in float32 only.
    apart = passes[:1] + [one_pass(SHARED, 1, 1, 1.0, [0.2, 0.60008, 0.5]),
                          one_pass(WHOLE, 1, 1, 1.0, [0.2, 0.59993, 0.5])]
    assert not dr.parity(apart, REQUESTS, 1e-4, judged=True).ok
    assert dr.parity(apart, REQUESTS, 1e-4, judged=False).ok
    # Beyond the tolerance against HF: failed in float32, reported otherwise.
    passes.append(one_pass(WHOLE, 1, 2, 1.0, [0.7, 0.6, 0.5]))
    assert not dr.parity(passes, REQUESTS, 1e-4, judged=True).ok
    loose = dr.parity(passes, REQUESTS, 1e-4, judged=False)
    assert loose.ok and loose.verdict.startswith("reported") and loose.requests[0].spearman_min == pytest.approx(-1.0)
    # A prompt of another length fails in any dtype.
    passes.append(one_pass(SHARED, 1, 2, 1.0, [0.2, 0.6, 0.5], tokens=(90, 96, 100)))
    assert not dr.parity(passes, REQUESTS, 1e-4, judged=False).ok


def test_rows_carry_this_benchmarks_names_and_ratios():
    passes = [one_pass(HF, 0, 1, 3.0, [0, 0, 0]), one_pass(WHOLE, 1, 1, 1.5, [0, 0, 0]),
              one_pass(SHARED, 1, 1, 1.0, [0, 0, 0]), one_pass(SHARED, 1, 2, 2.0, [0, 0, 0]),
              one_pass(WHOLE, 1, 2, 2.5, [0, 0, 0]), one_pass(HF, 0, 2, 4.0, [0, 0, 0])]
    backends = {HF: "hf", SHARED: "shared", WHOLE: "whole"}
    rows, raw = dr.rows_of(passes, backends)
    assert [r.contender for r in rows] == [dr.HF_CONTENDER, SHARED, WHOLE]
    assert {r.contender for r in raw} == {dr.HF_CONTENDER, SHARED, WHOLE} and len(raw) == 6
    assert rows[1].ratio_vs_hf == pytest.approx(2.5) and rows[1].each_run_ratio == "3.00, 2.00"
    assert rows[0].windows_per_s == pytest.approx(0.875) and rows[0].backend == "hf"
    table = dr.results_table([(20, rows)])
    assert "| 20 | hf-recipe | in-process | 2 | 0.88 |" in table and "| 20 | triton-whole | 1 | 2 |" in table
    # The gain: shared over whole pairs/s within each run (3 / 2, then 1.5 / 1.2), the median of those.
    tokens = dr.PromptTokens(requests=1, prompts=3, whole=300, shared=200, head=150, heads=(75,))
    [gain] = dr.gain_rows(raw, 20, tokens)
    assert gain.each_run == pytest.approx((1.5, 1.25)) and gain.measured == pytest.approx(1.375)
    assert gain.predicted == pytest.approx(1.5) and gain.of_factor == pytest.approx(1.375 / 1.5)
    assert gain.of_saving == pytest.approx(0.75)
    assert gain.shared_pairs_per_s == pytest.approx((3 + 1.5) / 2) and gain.whole_pairs_per_s == pytest.approx(1.6)
    text = dr.gain_table([gain])
    assert "| 20 | 1 | 2 | 2.25 | 1.60 | **1.38x** | 1.50, 1.25 | 1.50x | 92% | 75% |" in text


def test_predicted_gain_against_a_hand_computed_example():
    head = list(range(100, 120))  # 20 tokens every prompt of request a starts with
    a = [head + [1, 2, 3, 4, 5], head + list(range(6, 16)), head + [16, 17]]  # 25, 30, 22 tokens
    b = [list(range(200, 210)) + [1, 2, 3, 4, 5], list(range(200, 210)) + [7, 7]]  # 10 shared: under 16 (below)
    c = [list(range(300, 318))] * 2  # identical: the head stops one short of the shorter (17)
    d = [list(range(400, 430))]  # alone: nothing shared
    tokens = dr.prompt_tokens([a, b, c, d], min_shared_prefix=16)
    assert tokens.heads == (20, 0, 17, 0)
    assert tokens.whole == 77 + 27 + 36 + 30 == 170
    # a: its head once + 5 + 10 + 2 own tokens; b and d whole; c: 17 + 1 + 1.
    assert tokens.shared == (20 + 5 + 10 + 2) + 27 + (17 + 1 + 1) + 30 == 113
    assert tokens.head == 3 * 20 + 2 * 17 == 94
    assert tokens.predicted_gain == pytest.approx(170 / 113) and tokens.prefix_share == pytest.approx(94 / 170)
    assert (tokens.requests, tokens.prompts, tokens.planned, tokens.planned_gain) == (4, 8, None, None)
    # A lower threshold shares b's 10 tokens too.
    assert dr.prompt_tokens([a, b, c, d], min_shared_prefix=10).shared == 113 - 10
    # The server's plan at 40 tokens per micro-batch: a's own 2 and 5 with its head (27), then its own 10 with the
    # head again (30); b whole (27); c's two own tokens with its head (19); d whole (30).
    planned = dr.prompt_tokens([a, b, c, d], min_shared_prefix=16, max_batch_tokens=40)
    assert planned.planned == 27 + 30 + 27 + 19 + 30 == 133 and planned.planned_gain == pytest.approx(170 / 133)
    assert dr.prompt_tokens([a, b, c, d], min_shared_prefix=16, max_batch_tokens=4096).planned == 113
    # The server's default threshold (16) keeps b whole, as above.
    assert dr.prompt_tokens([a, b, c, d]).heads == (20, 0, 17, 0)


def test_levels_above_the_request_count_are_measured_once():
    assert dr.levels_for([1, 4], 3) == ([1, 4], [])
    assert dr.levels_for([1, 4], 1) == ([1], [4])
    assert dr.levels_for([1, 2, 4, 8], 2) == ([1, 2], [4, 8])


@pytest.mark.server
def test_decoder_bench_quick_run(decoder_dir, tmp_path):
    """Two request sizes (the second with a single request, so one concurrency level), both served variants."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "triton_rerank", "bench-decoder", "--quick", "--model-dir", str(decoder_dir),
               "--dtype", "float32", "--docs-per-request", "3,5", "--max-queries", "2,1", "--out", str(out),
               "--work-dir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("prompt token counts equal: passed") == 2
    for name in ("decoder.csv", "decoder_runs.csv", "decoder_gain.csv", "decoder.md"):
        assert (out / name).is_file()
    rows = list(csv.DictReader((out / "decoder.csv").open()))
    assert [(int(r["docs_per_request"]), r["contender"], int(r["concurrency"])) for r in rows] == [
        (3, dr.HF_CONTENDER, 0), (3, SHARED, 1), (3, SHARED, 2), (3, WHOLE, 1), (3, WHOLE, 2),
        (5, dr.HF_CONTENDER, 0), (5, SHARED, 1), (5, WHOLE, 1)]
    served = [r for r in rows if r["contender"] != dr.HF_CONTENDER]
    assert all(math.isfinite(float(r["ratio_vs_hf"])) and float(r["ratio_vs_hf"]) > 0 for r in served)
    assert [int(r["documents"]) for r in rows] == [6] * 5 + [5] * 3
    gains = list(csv.DictReader((out / "decoder_gain.csv").open()))
    assert [(int(g["docs_per_request"]), int(g["concurrency"])) for g in gains] == [(3, 1), (3, 2), (5, 1)]
    for g in gains:
        assert float(g["measured_gain"]) > 0 and float(g["predicted_gain"]) > 1
        assert int(g["whole_tokens"]) > int(g["shared_tokens"]) and 0 < float(g["prefix_share"]) < 1
    text = (out / "decoder.md").read_text()
    assert "## Shared prompt heads: measured against predicted gain" in text and "CPU " in text
    assert "prompt token counts equal: passed" in text and "tokens per pair" in text
    assert "concurrency 2 not measured at 5 documents" in text and "while idle" in text
