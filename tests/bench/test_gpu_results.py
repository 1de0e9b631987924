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


def _decoder_results() -> dict:
    """A run whose decoder stage finished its 0.6B shape and was cut in the 4B one."""
    results = _full_results()
    results["stages"]["decoder"] = {"status": "timeout", "seconds": 240.0, "data": {
        "dtype": "bfloat16", "token_budget": 16384, "hf_batch_size": 32,
        "shapes": {
            "0.6B": {"status": "ok", "model": "Qwen3-Reranker-0.6B shape", "params_total": 595_776_512,
                     "workload": {"pairs": 2000, "queries": 20, "docs_per_query": 100, "tokens": 330_000,
                                  "mean_length": 165.0, "max_length": 380},
                     "flops_per_pass": 3.0e14, "hf_executed_over_useful": 1.8,
                     "load_path": {"hf_build_s": 2.0, "pack_direct_s": 0.3, "save_s": 4.0, "load_saved_s": 2.0,
                                   "saved_equals_direct": True},
                     "variants": {"hf_padded": {"pairs_per_s": 1000.0, "tflops": 150.0, "pad_fraction": 0.3},
                                  "packed_sdpa": {"pairs_per_s": 2000.0, "tflops": 300.0},
                                  "packed_triton": {"pairs_per_s": 2500.0, "tflops": 375.0},
                                  "packed_triton_shared": {"pairs_per_s": 4000.0, "tflops": 650.0}},
                     "agreement": {"n": 64, "hf_score_std": 0.5,
                                   "packed_triton_vs_hf": {"n": 64, "max_abs_diff": 0.03, "mean_abs_diff": 0.01},
                                   "float32_reference": {"n": 8, "score_std": 0.4},
                                   "packed_triton_vs_float32": {"n": 8, "max_abs_diff": 0.004,
                                                                "mean_abs_diff": 0.002}}},
            "4B": {"status": "running", "model": "Qwen3-Reranker-4B shape",
                   "variants": {"hf_padded": {"pairs_per_s": 300.0, "tflops": 200.0},
                                "packed_sdpa": {"error": "skipped: stage deadline near"}},
                   "agreement": {"n": 64, "float32_reference": {"n": 8, "skipped": "not enough free device memory"}}},
        },
    }}
    return results


def test_decoder_shapes_get_mfu_the_ratio_to_hf_and_a_table(tmp_path):
    jp, mp = gr.write_results(tmp_path, _decoder_results())
    shapes = json.loads(jp.read_text())["stages"]["decoder"]["data"]["shapes"]
    small = shapes["0.6B"]["variants"]
    assert small["packed_triton"]["mfu_vs_bf16_matmul"] == pytest.approx(375 / 600)
    assert small["packed_triton"]["vs_hf"] == pytest.approx(2.5) and small["hf_padded"]["vs_hf"] == 1.0
    assert "mfu_vs_bf16_matmul" not in shapes["4B"]["variants"]["packed_sdpa"]  # skipped: nothing derived
    # Heads run once: 650 "TFLOP/s" is an equivalent rate (above the 600 peak), so no MFU; the ratio to HF stands.
    assert "mfu_vs_bf16_matmul" not in small["packed_triton_shared"] and small["packed_triton_shared"]["vs_hf"] == 4.0
    md = mp.read_text()
    assert "## Decoder (Qwen3-Reranker" in md
    assert "| 0.6B | packed_triton | - | - | 2,500.0 |" in md and "| 4B | hf_padded |" in md
    assert "skipped: stage deadline near" in md  # the cut shape's skipped variant is shown as such
    assert "| 0.6B | packed_triton_vs_float32 | 8 | 0.004 |" in md
    assert "| 4B | float32 reference | - | - | - | skipped: not enough free device memory |" in md
    assert "same weights yes" in md or "same weights True" in md
    assert "| decoder | timeout |" in md


def test_decoder_section_tolerates_partial_and_missing_data():
    results = _decoder_results()
    results["stages"]["decoder"]["data"]["shapes"]["4B"] = {"status": "running"}
    del results["stages"]["env"]
    gr.compute_derived(results)
    md = gr.render_markdown(results)
    assert "**4B**" in md and "mfu_vs_bf16_matmul" not in json.dumps(results["stages"]["decoder"])
    results["stages"]["decoder"] = {"status": "error", "data": {"shapes": {}}}
    assert "## Decoder" not in gr.render_markdown(results)
