"""The OpenVINO engine against transformers on the same weights: parity in float32, bfloat16 within
twice transformers' own bfloat16 error, over micro-batches of awkward sizes; clear refusals."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from triton_rerank.serving.openvino_engine import OpenVINOEngine, openvino_module  # noqa: E402
from triton_rerank.serving.scoring import HFEngine, score_pairs  # noqa: E402
from triton_rerank.serving.tokenization import PairTokenizer  # noqa: E402

QUERY = "what do giant pandas eat in the wild"
DOCUMENTS = ["b", "bamboo shoots", "the giant panda eats bamboo shoots and leaves " * 3, "a search engine",
             "pandas are bears that live in the mountains of china " * 9, "leaves", "x y z " * 20]
CPU = torch.device("cpu")


def scores(engine, model_dir, budget: int) -> np.ndarray:
    packed = PairTokenizer(model_dir).encode(QUERY, DOCUMENTS)
    return score_pairs(engine, packed.input_ids, packed.token_type_ids, packed.lengths, budget)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("budget", [64, 512, 4096])  # one pair per micro-batch, a few, all in one
def test_float32_equals_transformers(tiny_model_dirs, arch, budget):
    model_dir = tiny_model_dirs[arch]
    expected = scores(HFEngine(str(model_dir), torch.float32, CPU), model_dir, 4096)
    got = scores(OpenVINOEngine(str(model_dir), torch.float32, CPU, num_threads=2), model_dir, budget)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_bfloat16_errs_no_more_than_twice_transformers_bfloat16(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    reference = scores(HFEngine(str(model_dir), torch.float32, CPU), model_dir, 4096)
    torch_error = np.abs(scores(HFEngine(str(model_dir), torch.bfloat16, CPU), model_dir, 4096) - reference).max()
    engine = OpenVINOEngine(str(model_dir), torch.bfloat16, CPU)
    assert engine.precision == "bf16"
    ours = scores(engine, model_dir, 512)
    assert np.abs(ours - reference).max() <= 2 * torch_error + 1e-3, (ours, reference, torch_error)


def test_what_it_does_not_run_is_refused(tiny_model_dirs, monkeypatch):
    model_dir = str(tiny_model_dirs["bert"])
    with pytest.raises(ValueError, match="runs on the CPU, not cuda:0"):
        OpenVINOEngine(model_dir, torch.float32, torch.device("cuda:0"))
    with pytest.raises(ValueError, match="float32 or bfloat16, not float16"):
        OpenVINOEngine(model_dir, torch.float16, CPU)
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ValueError, match=r"needs the openvino package: pip install 'triton-rerank\[openvino\]'"):
        openvino_module()
