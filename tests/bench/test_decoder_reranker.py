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


def test_parity_per_request_and_its_verdicts():
    passes = [one_pass(ld.HF_CONTENDER, 0, 1, 2.0, [0.2, 0.6, 0.5]),
              one_pass(ld.SERVED_CONTENDER, 1, 1, 1.0, [0.2, 0.60005, 0.5]),
              one_pass(ld.SERVED_CONTENDER, 4, 1, 1.0, [0.2, 0.6, 0.50002])]
    check = dr.parity(passes, REQUESTS, tolerance=1e-4, judged=True)
    assert check.ok and check.verdict == "passed"
    assert [r.documents for r in check.requests] == [2, 1]
    assert check.requests[0].max_abs_diff == pytest.approx(5e-5, rel=1e-6)
    assert check.requests[0].spearman_min == pytest.approx(1.0)
    assert check.requests[1].max_abs_diff == pytest.approx(2e-5, rel=1e-6) and math.isnan(check.requests[1].spearman_min)
    assert check.spearman() == pytest.approx((1.0, 1.0))
    # Beyond the tolerance: failed in float32, reported otherwise.
    passes.append(one_pass(ld.SERVED_CONTENDER, 1, 2, 1.0, [0.7, 0.6, 0.5]))
    assert not dr.parity(passes, REQUESTS, 1e-4, judged=True).ok
    loose = dr.parity(passes, REQUESTS, 1e-4, judged=False)
    assert loose.ok and loose.verdict.startswith("reported") and loose.requests[0].spearman_min == pytest.approx(-1.0)
    # A prompt of another length fails in any dtype.
    passes.append(one_pass(ld.SERVED_CONTENDER, 1, 2, 1.0, [0.2, 0.6, 0.5], tokens=(90, 96, 100)))
    assert not dr.parity(passes, REQUESTS, 1e-4, judged=False).ok


def test_rows_carry_this_benchmarks_names_and_ratios():
    passes = [one_pass(ld.HF_CONTENDER, 0, 1, 3.0, [0, 0, 0]), one_pass(ld.SERVED_CONTENDER, 1, 1, 1.0, [0, 0, 0]),
              one_pass(ld.SERVED_CONTENDER, 1, 2, 2.0, [0, 0, 0]), one_pass(ld.HF_CONTENDER, 0, 2, 4.0, [0, 0, 0])]
    rows, raw = dr.rows_of(passes, {ld.HF_CONTENDER: "hf", ld.SERVED_CONTENDER: "served"})
    assert [r.contender for r in rows] == [dr.HF_CONTENDER, dr.SERVED_CONTENDER]
    assert {r.contender for r in raw} == {dr.HF_CONTENDER, dr.SERVED_CONTENDER} and len(raw) == 4
    assert rows[1].ratio_vs_hf == pytest.approx(2.5) and rows[1].each_run_ratio == "3.00, 2.00"
    assert rows[0].windows_per_s == pytest.approx(0.875) and rows[0].backend == "hf"
    assert "| hf-recipe | in-process | 2 | 0.88 |" in dr.results_table(rows)


@pytest.mark.server
def test_decoder_bench_quick_run(decoder_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "triton_rerank", "bench-decoder", "--quick", "--model-dir", str(decoder_dir),
               "--dtype", "float32", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "prompt token counts equal: passed" in result.stdout
    for name in ("decoder.csv", "decoder_runs.csv", "decoder.md"):
        assert (out / name).is_file()
    rows = list(csv.DictReader((out / "decoder.csv").open()))
    assert {r["contender"] for r in rows} == {dr.HF_CONTENDER, dr.SERVED_CONTENDER}
    assert [int(r["concurrency"]) for r in rows] == [0, 1, 2]
    served = [r for r in rows if r["contender"] == dr.SERVED_CONTENDER]
    assert all(math.isfinite(float(r["ratio_vs_hf"])) and float(r["ratio_vs_hf"]) > 0 for r in served)
    assert all(int(r["documents"]) == 8 for r in rows)
    text = (out / "decoder.md").read_text()
    assert "prompt token counts equal: passed" in text and "CPU " in text and "tokens per pair" in text
