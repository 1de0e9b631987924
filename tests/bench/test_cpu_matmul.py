"""The CPU matmul benchmark: each precision's op computes the linear layer (against float64, within its
precision's error), and a small run end to end writes its table."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from triton_rerank.bench import cpu_matmul as cm

# (precision, largest relative error accepted): bfloat16 rounds inputs and weights to 8 bits of mantissa;
# int8 rounds weights (and, dynamic, activations) to 1/127 of their channel's (tensor's) range.
BOUNDS = [("float32", 1e-5), ("bfloat16", 2e-2), ("int8-weights", 3e-2), ("int8-dynamic", 6e-2)]


@pytest.mark.parametrize("precision, bound", BOUNDS)
@pytest.mark.parametrize("tokens, k, n", [(1, 32, 16), (37, 96, 80), (130, 384, 200)])
def test_each_precision_computes_the_linear_layer(precision, bound, tokens, k, n):
    rate = cm.measure(precision, tokens, k, n, repeats=2)
    assert rate.rel_error < bound, rate
    assert rate.ms > 0 and rate.gflops > 0 and (rate.tokens, rate.in_features, rate.out_features) == (tokens, k, n)


def test_a_wrong_precision_is_refused():
    import torch

    with pytest.raises(ValueError, match="precision must be one of"):
        cm.linear_op("int4", torch.ones(2, 2), torch.zeros(2))


def test_layer_linears_and_totals():
    assert cm.layer_linears(384, 1536) == {"qkv": (384, 1152), "attn_out": (384, 384), "ffn_in": (384, 1536),
                                           "ffn_out": (1536, 384)}
    rates = [cm.Rate("qkv", "bfloat16", 8, 4, 4, 2.0, 1.0, 0.0), cm.Rate("ffn_in", "bfloat16", 8, 4, 4, 2.0, 1.0, 0.0),
             cm.Rate("qkv", "int8-dynamic", 8, 4, 4, 1.0, 1.0, 0.0), cm.Rate("square", "bfloat16", 8, 8, 8, 9.0, 1.0, 0.0)]
    assert cm.layer_totals(rates) == {"bfloat16": 4.0, "int8-dynamic": 1.0}
    assert "int8-dynamic 1.00 ms (4.00x bfloat16's speed)" in cm.totals_line(rates)


def test_a_small_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-cpu-matmul", "--shape", "64,128",
                             "--tokens", "50", "--square", "96", "--repeats", "2", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "matmul.csv")))
    assert {(r["shape"], r["precision"]) for r in rows} == {
        (s, p) for s in ("qkv", "attn_out", "ffn_in", "ffn_out", "square") for p in cm.PRECISIONS}
    assert all(float(r["gflops"]) > 0 for r in rows)
    text = (out / "matmul.md").read_text()
    assert "| ffn_out | int8-dynamic | 50 x 128 x 64 |" in text and "int8 instructions:" in text


def test_bad_arguments_say_what_is_wrong():
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-cpu-matmul", "--shape", "384"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "HIDDEN,INTERMEDIATE" in result.stderr
    result = subprocess.run([sys.executable, "-m", "triton_rerank", "bench-cpu-matmul", "--precisions", "int4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "choose from float32" in result.stderr
