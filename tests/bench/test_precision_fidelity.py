"""bench/precision_fidelity.py: its rank metrics, its bookkeeping of bf16 against fp32 (checked against
scores computed here pair by pair), the calibrated random models, and a miniature run of the command."""

from __future__ import annotations

import csv
import json
import random
import sys

import numpy as np
import pytest
import torch

from triton_rerank.bench import precision_fidelity as pf
from triton_rerank.bench.random_model import _WORDS, random_model, tiny_config, train_tokenizer
from triton_rerank.models.dtypes import int8_instructions

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_spearman_of_identical_scores_is_1_and_of_reversed_scores_is_minus_1():
    scores = np.random.default_rng(0).normal(size=50)
    assert pf.spearman(scores, scores) == pytest.approx(1.0)
    assert pf.spearman(scores, -scores) == pytest.approx(-1.0)
    # Ranks only: any increasing map keeps it at 1.
    assert pf.spearman(scores, np.exp(3 * scores)) == pytest.approx(1.0)


def test_spearman_without_ties_is_the_textbook_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    d = pf.average_ranks(a) - pf.average_ranks(b)
    n = len(a)
    assert pf.spearman(a, b) == pytest.approx(1 - 6 * float((d * d).sum()) / (n * (n * n - 1)))


def test_ties_share_their_average_rank():
    np.testing.assert_array_equal(pf.average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])
    a, b = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    # Pearson's correlation of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4].
    assert pf.spearman(a, b) == pytest.approx(float(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]))
    assert np.isnan(pf.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant list ranks nothing


def test_top_k_overlap_and_ties():
    a = np.arange(20.0)
    assert pf.top_k_overlap(a, a) == 1.0
    assert pf.top_k_overlap(a, -a) == 0.0
    b = a.copy()
    b[[19, 0]] = b[[0, 19]]  # the best and the worst swap places
    assert pf.top_k_overlap(a, b) == 0.9
    assert pf.top_k_overlap(a[:4], a[:4]) == 1.0  # k capped at the list's length
    assert pf.tied_pairs([1.0, 2.0, 2.0, 3.0, 3.0, 3.0]) == 5 and pf.tied_pairs([1.0, 2.0]) == 0


def test_fidelity_of_known_scores():
    fp32 = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0], dtype=np.float32)
    bf16 = np.array([0.0, 1.5, 2.0, 3.0, 12.5, 11.0, 10.0], dtype=np.float32)  # query 2 reversed
    queries = pf.per_query(fp32, bf16, [4, 3], ["q1", "q2"])
    assert [q.spearman for q in queries] == pytest.approx([1.0, -1.0])
    assert [q.max_abs_diff for q in queries] == pytest.approx([0.5, 2.5])
    assert [q.same_top1 for q in queries] == [True, False]
    f = pf.fidelity(fp32, bf16, queries)
    assert f.max_abs_diff == pytest.approx(2.5) and f.mean_abs_diff == pytest.approx(5.0 / 7)  # 0.5 + 2.5 + 2
    assert f.spearman_min == pytest.approx(-1.0) and f.spearman_median == pytest.approx(0.0)
    assert f.score_std == pytest.approx(float(fp32.std())) and f.max_over_std == pytest.approx(2.5 / fp32.std())
    assert f.same_top1 == 1 and f.pairs == 7 and f.queries == 2
    with pytest.raises(ValueError, match="sum to"):
        pf.per_query(fp32, bf16, [4, 2], ["q1", "q2"])


def test_the_report_names_the_servers_choice_on_this_cpu():
    from triton_rerank.models.dtypes import auto_dtype

    context = pf.machine_context(threads=1)
    assert context["server_default"] == ", ".join(auto_dtype("cpu"))
    from triton_rerank.models.dtypes import cpu_flags

    assert context["bf16_flags"] == ", ".join(f"{name} {'yes' if name in cpu_flags() else 'no'}"
                                              for name in pf.BF16_FLAGS)


