"""The OpenVINO engine against transformers on the same weights: parity in float32, bfloat16 within
twice transformers' own bfloat16 error, over micro-batches of awkward sizes; int8 linears that run
int8 kernels, calibrated the same at every load; clear refusals."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from triton_rerank.models.cross_encoder import load_cross_encoder  # noqa: E402
from triton_rerank.models.dtypes import int8_instructions  # noqa: E402
from triton_rerank.serving.openvino_engine import OpenVINOEngine, openvino_module, padded_graph  # noqa: E402
from triton_rerank.serving.openvino_int8 import calibration_inputs, token_linears  # noqa: E402
from triton_rerank.serving.scoring import HFEngine, score_pairs  # noqa: E402
from triton_rerank.serving.tokenization import PairTokenizer  # noqa: E402

QUERY = "what do giant pandas eat in the wild"
DOCUMENTS = ["b", "bamboo shoots", "the giant panda eats bamboo shoots and leaves " * 3, "a search engine",
             "pandas are bears that live in the mountains of china " * 9, "leaves", "x y z " * 20]
CPU = torch.device("cpu")


# 48 documents of the words above, for errors whose max over 7 pairs would swing from run to run.
_WORDS = " ".join(DOCUMENTS).split()
MANY_DOCUMENTS = [" ".join(np.random.default_rng(i).choice(_WORDS, 3 + 5 * i)) for i in range(48)]


def scores(engine, model_dir, budget: int, documents=DOCUMENTS) -> np.ndarray:
    packed = PairTokenizer(model_dir).encode(QUERY, documents)
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
    # Over 48 pairs: over 7, transformers' own max error swung 0.026-0.095 between these tiny models
    # (their tokenizers, and so their weights, vary between processes), ours 0.018-0.074.
    model_dir = tiny_model_dirs[arch]
    reference = scores(HFEngine(str(model_dir), torch.float32, CPU), model_dir, 4096, MANY_DOCUMENTS)
    torch_error = np.abs(scores(HFEngine(str(model_dir), torch.bfloat16, CPU), model_dir, 4096, MANY_DOCUMENTS)
                         - reference).max()
    engine = OpenVINOEngine(str(model_dir), torch.bfloat16, CPU)
    assert engine.precision == "bf16"
    ours = scores(engine, model_dir, 512, MANY_DOCUMENTS)
    assert np.abs(ours - reference).max() <= 2 * torch_error + 1e-3, (ours, reference, torch_error)


def test_bfloat16_scores_are_not_rounded_to_bfloat16(tiny_model_dirs):
    """The head runs in float32 outside the bf16 graph: in it, every score would be a bf16 value (8
    significant bits), and pairs that float32 ranks apart would tie."""
    model_dir = tiny_model_dirs["bert"]
    got = scores(OpenVINOEngine(str(model_dir), torch.bfloat16, CPU), model_dir, 512)
    as_bf16 = torch.from_numpy(got).bfloat16().float().numpy()
    assert np.count_nonzero(as_bf16 != got) >= len(got) - 1, got  # a float32 is a bf16 value 1 time in 65,536


def test_a_batch_longer_than_the_position_table_is_refused(tiny_model_dirs):
    from triton_rerank.serving.micro_batches import PackedBatch

    model_dir = tiny_model_dirs["bert"]
    engine = OpenVINOEngine(str(model_dir), torch.float32, CPU)
    longest = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    ids = torch.ones(longest + 1, dtype=torch.long)
    batch = PackedBatch(ids, torch.zeros_like(ids), torch.tensor([0, longest + 1], dtype=torch.int32), longest + 1)
    with pytest.raises(ValueError, match=f"max_seqlen {longest + 1} exceeds the model's limit of {longest} tokens"):
        engine(batch)


def test_what_it_does_not_run_is_refused(tiny_model_dirs, monkeypatch):
    model_dir = str(tiny_model_dirs["bert"])
    with pytest.raises(ValueError, match="runs on the CPU, not cuda:0"):
        OpenVINOEngine(model_dir, torch.float32, torch.device("cuda:0"))
    with pytest.raises(ValueError, match="float32 or bfloat16, not float16"):
        OpenVINOEngine(model_dir, torch.float16, CPU)
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ValueError, match=r"needs the openvino package: pip install 'triton-rerank\[openvino\]'"):
        openvino_module()


needs_int8 = pytest.mark.skipif(not int8_instructions(), reason="this CPU has no int8 dot-product instructions")


def int8_kernels(engine: OpenVINOEngine) -> list[str]:
    """Runtime precisions of the compiled graph's matmul layers (what OpenVINO really runs)."""
    return [op.get_rt_info()["runtimePrecision"].astype(str) for op in engine.compiled.get_runtime_model().get_ops()
            if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]


