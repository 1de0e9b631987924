"""bench/cpu_peers.py: the peers' protocol, their rows and their check against the float32 reference; with
a peers' venv present (build/cpu-peers-venv or $TRITON_RERANK_PEER_PYTHON), each real peer on a tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from triton_rerank.bench import cpu_peers
from triton_rerank.bench.workload import Request, RequestSet

# Stands in for the peers' runner: the protocol, with scores from the pairs' lengths.
FAKE_RUNNER = '''
import json, sys
job = json.load(sys.stdin)
if job["contender"] == "st-openvino":
    sys.exit("no openvino here")
bump = 0.25 if job["contender"] == "st-onnx-int8" else 0.0
scores = [len(q) + len(d) / 10 + bump for q, d in job["pairs"]]
print("export chatter")
print(json.dumps({"scores": scores, "seconds": 2.0, "load_seconds": 1.0, "versions": {"fake": job["model_dir"]}}))
'''


def requests() -> RequestSet:
    reqs = [Request("q1", ("a", "bb", "ccc")), Request("query two", ("dddd",))]
    return RequestSet(reqs, "test")


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    runner = tmp_path / "runner.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setattr(cpu_peers, "RUNNER", runner)


def test_peers_run_in_turn_the_reference_first_and_are_checked_against_it(fake_runner, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    notes = []
    rows = cpu_peers.run_peers(sys.executable, ["st-onnx-int8", "st-onnx-fp32"], model, requests(), tmp_path / "work",
                               threads=2, batch_size=8, note=notes.append)
    assert [r.contender for r in rows] == ["st-torch-fp32", "st-onnx-int8", "st-onnx-fp32"]
    assert notes == ["st-torch-fp32 (4 pairs)", "st-onnx-int8 (4 pairs)", "st-onnx-fp32 (4 pairs)"]
    int8 = rows[1]
    assert (int8.kind, int8.measure, int8.variant) == ("in-process", "offline", "bs=8 thr=2")
    assert int8.pairs_per_s == pytest.approx(4 / 2.0) and int8.requests_per_s == pytest.approx(2 / 2.0)
    assert "max |score - st-torch-fp32| 0.25" in int8.backend and "max |score" in rows[2].backend
    assert "max |score" not in rows[0].backend
    # Each contender exports into its own copy of the model's files.
    assert (tmp_path / "work" / "peers" / "st-onnx-int8" / "config.json").is_file()
    assert str(tmp_path / "work" / "peers" / "st-onnx-int8") in int8.backend


def test_a_failing_peer_says_why(fake_runner, tmp_path):
    with pytest.raises(RuntimeError, match="st-openvino failed .*no openvino here"):
        cpu_peers.run_peer(sys.executable, "st-openvino", tmp_path, [("q", "d")], 1, 1)
    with pytest.raises(ValueError, match="unknown peer 'st-vllm'"):
        cpu_peers.run_peer(sys.executable, "st-vllm", tmp_path, [("q", "d")], 1, 1)


PEER_PYTHON = os.environ.get("TRITON_RERANK_PEER_PYTHON",
                             str(Path(__file__).resolve().parents[2] / "build" / "cpu-peers-venv" / "bin" / "python"))


@pytest.mark.skipif(not Path(PEER_PYTHON).is_file(), reason="no peers' venv (make bench-cpu-peers-setup)")
def test_real_peers_score_like_transformers(tiny_model_dirs, reference_scores, tmp_path):
    model_dir = tiny_model_dirs["bert"]
    query, documents = "what do pandas eat", ["bamboo shoots", "a search engine", "pandas eat bamboo " * 5]
    expected = np.array(reference_scores(model_dir, query, documents))
    for contender in cpu_peers.PEERS:
        copy = cpu_peers.model_copy(model_dir, tmp_path, contender)
        result = cpu_peers.run_peer(PEER_PYTHON, contender, copy, [(query, d) for d in documents], 1, 2)
        # Exact exports at float32's tolerance; O3 swaps in an approximate GELU; bf16 and OpenVINO's bf16 round;
        # ONNX Runtime's dynamic int8 (one activation scale per call) errs most, by CPU: 0.18 seen on scores of
        # 1-2 on a Zen 4, 0.46 on a Zen 5 (its VNNI kernels round differently); a wrong model errs by whole units.
        atol = {"st-torch-fp32": 1e-4, "st-onnx-fp32": 1e-4, "st-onnx-o3": 1e-2, "st-onnx-int8": 0.6}.get(contender, 0.1)
        np.testing.assert_allclose(result.scores, expected, atol=atol, err_msg=contender)
        assert result.seconds > 0 and "sentence-transformers" in result.versions
        # A second run reuses the export kept in the copy.
        again = cpu_peers.run_peer(PEER_PYTHON, contender, copy, [(query, d) for d in documents], 1, 2)
        np.testing.assert_allclose(again.scores, result.scores, atol=1e-6, err_msg=contender)