# --------------------------------------------------------------------------------------------
# A tiny workload, scored by the benchmark and pair by pair here
# --------------------------------------------------------------------------------------------


def dl19_like(num_queries: int = 5, passages: int = 6, seed: int = 0) -> list[dict]:
    """DL19-format records of the tiny tokenizers' words."""
    rng = random.Random(seed)
    return [{"qid": str(1000 + q), "query": " ".join(rng.choices(_WORDS, k=4)),
             "candidates": [{"docid": f"{q}-{j}", "text": " ".join(rng.choices(_WORDS, k=rng.randint(5, 30)))}
                            for j in range(passages)]}
            for q in range(num_queries)]


def scores_pair_by_pair(model_dir, workload: pf.Workload, dtype: torch.dtype, quantize: str = "none") -> np.ndarray:
    """Each pair alone through the packed encoder (its own forward), in workload order."""
    from triton_rerank.models.cross_encoder import load_cross_encoder
    from triton_rerank.serving.tokenization import PairTokenizer

    model = load_cross_encoder(model_dir, dtype=dtype, attention_backend="sdpa", quantize=quantize)
    tokenizer = PairTokenizer(model_dir)
    out = []
    with torch.inference_mode():
        for query, documents in zip(workload.queries, workload.documents, strict=True):
            for document in documents:
                pair = tokenizer.encode(query, [document])
                ids = torch.from_numpy(pair.input_ids.astype(np.int64))
                types = torch.from_numpy(pair.token_type_ids.astype(np.int64))
                cu = torch.tensor([0, len(ids)], dtype=torch.int32)
                out.append(float(model(ids, cu, len(ids), types)[0]))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_reported_numbers_are_those_of_the_scores(tiny_model_dirs, reference_scores, arch):
    model_dir = tiny_model_dirs[arch]
    workload = pf.select_workload(dl19_like(), queries=3, passages=5)
    assert workload.pairs == 15 and workload.qids == ["1000", "1001", "1003"]  # spread over the 5 queries
    # A budget of one token: every pair gets a forward of its own, as it does here.
    (result,) = pf.measure(model_dir, arch, "tiny", workload, reference_pairs=7, max_batch_tokens=1)

    fp32 = scores_pair_by_pair(model_dir, workload, torch.float32)
    bf16 = scores_pair_by_pair(model_dir, workload, torch.bfloat16)
    # Exact on any CPU: the same engine, the same one-pair forwards, in this process, on this machine.
    np.testing.assert_array_equal(result.passes[0].scores, fp32)
    np.testing.assert_array_equal(result.passes[1].scores, bf16)
    diff = np.abs(bf16.astype(np.float64) - fp32)
    f = result.fidelity
    assert 0 < f.max_abs_diff == pytest.approx(float(diff.max()), abs=1e-7)
    assert f.mean_abs_diff == pytest.approx(float(diff.mean()), abs=1e-7)
    assert f.score_std == pytest.approx(float(fp32.std()), rel=1e-6)
    rho = [pf.spearman(fp32[i:i + 5], bf16[i:i + 5]) for i in (0, 5, 10)]
    assert [q.spearman for q in result.queries] == pytest.approx(rho)
    assert f.spearman_min == pytest.approx(min(rho)) and f.spearman_median == pytest.approx(float(np.median(rho)))
    assert [q.pairs for q in result.queries] == [5, 5, 5] and [q.qid for q in result.queries] == workload.qids

    # The transformers check on the first 7 pairs: its fp32 is ours (and the conftest's reference).
    reference = result.reference
    assert reference.pairs == 7 and reference.fp32_max_abs_diff < 1e-4
    hf = np.array(reference_scores(model_dir, workload.queries[0], workload.documents[0])
                  + reference_scores(model_dir, workload.queries[1], workload.documents[1][:2]))
    np.testing.assert_allclose(hf, fp32[:7], atol=1e-4)
    assert reference.ours_max == pytest.approx(float(diff[:7].max()), abs=1e-7)
    assert reference.hf_bf16_max > 0 and np.isfinite(reference.hf_bf16_mean)
    assert result.passes[1].head_dtype in ("bfloat16", "float32") and result.passes[2].head_dtype == ""
    assert [p.engine for p in result.passes] == ["packed float32", "packed bfloat16", "transformers float32",
                                                 "transformers bfloat16"]


