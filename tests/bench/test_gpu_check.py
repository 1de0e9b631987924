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
