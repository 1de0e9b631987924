"""CPU tests of the GPU check script: arguments, kernel-test output parsing, orchestration, the shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_rerank.bench.gpu import check as gc
from triton_rerank.bench.gpu import stage_tests as gpu_stage_tests

# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def test_defaults():
    args = gc.parse_args(["--out", "o"])
    assert args.out == "o"
    assert args.data_dir is None
    assert args.dtype == "float16"
    assert args.device == "cuda"
    assert args.quick is False and args.skip_tests is False
    assert args.max_minutes == 7.5
    assert args.token_budget == 16384 and args.hf_batch_size == 32 and args.max_length == 512
    assert args.stage is None


def test_flags_and_cpu_forces_float32():
    args = gc.parse_args(
        ["--out", "o", "--data-dir", "d", "--quick", "--skip-tests", "--max-minutes", "3", "--device", "cpu"]
    )
    assert (args.data_dir, args.quick, args.skip_tests, args.max_minutes) == ("d", True, True, 3.0)
    assert args.dtype == "float32"  # fp16 matmuls on CPU are not what the smoke run is for
    assert gc.parse_args(["--out", "o", "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert gc.parse_args(["--out", "o", "--only", "env, encoder"]).only == ["env", "encoder"]


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--data-dir", "--dtype", "--quick", "--skip-tests", "--max-minutes", "--device"):
        assert flag in out
    assert "--stage-out" not in out  # internal flags stay hidden


def test_help_as_module():
    r = subprocess.run(
        [sys.executable, "-m", "triton_rerank.bench.gpu.check", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "gpu_results.json" in r.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --out is required
        ["--out", "o", "--dtype", "int8"],
        ["--out", "o", "--device", "tpu"],
        ["--out", "o", "--max-minutes", "abc"],
        ["--out", "o", "--max-minutes", "0"],
        ["--out", "o", "--token-budget", "0"],
        ["--out", "o", "--pairs", "0"],
        ["--out", "o", "--no-such-flag"],
        ["--out", "o", "--only", "env,bogus"],
        ["--out", "o", "--only", ","],
    ],
)
def test_bad_args_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv)
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------
# Kernel tests stage: pytest output
# ------------------------------------------------------------------------------------------


def test_parse_pytest_summary():
    assert gpu_stage_tests.parse_pytest_summary("..F\nFAILED x\n3 passed, 1 failed, 2 skipped in 1.23s\n") == {
        "passed": 3, "failed": 1, "skipped": 2,
    }
    assert gpu_stage_tests.parse_pytest_summary("===== 5 passed, 1 warning in 2.00s =====") == {"passed": 5, "warnings": 1}
    assert gpu_stage_tests.parse_pytest_summary("1 failed, 1 error in 0.5s") == {"failed": 1, "errors": 1}
    assert gpu_stage_tests.parse_pytest_summary("no tests ran in 0.01s") == {}
    assert gpu_stage_tests.parse_pytest_summary("") == {}


def test_parse_pytest_progress():
    lines = ["..s..F" + "." * 66 + " [ 27%]", "collected 3 items", "..E.x", "FAILED tests/x.py::t - boom"]
    assert gpu_stage_tests.parse_pytest_progress(lines) == {"passed": 73, "skipped": 1, "failed": 1, "errors": 1, "xfailed": 1}
    assert gpu_stage_tests.parse_pytest_progress(["ss [100%]"]) == {"skipped": 2}
    assert gpu_stage_tests.parse_pytest_progress(["3 passed in 1s"]) == {}



# ------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------


def test_orchestrator_skips_stages_when_budget_is_spent(tmp_path):
    out = tmp_path / "o"
    rc = gc.main(["--out", str(out), "--max-minutes", "0.01", "--skip-tests", "--data-dir", str(tmp_path)])
    data = json.loads((out / gc.RESULTS_JSON).read_text())
    st = data["stages"]
    assert st["tests"] == {"status": "skipped", "reason": "--skip-tests"}
    for name in ("env", "attention", "encoder"):
        assert st[name]["status"] == "skipped" and "time budget" in st[name]["reason"]
    assert rc == 0
    assert (out / gc.RESULTS_MD).read_text().startswith("# GPU check")


def test_only_runs_selected_stages(tmp_path):
    out = tmp_path / "o"
    gc.main(["--out", str(out), "--max-minutes", "0.01", "--only", "attention", "--data-dir", str(tmp_path)])
    st = json.loads((out / gc.RESULTS_JSON).read_text())["stages"]
    assert [st[n]["reason"] for n in ("env", "tests", "encoder")] == ["not in --only"] * 3
    assert st["attention"]["status"] == "skipped" and "time budget" in st["attention"]["reason"]


def test_runs_as_a_file_from_a_bare_checkout(tmp_path):
    """On a machine where the project is not installed, `python3 -P bench/gpu/check.py` still runs.

    -S leaves out site-packages (so neither an installed nor an editable triton_rerank is there);
    the file reaches the package through its one-link shim and runs as its module.
    """
    if sys.version_info < (3, 11):
        pytest.skip("python -P needs 3.11")
    r = subprocess.run([sys.executable, "-S", "-P", str(Path(gc.__file__).resolve()), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "usage: python -m triton_rerank.bench.gpu.check" in r.stdout
    probe = subprocess.run([sys.executable, "-S", "-P", "-c", "import triton_rerank"], capture_output=True,
                           cwd=str(tmp_path))
    assert probe.returncode != 0  # the package really was out of reach without the shim


def test_child_stage_failure_is_recorded(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    # The stage drops TRITON_INTERPRET (it targets a GPU); the kernel tests later in this process need it back.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    stage_out = tmp_path / "stage-env.json"
    args = gc.parse_args(["--out", str(tmp_path), "--stage", "env", "--stage-out", str(stage_out)])
    assert gc.main(["--out", str(tmp_path), "--stage", "env", "--stage-out", str(stage_out)]) == 0
    assert args.device == "cuda"
    data = json.loads(stage_out.read_text())
    assert data["status"] == "error"
    assert "torch.cuda.is_available() is False" in data["fatal"]
    assert data["torch"] == torch.__version__  # what was gathered before the failure is kept


# ------------------------------------------------------------------------------------------
# Decoder stage: stage list, FLOP and parameter counts, inputs, the model copy, the smoke run
# ------------------------------------------------------------------------------------------

QWEN3_0_6B = {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "vocab_size": 151669,
              "tie_word_embeddings": True}
QWEN3_4B = {**QWEN3_0_6B, "hidden_size": 2560, "num_attention_heads": 32, "intermediate_size": 9728,
            "num_hidden_layers": 36}


def test_decoder_stage_runs_after_the_encoder_and_before_serving():
    assert gc.STAGES.index("encoder") < gc.STAGES.index("decoder") < gc.STAGES.index("served")
    assert "decoder" in gc.CHILD_STAGES
    assert gc.parse_args(["--out", "o", "--only", "decoder"]).only == ["decoder"]
    assert set(gc.STAGE_MIN_SECONDS) == set(gc.STAGE_CAP_SECONDS) == set(gc.STAGES)


def test_decoder_param_counts_match_the_model_cards_and_transformers():
    pytest.importorskip("torch")
    from triton_rerank.bench.gpu import stage_decoder as sd
    from triton_rerank.bench.random_model import random_decoder, tiny_decoder_config

    # Qwen3-0.6B: 0.44B non-embedding of 0.6B; Qwen3-4B: 3.6B of 4.0B (tied embeddings).
    small, large = sd.decoder_param_counts(QWEN3_0_6B), sd.decoder_param_counts(QWEN3_4B)
    assert small["non_embedding"] == 28 * 15_730_944 + 1024 and small["lm_head"] == 0
    assert round(small["non_embedding"] / 1e9, 2) == 0.44 and round(small["total"] / 1e9, 1) == 0.6
    assert round(large["non_embedding"] / 1e9, 1) == 3.6 and round(large["total"] / 1e9, 1) == 4.0
    for tied in (False, True):
        cfg = tiny_decoder_config(tie_word_embeddings=tied)
        hf = random_decoder(cfg)
        assert sd.decoder_param_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def test_decoder_flops_by_hand():
    from triton_rerank.bench.gpu import stage_decoder as sd

    # hidden 4, 2 heads and 1 kv head of dim 2, MLP 8, 2 layers, vocab 10.
    cfg = {"hidden_size": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
           "intermediate_size": 8, "num_hidden_layers": 2, "vocab_size": 10}
    q, kv, o, mlp = 2 * 4 * 4, 2 * 4 * 4, 2 * 4 * 4, 2 * 3 * 4 * 8  # per token: 32, 32, 32, 192
    layer = q + kv + o + mlp  # 288
    L = 3
    causal = 2 * 2 * 2 * L * (L + 1)  # QK^T and PV over L(L+1)/2 pairs: 96
    first = L * layer + causal
    last = L * kv + q + 4 * 2 * 2 * L + o + mlp  # keys and values of all, the rest at the last token
    assert sd.decoder_flops([L], cfg) == first + last + 2 * 4 * 2
    assert sd.decoder_flops([L], cfg, head_rows=10, every_position=True) == 2 * (L * layer + causal) + L * 2 * 4 * 10
    # A one-token prompt needs all of its work; sequences add up.
    assert sd.decoder_flops([1], cfg) == sd.decoder_flops([1], cfg, every_position=True)
    assert sd.decoder_flops([3, 5], cfg) == sd.decoder_flops([3], cfg) + sd.decoder_flops([5], cfg)
    assert sd.decoder_flops([], cfg) == 0.0


def test_decoder_flops_match_what_transformers_executes():
    """Every position, full-vocabulary head: the matmuls torch counts in HF's eager forward, less
    its attention (eager computes all L^2 scores; the count takes the causal half)."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from triton_rerank.bench.gpu import stage_decoder as sd
    from triton_rerank.bench.random_model import random_decoder, tiny_decoder_config

    cfg = tiny_decoder_config(layers=2)
    hf = random_decoder(cfg, attn_implementation="eager")
    L, heads, head_dim = 7, cfg["num_attention_heads"], cfg["head_dim"]
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        hf(input_ids=torch.arange(1, L + 1)[None])
    counted = counter.get_total_flops()
    full_attention = 2 * 4 * heads * head_dim * L * L
    causal = 2 * 2 * heads * head_dim * L * (L + 1)
    assert sd.decoder_flops([L], cfg, head_rows=cfg["vocab_size"], every_position=True) == counted - full_attention + causal