@pytest.mark.skipif(not int8_instructions(), reason="this CPU has no int8 dot-product instructions")
def test_each_reduced_precision_gets_its_own_result(tiny_model_dirs):
    model_dir = tiny_model_dirs["bert"]
    workload = pf.select_workload(dl19_like(), queries=2, passages=4)
    bf16, int8 = pf.measure(model_dir, "bert", "tiny", workload, reference_pairs=3, max_batch_tokens=1,
                            precisions=("bfloat16", "int8"))
    assert (bf16.precision, int8.precision) == ("bfloat16", "int8")
    assert [p.engine for p in int8.passes] == ["packed float32", "packed int8", "transformers float32",
                                               "transformers bfloat16"]
    fp32 = scores_pair_by_pair(model_dir, workload, torch.float32)
    quantized = scores_pair_by_pair(model_dir, workload, torch.bfloat16, quantize="int8")
    np.testing.assert_allclose(int8.passes[1].scores, quantized, rtol=0, atol=1e-6)
    diff = np.abs(quantized.astype(np.float64) - fp32)
    assert int8.fidelity.max_abs_diff == pytest.approx(float(diff.max()), abs=1e-6) and diff.max() > 0
    assert int8.reference.ours_max == pytest.approx(float(diff[:3].max()), abs=1e-6)
    # The same fp32 pass and transformers check serve both.
    assert bf16.passes[0] is int8.passes[0] and bf16.reference.fp32_max_abs_diff == int8.reference.fp32_max_abs_diff


@pytest.mark.parametrize(("precision", "engine"), [("openvino", "openvino bfloat16"), ("openvino-int8", "openvino int8")])
def test_openvino_is_measured_as_a_reduced_precision_of_its_own(tiny_model_dirs, precision, engine):
    pytest.importorskip("openvino")
    if precision.endswith("int8") and not int8_instructions():
        pytest.skip("this CPU has no int8 dot-product instructions")
    model_dir = tiny_model_dirs["bert"]
    workload = pf.select_workload(dl19_like(), queries=2, passages=4)
    (result,) = pf.measure(model_dir, "bert", "tiny", workload, reference_pairs=3, precisions=(precision,))
    assert [p.engine for p in result.passes] == ["packed float32", engine, "transformers float32",
                                                 "transformers bfloat16"]
    assert result.reduced_seconds == result.passes[1].seconds > 0  # its time is reported, not NaN
    diff = np.abs(result.passes[1].scores.astype(np.float64) - scores_pair_by_pair(model_dir, workload, torch.float32))
    assert result.fidelity.max_abs_diff == pytest.approx(float(diff.max()), abs=1e-5) and diff.max() > 0


# Stands in for the peers' runner (bench/cpu_peer_runner.py): float32 scores from the documents' lengths,
# int8 off by 0.25 on the first pair, OpenVINO exact.
FAKE_PEER_RUNNER = '''
import json, sys
job = json.load(sys.stdin)
scores = [len(d) / 10 for q, d in job["pairs"]]
if job["contender"] == "st-onnx-int8":
    scores[0] += 0.25
print(json.dumps({"scores": scores, "seconds": 2.0, "load_seconds": 1.0, "versions": {"fake": job["model_dir"]}}))
'''


@pytest.fixture
def fake_peer_runner(tmp_path, monkeypatch):
    from triton_rerank.bench import cpu_peers

    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_PEER_RUNNER)
    monkeypatch.setattr(cpu_peers, "RUNNER", runner)