@needs_int8
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_follows_float32_on_int8_kernels(tiny_model_dirs, arch, dtype):
    model_dir = tiny_model_dirs[arch]
    reference = scores(HFEngine(str(model_dir), torch.float32, CPU), model_dir, 4096)
    engine = OpenVINOEngine(str(model_dir), dtype, CPU, num_threads=2, quantize="int8")
    assert engine.quantize == "int8"
    # Every token linear in int8 (4 per layer, the last layer's keys and values); pooler and head not.
    precisions = int8_kernels(engine)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert precisions.count("u8") + precisions.count("i8") >= 4 * (layers - 1) + 1, precisions
    got = scores(engine, model_dir, 512)
    # 256 steps per tensor on these tiny models (hidden 64; their trained tokenizers, and so the models,
    # vary between processes) err 0.11-0.34 on scores of 0.2-2.5 (the packed engine's per-token int8:
    # 0.06-0.18); a wrong scale, axis or range moves scores by their whole spread.
    np.testing.assert_allclose(got, reference, atol=0.5)
    assert not np.array_equal(got, reference)  # quantized for real
    # The same graph at every load: calibration is deterministic.
    again = OpenVINOEngine(str(model_dir), dtype, CPU, num_threads=2, quantize="int8")
    np.testing.assert_array_equal(scores(again, model_dir, 512), got)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_calibration_pairs_are_the_models_own_and_fixed(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    first = calibration_inputs(str(model_dir), 1, arch == "bert")
    second = calibration_inputs(str(model_dir), 1, arch == "bert")
    assert len(first) == len(second) and all(
        np.array_equal(a[name], b[name]) for a, b in zip(first, second, strict=True) for name in a)
    lengths = np.concatenate([batch["attention_mask"].sum(axis=1) for batch in first])
    assert len(lengths) == 64 and lengths.min() >= 8 and lengths.max() <= 512
    assert lengths.std() > 10  # short and long pairs: the ranges cover both
    assert ("token_type_ids" in first[0]) == (arch == "bert")
    # Pairs open with the family's own start token, as the tokenizer step would send them.
    request = PairTokenizer(model_dir).encode("q", ["d"])
    assert {int(batch["input_ids"][i, 0]) for batch in first for i in range(len(batch["input_ids"]))} == {
        int(request.input_ids[0])}


def test_token_linears_are_the_encoders_projections(tiny_model_dirs):
    model_dir = tiny_model_dirs["bert"]
    graph = padded_graph(openvino_module(), load_cross_encoder(model_dir))
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    # qkv, attention output, FFN in and out of every layer but the last, whose keys and values are
    # the only projection of all tokens (the rest runs on the first tokens); not the pooler or head.
    linears = token_linears(graph)
    assert len(linears) == 4 * (layers - 1) + 1
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    assert [tuple(op.input_value(1).get_shape()) for op in linears][-1] == (2 * hidden, hidden)


def test_int8_refusals(tiny_model_dirs, monkeypatch):
    model_dir = str(tiny_model_dirs["bert"])
    with pytest.raises(ValueError, match="quantize must be one of none, int8, got 'int4'"):
        OpenVINOEngine(model_dir, torch.float32, CPU, quantize="int4")
    monkeypatch.setattr("triton_rerank.serving.openvino_engine.int8_instructions", lambda: [])
    with pytest.raises(ValueError, match="needs a CPU with int8 dot-product instructions"):
        OpenVINOEngine(model_dir, torch.float32, CPU, quantize="int8")