def test_prompts_pack_and_left_pad():
    torch = pytest.importorskip("torch")
    import numpy as np

    from triton_rerank.bench.gpu import stage_decoder as sd

    prompts = sd.Prompts.of([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])], "cpu")
    ids, cu, max_len = prompts.packed([2, 0])
    assert ids.tolist() == [9, 10, 5, 6, 7] and cu.tolist() == [0, 2, 5] and max_len == 3 and cu.device.type == "cpu"
    inputs = prompts.left_padded([0, 1, 2], pad_id=0)
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert inputs["input_ids"].dtype == torch.long


def test_packed_copy_of_a_live_model_equals_the_loaded_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from triton_rerank.bench.gpu import stage_decoder as sd
    from triton_rerank.bench.random_model import random_decoder, save_model_dir, tiny_decoder_config
    from triton_rerank.models.qwen3_reranker import QWEN3_LABEL_TOKEN_IDS, load_qwen3_reranker

    for tied in (False, True):
        hf = random_decoder(tiny_decoder_config(tie_word_embeddings=tied), dtype=torch.bfloat16).requires_grad_(False)
        direct = sd.packed_from_hf(hf, QWEN3_LABEL_TOKEN_IDS, torch.bfloat16, "cpu")
        loaded = load_qwen3_reranker(save_model_dir(tmp_path / str(tied), hf), dtype=torch.bfloat16,
                                     attention_backend="sdpa", label_token_ids=QWEN3_LABEL_TOKEN_IDS)
        assert sd._same_weights(direct, loaded)
        assert direct.head.weight.dtype == torch.float32 and not any(p.requires_grad for p in direct.parameters())
        ids, cu = torch.randint(0, 151669, (12,)), torch.tensor([0, 5, 12], dtype=torch.int32)
        with torch.inference_mode():
            assert torch.equal(direct(ids, cu, 7), loaded(ids, cu, 7))