def test_peers_are_measured_against_their_own_float32(tiny_model_dirs, fake_peer_runner, tmp_path):
    model_dir = tiny_model_dirs["bert"]
    workload = pf.select_workload(dl19_like(), queries=2, passages=4)
    (ours,) = pf.measure(model_dir, "bert", "tiny", workload, reference_pairs=0)
    int8, openvino = pf.measure_peers(model_dir, "bert", "tiny", workload, ours.passes[0], python=sys.executable,
                                      peers=["st-onnx-int8", "st-openvino"], threads=1, work=tmp_path / "work")
    assert (int8.precision, openvino.precision) == ("st-onnx-int8", "st-openvino")
    theirs = np.array([len(d) / 10 for documents in workload.documents for d in documents])
    reduced = theirs.copy()
    reduced[0] += 0.25
    assert [p.engine for p in int8.passes] == ["packed float32", "st-onnx-int8", "st-torch-fp32"]
    assert int8.fidelity.max_abs_diff == pytest.approx(0.25, abs=1e-6) and openvino.fidelity.max_abs_diff == 0
    assert int8.queries[0].spearman == pytest.approx(pf.spearman(theirs[:4], reduced[:4]))
    assert int8.queries[1].spearman == pytest.approx(1.0) and openvino.fidelity.spearman_min == pytest.approx(1.0)
    # The check that the peer scores our model: its float32 against ours, every pair.
    assert int8.reference.pairs == 8
    assert int8.reference.fp32_max_abs_diff == pytest.approx(float(np.abs(theirs - ours.passes[0].scores).max()),
                                                             abs=1e-6)
    assert int8.reduced_seconds == 2.0 and (tmp_path / "work" / "peers" / "st-onnx-int8" / "config.json").is_file()


def test_the_command_puts_the_peers_in_its_table(tiny_model_dirs, tiny_data_dir, fake_peer_runner, tmp_path):
    out = tmp_path / "results"
    assert pf.main(["--model-dir", str(tiny_model_dirs["bert"]), "--data-dir", str(tiny_data_dir), "--queries", "2",
                    "--passages", "3", "--reference-pairs", "0", "--precisions", "bfloat16", "--peer-python",
                    sys.executable, "--peers", "st-onnx-int8", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "precision_fidelity.csv")))
    assert [r["precision"] for r in rows] == ["bfloat16", "st-onnx-int8"]
    assert float(rows[1]["max_abs_diff"]) == pytest.approx(0.25, abs=1e-6)
    assert float(rows[1]["fp32_s"]) == float(rows[1]["reduced_s"]) == 2.0  # the peer's own passes' times
    text = (out / "precision_fidelity.md").read_text()
    assert "| peer: ONNX Runtime dynamic int8 (sentence-transformers) | 6 (2) |" in text
    assert "Rows marked peer" in text
    with pytest.raises(SystemExit, match="no such file; create the peers' environment"):
        pf.main(["--peer-python", str(tmp_path / "missing" / "python")])
    with pytest.raises(SystemExit):
        pf.main(["--peers", "st-vllm"])


def test_no_reference_pairs_skip_transformers(tiny_model_dirs):
    workload = pf.select_workload(dl19_like(), queries=2, passages=3)
    (result,) = pf.measure(tiny_model_dirs["bert"], "bert", "tiny", workload, reference_pairs=0)
    assert len(result.passes) == 2 and result.reference.pairs == 0 and np.isnan(result.reference.fp32_max_abs_diff)


