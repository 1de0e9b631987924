"""CPU tests of the GPU check's results: derived metrics, targets, markdown, atomic writes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from triton_rerank.bench.gpu import results as gr


def _full_results() -> dict:
    return {
        "argv": ["--out", "x"],
        "started": "t0",
        "budget_s": 450.0,
        "stages": {
            "env": {"status": "ok", "seconds": 10.0,
                    "data": {"device_name": "NVIDIA H100 80GB HBM3", "matmul_tflops": {"bfloat16": 600.0,
                                                                                     "float16": 620.0}}},
            "tests": {"status": "failed", "seconds": 50.0,
                      "data": {"command": "pytest", "returncode": 1, "counts": {"passed": 3, "failed": 1},
                               "tail": ["1 failed, 3 passed in 40s"]}},
            "attention": {"status": "ok", "seconds": 30.0, "data": {"heads": 16, "head_dim": 64, "cases": [
                {"case": "dl19_pack128", "dtype": "float16", "n_seqs": 128, "total_tokens": 13000,
                 "speedup_vs_best_torch": 0.9, "max_abs_err_vs_reference": 1e-3,
                 "methods": {"ours": {"ms": 1.0, "tflops": 100.0}, "torch_varlen_flash": {"ms": 0.9}}},
                {"case": "uniform512_x32", "dtype": "float16", "speedup_vs_best_torch": 0.5, "methods": {}},
            ]}},
            "encoder": {"status": "ok (with errors)", "seconds": 60.0, "data": {
                "variants": {"packed_triton": {"pairs_per_s": 4000.0, "tflops": 240.0},
                             "hf_padded": {"pairs_per_s": 2000.0, "tflops": 110.0},
                             "packed_sdpa": {"error": "RuntimeError: boom"}},
                "errors": [{"where": "variant packed_sdpa", "error": "RuntimeError: boom"}],
                "agreement": {"n": 64, "hf_score_std": 0.1, "packed_triton_vs_hf": {"max_abs_diff": 0.002}},
            }},
        },
    }


def test_write_results_full(tmp_path):
    results = _full_results()
    jp, mp = gr.write_results(tmp_path / "out", results)
    data = json.loads(jp.read_text())
    variants = data["stages"]["encoder"]["data"]["variants"]
    assert variants["packed_triton"]["mfu_vs_bf16_matmul"] == pytest.approx(0.4)
    assert variants["hf_padded"]["mfu_vs_fp16_matmul"] == pytest.approx(110 / 620)
    targets = {t["name"]: t for t in data["targets"]}
    att = targets["attention dl19_pack128 float16: ours vs best torch (equal work)"]
    assert att["met"] is True and att["value"] == 0.9
    assert not any("uniform512" in name for name in targets)  # only packs of DL19-like lengths count
    ratio = targets["encoder: packed-triton vs HF padded-batch pairs/s"]
    assert ratio["value"] == pytest.approx(2.0) and ratio["met"] is True
    mfu = targets["encoder: packed-triton MFU (vs measured bf16 matmul)"]
    assert mfu["met"] is False

    md = mp.read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "## Targets" in md and "## Attention kernel" in md and "## Encoder" in md and "## Kernel tests" in md
    assert "packed_triton" in md and "RuntimeError: boom" in md
    assert "| tests | failed |" in md
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_write_results_partial_and_missing_targets(tmp_path):
    results = {"stages": {"env": {"status": "running"}, "tests": {"status": "pending"}}}
    jp, mp = gr.write_results(tmp_path, results)
    assert json.loads(jp.read_text())["targets"] == []
    assert "| env | running |" in mp.read_text()
    # env without the bf16 rate: no MFU, no MFU target, but the throughput target still computed
    results = _full_results()
    del results["stages"]["env"]["data"]["matmul_tflops"]
    gr.write_results(tmp_path, results)
    data = json.loads(jp.read_text())
    assert "mfu_vs_bf16_matmul" not in data["stages"]["encoder"]["data"]["variants"]["packed_triton"]
    assert [t["name"].split(":")[0] for t in data["targets"]].count("encoder") == 1



def test_markdown_names_the_machine_cpu_and_gpu(tmp_path):
    from triton_rerank.bench.report import RunContext

    results = _full_results()
    context = RunContext("host (Linux x86_64)", "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143)", 16,
                         "NVIDIA H200 x 1", "3.11.2", {"torch": "2.11.0", "triton": "3.6.0"}, "abc1234", "t0")
    results["context"] = dataclasses.asdict(context)
    jp, mp = gr.write_results(tmp_path, results)
    md = mp.read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    for text in ("CPU Intel(R) Xeon(R) Platinum 8480+", "16 cores", "GPU NVIDIA H200 x 1", "torch 2.11.0",
                 "commit abc1234"):
        assert text in md
    assert json.loads(jp.read_text())["context"]["cpu"] == context.cpu
    results["context"] = {"cpu": "half a record"}  # an old or damaged record: rendered without it
    assert "half a record" not in gr.render_markdown(results)