def _qwen3_data_or_skip():
    from triton_rerank.bench.random_model import QWEN3_TOKENIZER_FILE
    from triton_rerank.bench.workload import DL19_FILE, resolve_data_dir

    data = resolve_data_dir(None)
    if data is None or not all((data / f).is_file() for f in (QWEN3_TOKENIZER_FILE, DL19_FILE)):
        pytest.skip("needs the shared data folder's Qwen3 tokenizer and DL19 file")
    return data


def test_decoder_stage_smoke_on_cpu(tmp_path):
    """`--device cpu --quick --only decoder`: the tiny decoder through every path of the stage."""
    _qwen3_data_or_skip()
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "triton_rerank.bench.gpu.check", "--device", "cpu", "--quick", "--only", "decoder",
         "--out", str(out), "--max-minutes", "4"],
        capture_output=True, text=True, timeout=300, cwd=str(Path(gc.__file__).resolve().parents[2]))
    data = json.loads((out / gc.RESULTS_JSON).read_text())
    stage = data["stages"]["decoder"]
    assert stage["status"] == "ok", run.stdout[-4000:] + run.stderr[-3000:]
    tiny = stage["data"]["shapes"]["tiny"]
    assert tiny["status"] == "ok" and tiny["dtype"] == "float32"
    assert tiny["workload"]["pairs"] == 4 and tiny["workload"]["tokens"] > 4 * 16
    variants = tiny["variants"]
    assert list(variants) == ["hf_padded", "packed_sdpa", "packed_triton", "packed_sdpa_shared",
                              "packed_triton_shared"]
    # Two requests of two prompts: each head once, the gain its token counts predict, scores unchanged.
    shared = tiny["shared_heads"]
    assert shared["head_tokens_mean"] >= 16 and shared["tokens_shared"] < shared["tokens_whole"]
    assert shared["predicted_gain"] == pytest.approx(shared["tokens_whole"] / shared["tokens_shared"])
    assert shared["vs_plain"]["finite"] and shared["vs_plain"]["max_abs_diff"] < 1e-5
    for name, v in variants.items():
        assert v["pairs_per_s"] > 0 and v["tflops"] > 0, name
    assert variants["packed_sdpa"]["batches"] >= 2 and variants["hf_padded"]["pad_fraction"] > 0  # micro-batches, padding
    assert tiny["hf_executed_over_useful"] > 1
    assert tiny["load_path"]["saved_equals_direct"] is True
    agree = tiny["agreement"]
    assert agree["hf_score_std"] > 0
    for key in ("packed_sdpa_vs_hf", "packed_triton_vs_hf", "packed_triton_vs_float32", "hf_vs_float32"):
        assert agree[key]["finite"] and agree[key]["max_abs_diff"] < 1e-4, key  # float32 all through
    markdown = (out / gc.RESULTS_MD).read_text()
    assert "## Decoder (Qwen3-Reranker" in markdown and "| tiny | packed_triton |" in markdown
    assert "| tiny | packed_triton_shared |" in markdown and "predicted gain" in markdown
    assert {data["stages"][n]["status"] for n in gc.STAGES if n != "decoder"} == {"skipped"}