# --------------------------------------------------------------------------------------------
# Random models: scaled encoder, calibrated head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_scale_encoder_leaves_the_output_projection_and_embeddings(arch):
    model = random_model(tiny_config(arch), seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    out_name = "classifier.weight" if arch == "bert" else "classifier.out_proj.weight"
    assert pf.output_projection(model).weight is dict(model.named_parameters())[out_name]
    pf.scale_encoder(model, 2.5)
    after = dict(model.named_parameters())
    for name, p in before.items():
        linear = name.endswith("weight") and "LayerNorm" not in name and "embeddings" not in name
        expected = p * 2.5 if linear and name != out_name else p
        torch.testing.assert_close(after[name].detach(), expected, msg=name)


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    """A data folder with a tiny BERT config, its trained tokenizer and a DL19-format file."""
    root = tmp_path_factory.mktemp("data")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.json").write_text(json.dumps(tiny_config("bert")))
    train_tokenizer("bert").save(str(root / "tokenizer.json"))
    with open(root / pf.DL19_FILE, "w") as f:
        for record in dl19_like(num_queries=6, passages=100):
            f.write(json.dumps(record) + "\n")
    return root


TINY_SHAPE = pf.Shape("tiny-bert", "tiny BERT", "configs/tiny.json", "tokenizer.json", {}, None, 2, 4, 3)


def test_built_models_are_calibrated_seeded_and_reused(tiny_data_dir, tmp_path):
    records = pf.load_dl19(tiny_data_dir / pf.DL19_FILE)
    calibration = pf.calibration_pairs(records)
    assert len(calibration) == pf.CALIBRATION_QUERIES * len(pf.CALIBRATION_RANKS)
    assert calibration[0] == (records[-4]["query"], records[-4]["candidates"][0]["text"])

    def build(**kw):
        return pf.build_model(TINY_SHAPE, tiny_data_dir, records, root=tmp_path, **{"encoder_scale": 2.5,
                                                                                   "score_std": 3.0, **kw})

    out = build()
    assert out == tmp_path / "tiny-bert-x2.5"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    scores = pf.hf_scores(model, out / "tokenizer.json", calibration, max_length=512)
    assert scores.mean() == pytest.approx(0.0, abs=1e-4) and scores.std() == pytest.approx(3.0, rel=1e-4)
    marker = json.loads((out / pf.MARKER).read_text())
    assert marker["encoder_scale"] == 2.5 and marker["calibrated"]["weight_scale"] > 0
    assert "x2.5 of the 0.02 init" in pf.describe(out, "tiny BERT")

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build() == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    again = build(score_std=2.0)  # another recipe: rebuilt, same weights up to the head's affine map
    assert json.loads((again / pf.MARKER).read_text())["score_std"] == 2.0
    other = pf.hf_scores(AutoModelForSequenceClassification.from_pretrained(again).eval(), again / "tokenizer.json",
                         calibration, max_length=512)
    np.testing.assert_allclose(other, scores * 2.0 / 3.0, atol=1e-4)


def test_the_command_writes_its_reports(tiny_model_dirs, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert pf.main(["--model-dir", str(tiny_model_dirs["xlm-roberta"]), "--data-dir", str(tiny_data_dir),
                    "--queries", "3", "--passages", "4", "--reference-pairs", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Spearman median" in printed and "avx512_bf16" in printed
    rows = list(csv.DictReader(open(out / "precision_fidelity.csv")))
    precisions = pf.default_precisions()
    assert precisions[0] == "bfloat16" and ("int8" in precisions) == bool(int8_instructions())
    assert [r["precision"] for r in rows] == precisions
    assert {r["model"] for r in rows} == {"xlm-roberta"} and rows[0]["pairs"] == "12"
    assert int(rows[0]["reference_pairs"]) == 5 and float(rows[0]["reference_fp32_max_abs_diff"]) < 1e-4
    assert -1 <= float(rows[0]["spearman_min"]) <= float(rows[0]["spearman_median"]) <= 1
    queries = list(csv.DictReader(open(out / "precision_fidelity_queries.csv")))
    assert [q["pairs"] for q in queries] == ["4", "4", "4"] * len(precisions)
    for row in rows:
        own = [float(q["max_abs_diff"]) for q in queries if q["precision"] == row["precision"]]
        assert max(own) == pytest.approx(float(row["max_abs_diff"]), rel=1e-5)
    text = (out / "precision_fidelity.md").read_text()
    assert "| xlm-roberta | bf16 | 12 (3) |" in text and "## transformers on the same pairs" in text


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        pf.main(["--help"])
    assert exit_.value.code == 0 and "--encoder-scales" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pf.main(["--shapes", "gpt2"])
    with pytest.raises(SystemExit, match="not found"):
        pf.main(["--data-dir", "/nonexistent/data"])
