"""CPU tests of the GPU check script: arguments, workload building, batching, FLOPs, results files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from triton_rerank.client import gpu_check as gc

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

TINY_XLMR = {
    "model_type": "xlm-roberta",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "id2label": {"0": "LABEL_0"},
}


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
        [sys.executable, "-m", "triton_rerank.client.gpu_check", "--help"], capture_output=True, text=True, timeout=60
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
# Workload building
# ------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["how long is the life cycle of a flea", "fleas live up to a year on a host",
              "the quick brown fox jumps over the lazy dog", "what is a cat", "cats sleep a lot"] * 5
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok, cls, sep


def _write_dl19(path: Path) -> list[dict]:
    records = [
        {
            "qid": "1",
            "query": "life cycle of a flea",
            "candidates": [
                {"docid": "a", "text": "fleas live up to a year", "bm25_rank": 1, "label": 2},
                {"docid": "b", "text": " ".join(["the quick brown fox jumps over the lazy dog"] * 20),
                 "bm25_rank": 2, "label": None},
                {"docid": "c", "text": "what is a cat", "bm25_rank": 3, "label": 0},
            ],
        },
        {
            "qid": "2",
            "query": "cats",
            "candidates": [
                {"docid": "d", "text": "cats sleep a lot", "bm25_rank": 1, "label": 1},
                {"docid": "e", "text": "a host", "bm25_rank": 2, "label": 0},
                {"docid": "f", "text": "the dog", "bm25_rank": 3, "label": 0},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # trailing blank line is fine
    return records


def test_tokenize_pairs_tiny_tokenizer(tmp_path):
    tok, cls, sep = _tiny_tokenizer()
    written = _write_dl19(tmp_path / "dl19.jsonl")
    records = gc.load_dl19(tmp_path / "dl19.jsonl")
    assert records == written
    wl = gc.tokenize_pairs(tok, records, max_length=24)

    assert len(wl) == 6
    assert wl.pair_ids == [("1", "a"), ("1", "b"), ("1", "c"), ("2", "d"), ("2", "e"), ("2", "f")]
    assert wl.lengths == [len(ids) for ids in wl.input_ids]
    assert wl.total_tokens == sum(wl.lengths)
    assert wl.truncated == 1  # only the long passage
    assert wl.lengths[1] == 24 and max(wl.lengths) == 24

    tok.no_truncation()
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    for i, (qid, docid) in enumerate(wl.pair_ids):
        rec = next(r for r in records if r["qid"] == qid)
        query = rec["query"]
        text = next(c["text"] for c in rec["candidates"] if c["docid"] == docid)
        q_ids, d_ids = enc(query), enc(text)
        ids = wl.input_ids[i]
        # query kept whole, passage cut ("only_second"), template [CLS] q [SEP] d [SEP]
        assert ids[: len(q_ids) + 2] == [cls, *q_ids, sep]
        assert ids[-1] == sep
        if i != 1:
            assert ids == [cls, *q_ids, sep, *d_ids, sep]
        else:
            assert ids[len(q_ids) + 2 : -1] == d_ids[: 24 - len(q_ids) - 3]
        assert wl.type_ids[i] == [0] * (len(q_ids) + 2) + [1] * (len(ids) - len(q_ids) - 2)

    sub = wl.subset([4, 1])
    assert sub.pair_ids == [("2", "e"), ("1", "b")] and sub.lengths == [wl.lengths[4], wl.lengths[1]]
    assert sub.truncated == 1 and sub.input_ids[1] == wl.input_ids[1]

    limited = gc.tokenize_pairs(tok, records, max_length=24, max_pairs=4)
    assert limited.pair_ids == wl.pair_ids[:4] and limited.lengths == wl.lengths[:4]

    # A query that alone exceeds max_length: that pair falls back to "longest_first", others unchanged.
    long_query = {"qid": "3", "query": " ".join(["the lazy dog"] * 20),
                  "candidates": [{"docid": "g", "text": "a cat"}]}
    mixed = gc.tokenize_pairs(tok, [records[1], long_query], max_length=24)
    assert mixed.lengths[:3] == wl.lengths[3:] and mixed.lengths[3] == 24
    assert mixed.input_ids[3][0] == cls and mixed.input_ids[3][-1] == sep


def test_tokenize_pairs_real_xlmr_tokenizer():
    path, tok_path = SHARED / gc.DL19_FILE, SHARED / gc.TOKENIZER_FILE
    if not (path.is_file() and tok_path.is_file()):
        pytest.skip("shared DL19 data / XLM-R tokenizer not present")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    records = gc.load_dl19(path)[:3]
    wl = gc.tokenize_pairs(tok, records, max_length=64)
    assert len(wl) == sum(len(r["candidates"]) for r in records) == 300
    for ids in wl.input_ids:
        assert ids[0] == 0 and ids[-1] == 2 and len(ids) <= 64  # <s> ... </s>
        assert [2, 2] == ids[ids.index(2) : ids.index(2) + 2]  # </s></s> between query and passage
    assert wl.truncated > 0 and max(wl.lengths) == 64


def test_synthetic_workload_and_spread():
    wl = gc.synthetic_workload(200, vocab_size=1000, seed=1, max_length=128)
    assert len(wl) == 200 and all(8 <= n <= 128 for n in wl.lengths)
    assert all(ids[0] == 0 and ids[-1] == 2 and len(ids) == n for ids, n in zip(wl.input_ids, wl.lengths, strict=True))
    assert all(4 <= t < 1000 for ids in wl.input_ids for t in ids[1:-1])
    assert gc.synthetic_lengths(50, seed=3) == gc.synthetic_lengths(50, seed=3)
    idx = gc.spread_indices(4300, 1024)
    assert len(idx) == len(set(idx)) == 1024 and idx[0] == 0 and idx[-1] < 4300 and idx == sorted(idx)
    assert gc.spread_indices(5, 10) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_budget_batches(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(500)] + [700, 1000]  # two pairs over the budget
    budget = 512
    batches = gc.token_budget_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every pair exactly once
    for b in batches:
        assert b
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
    assert [lengths[i] for i in flat] == sorted(lengths)  # length-sorted
    # greedy: a batch closes only when the next pair would not fit
    for b, nxt in zip(batches, batches[1:], strict=False):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > budget
    assert any(len(b) == 1 and lengths[b[0]] > budget for b in batches)


def test_token_budget_batches_unsorted_and_errors():
    lengths = [5, 1, 4, 4, 2]
    assert gc.token_budget_batches(lengths, 6, sort=False) == [[0, 1], [2], [3, 4]]
    assert gc.token_budget_batches(lengths, 6) == [[1, 4], [2], [3], [0]]
    assert gc.token_budget_batches([], 10) == []
    with pytest.raises(ValueError):
        gc.token_budget_batches(lengths, 0)


def test_fixed_size_batches_and_padding():
    lengths = [3, 10, 2, 7, 5]
    assert gc.fixed_size_batches(lengths, 2) == [[0, 1], [2, 3], [4]]
    assert gc.fixed_size_batches(lengths, 2, sort=True) == [[2, 0], [4, 3], [1]]
    assert gc.padded_token_count(lengths, [[0, 1], [2, 3], [4]]) == 2 * 10 + 2 * 7 + 5
    assert gc.padded_token_count(lengths, [[2, 0], [4, 3], [1]]) == 2 * 3 + 2 * 7 + 10
    assert gc.padded_token_count(lengths, [[i] for i in range(5)]) == sum(lengths)
    with pytest.raises(ValueError):
        gc.fixed_size_batches(lengths, 0)


def test_attention_cases():
    lengths = gc.synthetic_lengths(4300, seed=0)
    cases = gc.attention_cases(lengths, "cuda", quick=False)
    assert [name for name, _ in cases] == ["dl19_pack128", "dl19_pack256", "uniform512_x32"]
    assert len(cases[0][1]) == 128 and len(cases[1][1]) == 256 and cases[2][1] == [512] * 32
    assert all(n in lengths for n in cases[0][1])
    assert cases == gc.attention_cases(lengths, "cuda", quick=False)  # deterministic
    quick = gc.attention_cases(lengths, "cuda", quick=True, source="synthetic")
    assert [name for name, _ in quick] == ["synthetic_pack128"]
    (name, small), = gc.attention_cases(lengths, "cpu", quick=True)
    assert name == "dl19_pack8" and len(small) == 8 and max(small) <= 96


def test_cu_seqlens_and_length_groups():
    assert gc.cu_seqlens_of([3, 1, 4]) == [0, 3, 4, 8]
    assert gc.length_groups([5, 3, 5, 64, 65]) == {3: [1], 5: [0, 2], 64: [3], 65: [4]}
    assert gc.length_groups([5, 3, 5, 64, 65], 64) == {64: [0, 1, 2, 3], 128: [4]}


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------


def test_param_counts_bge_reranker_v2_m3():
    counts = gc.encoder_param_counts(gc.BGE_RERANKER_V2_M3_CONFIG)
    # XLMRobertaForSequenceClassification of this config: 567,755,777 parameters ("568M").
    assert counts["total"] == 567_755_777
    assert counts["non_embedding"] == 24 * 12_596_224
    assert counts["embedding"] == 250_002 * 1024 + 8194 * 1024 + 1024 + 2 * 1024


@pytest.mark.parametrize("model_type", ["xlm-roberta", "bert"])
def test_param_counts_match_transformers(model_type):
    transformers = pytest.importorskip("transformers")
    cfg = dict(TINY_XLMR, model_type=model_type, type_vocab_size=2 if model_type == "bert" else 1)
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == gc.encoder_param_counts(cfg)["total"]


def test_encoder_and_attention_flops():
    cfg = dict(TINY_XLMR)
    counts = gc.encoder_param_counts(cfg)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    expected = 2 * counts["non_embedding"] * 8 + layers * 4 * (3 * 3 + 5 * 5) * h + 2 * counts["head"] * 2
    assert gc.encoder_flops([3, 5], cfg) == pytest.approx(expected, rel=1e-12)
    # additive over pairs, and more than linear in length (attention)
    assert gc.encoder_flops([3, 5], cfg) == pytest.approx(gc.encoder_flops([3], cfg) + gc.encoder_flops([5], cfg))
    assert gc.encoder_flops([8], cfg) > gc.encoder_flops([4, 4], cfg)
    assert gc.attention_flops([100], 16, 64) == 4 * 100 * 100 * 16 * 64
    assert gc.attention_flops([3, 4], 2, 8) == 4 * (9 + 16) * 2 * 8
    # bge-reranker-v2-m3, one 100-token pair: ~2 * 302M * 100 = 60 GFLOP plus attention
    f = gc.encoder_flops([100], gc.BGE_RERANKER_V2_M3_CONFIG)
    assert 6.0e10 < f < 6.2e10


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


def test_parse_pytest_summary():
    assert gc.parse_pytest_summary("..F\nFAILED x\n3 passed, 1 failed, 2 skipped in 1.23s\n") == {
        "passed": 3, "failed": 1, "skipped": 2,
    }
    assert gc.parse_pytest_summary("===== 5 passed, 1 warning in 2.00s =====") == {"passed": 5, "warnings": 1}
    assert gc.parse_pytest_summary("1 failed, 1 error in 0.5s") == {"failed": 1, "errors": 1}
    assert gc.parse_pytest_summary("no tests ran in 0.01s") == {}
    assert gc.parse_pytest_summary("") == {}


def test_parse_pytest_progress():
    lines = ["..s..F" + "." * 66 + " [ 27%]", "collected 3 items", "..E.x", "FAILED tests/x.py::t - boom"]
    assert gc.parse_pytest_progress(lines) == {"passed": 73, "skipped": 1, "failed": 1, "errors": 1, "xfailed": 1}
    assert gc.parse_pytest_progress(["ss [100%]"]) == {"skipped": 2}
    assert gc.parse_pytest_progress(["3 passed in 1s"]) == {}


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
    jp, mp = gc.write_results(tmp_path / "out", results)
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
    jp, mp = gc.write_results(tmp_path, results)
    assert json.loads(jp.read_text())["targets"] == []
    assert "| env | running |" in mp.read_text()
    # env without the bf16 rate: no MFU, no MFU target, but the throughput target still computed
    results = _full_results()
    del results["stages"]["env"]["data"]["matmul_tflops"]
    gc.write_results(tmp_path, results)
    data = json.loads(jp.read_text())
    assert "mfu_vs_bf16_matmul" not in data["stages"]["encoder"]["data"]["variants"]["packed_triton"]
    assert [t["name"].split(":")[0] for t in data["targets"]].count("encoder") == 1


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


def test_package_shim_when_not_installed(tmp_path):
    """Run from a bare checkout (package not installed), triton_rerank.* is reached through a shim."""
    if sys.version_info < (3, 11):
        pytest.skip("python -P needs 3.11")
    script = f"""
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
for name in [m for m in sys.modules if m.startswith("triton_rerank")]:
    del sys.modules[name]
try:
    import triton_rerank.client
    print("INSTALLED")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("gpu_check_file", {str(Path(gc.__file__).resolve())!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
shim = mod.ensure_package_importable()
import triton_rerank.client.gpu_check as again
import os
print("SHIM", shim is not None, os.environ["PYTHONPATH"].split(os.pathsep)[0] == shim, again.REPO_ROOT == mod.REPO_ROOT)
"""
    r = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    if "INSTALLED" in r.stdout:
        pytest.skip("triton_rerank is importable without the editable finder here")
    assert "SHIM True True True" in r.stdout


def test_child_stage_failure_is_recorded(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    stage_out = tmp_path / "stage-env.json"
    args = gc.parse_args(["--out", str(tmp_path), "--stage", "env", "--stage-out", str(stage_out)])
    assert gc.main(["--out", str(tmp_path), "--stage", "env", "--stage-out", str(stage_out)]) == 0
    assert args.device == "cuda"
    data = json.loads(stage_out.read_text())
    assert data["status"] == "error"
    assert "torch.cuda.is_available() is False" in data["fatal"]
    assert data["torch"] == torch.__version__  # what was gathered before the failure is kept