def test_carry_packs_the_decoder_files(tmp_path):
    pytest.importorskip("tritonclient")
    import tarfile
    import zipfile

    from triton_rerank.bench.gpu import carry

    data = tmp_path / "data"
    for name in (*carry.DATA_FILES, *carry.DECODER_DATA_FILES):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(f"{name}\n")
    wheel = tmp_path / "nvidia_pytriton-0.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pytriton/__init__.py", "")
    folder = tmp_path / "carry"
    carry.prepare(folder, data, wheel, carried_wheels=[])
    with tarfile.open(folder / carry.DECODER_DATA_ARCHIVE) as archive:
        assert sorted(archive.getnames()) == sorted(carry.DECODER_DATA_FILES)
    done = carry.unpack(folder, tmp_path / "scratch", installed=lambda module: True)
    for name in (*carry.DATA_FILES, *carry.DECODER_DATA_FILES):
        assert (Path(done["data_dir"]) / name).read_text() == f"{name}\n"
    assert carry.missing_decoder_files(data) == []
    (data / carry.DECODER_DATA_FILES[0]).unlink()  # packed without it, and said so
    carry.prepare(folder, data, wheel, carried_wheels=[])
    with tarfile.open(folder / carry.DECODER_DATA_ARCHIVE) as archive:
        assert sorted(archive.getnames()) == sorted(carry.DECODER_DATA_FILES[1:])
    assert carry.missing_decoder_files(data) == [carry.DECODER_DATA_FILES[0]]
    carry.prepare(folder, data, folder / wheel.name, carried_wheels=[])  # re-packed in place with its own wheel
    assert [p.name for p in folder.glob(carry.WHEEL_GLOB)] == [wheel.name]


def test_decoder_shapes_share_the_stage_time_and_a_cut_keeps_the_finished_shape(tmp_path, monkeypatch):
    """Slots by SLOT_WEIGHTS; a shape with no time left is skipped, one that fails is recorded as
    such; either way the shape measured before stays in the stage's file."""
    pytest.importorskip("torch")
    import argparse
    import time

    from triton_rerank.bench.gpu import stage_decoder as sd
    from triton_rerank.bench.gpu.stage_recorder import StageRecorder

    monkeypatch.setattr(sd, "_missing_files", lambda data_dir, shapes: [])
    monkeypatch.setattr(sd, "resolve_data_dir", lambda data_dir: tmp_path)
    monkeypatch.setattr(sd, "load_dl19", lambda path: [])
    args = argparse.Namespace(device="cuda", data_dir=None, token_budget=16384, hf_batch_size=32)
    seen = []

    def first_uses_the_time(shape, args, data_dir, records, tmp, measure_file_path):
        seen.append((shape.name, measure_file_path, shape.time_left()))
        shape.entry["variants"] = {"hf_padded": {"pairs_per_s": 10.0}, "packed_triton": {"pairs_per_s": 30.0}}
        shape.rec.deadline = time.time() + 20  # what is left cannot hold the next shape

    monkeypatch.setattr(sd, "_run_shape", first_uses_the_time)
    rec = StageRecorder(tmp_path / "stage-decoder.json", time.time() + 100)
    sd.stage_decoder(args, rec)
    assert [name for name, _, _ in seen] == ["0.6B"] and seen[0][1] is True
    assert 35 < seen[0][2] <= 40  # 1 / (1 + 1.5) of the 100 s
    shapes = json.loads((tmp_path / "stage-decoder.json").read_text())["shapes"]
    assert shapes["0.6B"]["status"] == "ok" and shapes["0.6B"]["variants"]["packed_triton"]["pairs_per_s"] == 30.0
    assert shapes["4B"]["status"] == "skipped" and "deadline" in shapes["4B"]["reason"]

    def second_fails(shape, args, data_dir, records, tmp, measure_file_path):
        shape.entry["variants"] = {"hf_padded": {"pairs_per_s": 10.0}}
        if shape.name == "4B":
            shape.entry["variants"]["packed_sdpa"] = {"error": "skipped: stage deadline near"}
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sd, "_run_shape", second_fails)
    rec = StageRecorder(tmp_path / "stage-decoder.json", time.time() + 100)
    sd.stage_decoder(args, rec)
    shapes = json.loads((tmp_path / "stage-decoder.json").read_text())["shapes"]
    assert shapes["0.6B"]["status"] == "ok"
    assert shapes["4B"]["status"] == "error" and "illegal memory access" in shapes["4B"]["error"]
    assert rec.data["errors"][0]["where"] == "4B"


def test_float32_reference_without_a_float32_copy_of_the_model():
    """Layer by layer float32 gives what the whole model converted to float32 gives, and the layers'
    weights are bf16 again after each runs."""
    torch = pytest.importorskip("torch")
    from triton_rerank.bench.gpu import stage_decoder as sd
    from triton_rerank.bench.random_model import random_decoder, tiny_decoder_config

    cfg = tiny_decoder_config(tie_word_embeddings=True)
    inputs = {"input_ids": torch.randint(0, 151669, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    inputs["attention_mask"][1, :3] = 0  # left padding
    with torch.no_grad():
        whole = random_decoder(cfg, dtype=torch.bfloat16).float()(**inputs).logits
        streamed_model = random_decoder(cfg, dtype=torch.bfloat16)
        undo = sd.float32_streamed(streamed_model)
        streamed = streamed_model(**inputs).logits
        undo()
    assert streamed.dtype == torch.float32 and torch.equal(streamed, whole)
    assert {p.dtype for p in streamed_model.model.layers.parameters()} == {torch.bfloat16}
    assert not streamed_model.model.layers[0]._forward_pre_hooks
