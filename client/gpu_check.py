"""One-shot GPU check: environment, kernel tests, attention and encoder benchmarks.

Run it once on a lent GPU machine (minutes are scarce) and read ``OUT/gpu_results.md``::

    python3 -P client/gpu_check.py --out OUT --data-dir .gpu-data
    python -m triton_rerank.client.gpu_check --out OUT          # when the package is installed

Stages, in order, each timed and recorded, each allowed to fail without stopping the others:

1. ``env``       versions, card, SM count, memory; measured bf16/fp16 dense matmul TFLOP/s.
2. ``tests``     ``pytest tests/kernels -q -x`` in a subprocess (compiled kernels on CUDA).
3. ``attention`` ``varlen_attention`` vs torch (``varlen_attn`` and SDPA flash grouped by length,
                 both equal work; SDPA flash on padded buckets, padding FLOPs counted apart) on
                 packs of DL19 pair lengths; max abs error vs the reference.
4. ``encoder``   random-weight bge-reranker-v2-m3 on the 4,300 DL19 pairs: packed encoder with the
                 Triton and the SDPA attention backend vs Hugging Face padded batches of 32;
                 pairs/s, real tokens/s, model FLOP utilisation vs the measured bf16 matmul rate;
                 score agreement packed vs Hugging Face.

``env``, ``attention`` and ``encoder`` each run in a child process (a crashed CUDA context or a hung
compile costs one stage, not the run); the parent imports no torch, enforces ``--max-minutes`` by
killing a child at its stage deadline, and rewrites ``gpu_results.json`` / ``gpu_results.md``
after every stage and every few seconds while a stage runs, so a hard kill still leaves data.

``--device cpu --quick`` is a smoke mode: stages 3-4 on tiny shapes (a 2-layer model, a few
pairs, Triton kernels interpreted) to exercise the code paths without a GPU.

The pure helpers (workload building, batching, FLOP counting, summary parsing, rendering) import
nothing heavy and are unit-tested in ``tests/test_gpu_check.py``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `python client/gpu_check.py` puts client/ first on sys.path, where a sibling module could
# shadow a third-party one; the package is reached through triton_rerank.* instead.
if __name__ == "__main__" and sys.path and sys.path[0]:
    with contextlib.suppress(OSError):
        if os.path.samefile(sys.path[0], os.path.dirname(os.path.abspath(__file__))):
            sys.path.pop(0)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DL19_FILE = "msmarco-dl19-bm25top100.jsonl"
TOKENIZER_FILE = "tokenizers/xlm-roberta/tokenizer.json"
CONFIG_FILE = "configs/bge-reranker-v2-m3.json"
RESULTS_JSON = "gpu_results.json"
RESULTS_MD = "gpu_results.md"
STAGES = ("env", "tests", "attention", "encoder")
CHILD_STAGES = ("env", "attention", "encoder")

# config.json of BAAI/bge-reranker-v2-m3, used when the shared data folder is absent.
BGE_RERANKER_V2_M3_CONFIG: dict[str, Any] = {
    "architectures": ["XLMRobertaForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "classifier_dropout": None,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "id2label": {"0": "LABEL_0"},
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "label2id": {"LABEL_0": 0},
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 8194,
    "model_type": "xlm-roberta",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    "type_vocab_size": 1,
    "vocab_size": 250002,
}
# Smoke mode (--device cpu): same vocabulary and layout, tiny depth/width (head_dim stays 64).
TINY_CONFIG_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "intermediate_size": 256,
}

# Project targets checked in the results.
TARGET_ATTENTION_VS_TORCH = 0.8  # ours / best torch at equal work (speed ratio), fp16 DL19 pack
TARGET_PACKED_VS_HF = 1.5  # packed-triton pairs/s / HF padded-32 pairs/s
TARGET_MFU = 0.5  # packed-triton useful FLOP/s / measured bf16 dense matmul FLOP/s

# Seconds reserved for later stages when sizing an earlier one's time limit.
STAGE_MIN_SECONDS = {"env": 20, "tests": 30, "attention": 40, "encoder": 90}
STAGE_CAP_SECONDS = {"env": 90, "tests": 180, "attention": 120, "encoder": 330}


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_rerank.client.gpu_check",
        description=(
            "One-shot GPU check of triton-rerank: environment and matmul rate, kernel tests, "
            "varlen attention benchmark, packed encoder vs Hugging Face benchmark. Writes "
            "OUT/gpu_results.json and OUT/gpu_results.md after every stage."
        ),
        epilog=(
            "Smoke test without a GPU: --device cpu --quick --skip-tests (tiny model, interpreted "
            "Triton kernels). Targets: attention >= 0.8x best torch at equal work; packed-triton "
            ">= 1.5x HF padded pairs/s; MFU >= 50% of the measured bf16 matmul rate."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created); results and logs go here")
    p.add_argument(
        "--data-dir",
        default=None,
        help=(
            "shared data folder holding msmarco-dl19-bm25top100.jsonl, tokenizers/xlm-roberta/ and "
            f"configs/ (default: {DEFAULT_DATA_DIR}, then ./.gpu-data, ./shared/data); synthetic "
            "lengths and the built-in bge-reranker-v2-m3 config are used when files are missing"
        ),
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="dtype of the encoder benchmark (default float16; forced to float32 with --device cpu)",
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu smoke mode")
    p.add_argument(
        "--quick", action="store_true", help="smaller workload: a subset of pairs, one timed pass, fewer cases"
    )
    p.add_argument("--skip-tests", action="store_true", help="skip stage 2 (pytest tests/kernels)")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated stages to run, of {','.join(STAGES)} (default: all); e.g. a rerun of env,encoder",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=7.5,
        help="wall-clock budget for the whole run; later stages are skipped (and recorded) when it runs out",
    )
    p.add_argument(
        "--tests-timeout", type=float, default=180.0, help="cap in seconds for stage 2 (default 180)"
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=16384,
        help="tokens per packed encoder forward (length-sorted micro-batches; default 16384)",
    )
    p.add_argument("--hf-batch-size", type=int, default=32, help="Hugging Face padded batch size (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="pair truncation length (default 512)")
    p.add_argument("--pairs", type=int, default=None, help="limit the encoder workload to this many pairs")
    # Internal: one stage in a child process.
    p.add_argument("--stage", choices=CHILD_STAGES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_minutes <= 0:
        build_parser().error("--max-minutes must be positive")
    if args.token_budget < 1 or args.hf_batch_size < 1 or args.max_length < 4:
        build_parser().error("--token-budget, --hf-batch-size must be >= 1 and --max-length >= 4")
    if args.pairs is not None and args.pairs < 1:
        build_parser().error("--pairs must be >= 1")
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in STAGES]
        if bad or not only:
            build_parser().error(f"--only takes stages of {','.join(STAGES)}, got {args.only!r}")
        args.only = only
    if args.device == "cpu":
        args.dtype = "float32"
    return args


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """The data folder to use: the one given, else the first default that exists, else None."""
    if data_dir:
        path = Path(data_dir).expanduser()
        return path if path.is_dir() else None
    for cand in (DEFAULT_DATA_DIR, Path.cwd() / ".gpu-data", REPO_ROOT / ".gpu-data", REPO_ROOT / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Workload building (pure; needs only `tokenizers` objects passed in)
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Tokenized (query, passage) pairs, in file order."""

    input_ids: list[list[int]]
    type_ids: list[list[int]]
    lengths: list[int]
    pair_ids: list[tuple[str, str]]
    truncated_flags: list[bool] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def truncated(self) -> int:
        return int(sum(self.truncated_flags))

    def subset(self, indices: Sequence[int]) -> Workload:
        idx = list(indices)
        return Workload(
            input_ids=[self.input_ids[i] for i in idx],
            type_ids=[self.type_ids[i] for i in idx],
            lengths=[self.lengths[i] for i in idx],
            pair_ids=[self.pair_ids[i] for i in idx],
            truncated_flags=[self.truncated_flags[i] for i in idx] if self.truncated_flags else [],
            source=self.source,
        )


def load_dl19(path: str | Path) -> list[dict]:
    """Records of a DL19-format JSONL file: {"qid","query","candidates":[{"docid","text",...}]}."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def dl19_pairs(records: Sequence[dict], max_pairs: int | None = None) -> list[tuple[str, str, str, str]]:
    """(qid, docid, query, passage) for every candidate, in file order, at most max_pairs."""
    out = []
    for rec in records:
        for cand in rec["candidates"]:
            out.append((str(rec["qid"]), str(cand["docid"]), rec["query"], cand["text"]))
            if max_pairs is not None and len(out) >= max_pairs:
                return out
    return out


def tokenize_pairs(tokenizer, records: Sequence[dict], max_length: int = 512, max_pairs: int | None = None) -> Workload:
    """Tokenize DL19 records into pairs with the tokenizer's pair template.

    Truncation is "only_second" (the passage is cut, the query kept); a pair whose query alone
    does not fit falls back to "longest_first". The tokenizer's truncation/padding settings are
    changed (no padding, truncation to max_length).
    """
    pairs = dl19_pairs(records, max_pairs)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="only_second")
    texts = [(q, d) for _, _, q, d in pairs]
    try:
        encodings = tokenizer.encode_batch(texts)
    except Exception:  # a query longer than max_length: go pair by pair
        encodings = []
        for text in texts:
            try:
                encodings.append(tokenizer.encode(*text))
            except Exception:
                tokenizer.enable_truncation(max_length, strategy="longest_first")
                encodings.append(tokenizer.encode(*text))
                tokenizer.enable_truncation(max_length, strategy="only_second")
    input_ids = [list(e.ids) for e in encodings]
    type_ids = [list(e.type_ids) for e in encodings]
    truncated = [bool(e.overflowing) for e in encodings]
    return Workload(
        input_ids=input_ids,
        type_ids=type_ids,
        lengths=[len(ids) for ids in input_ids],
        pair_ids=[(qid, docid) for qid, docid, _, _ in pairs],
        truncated_flags=truncated,
        source="dl19",
    )


def synthetic_lengths(n: int, seed: int = 0, max_length: int = 512, mean: float = 100.0) -> list[int]:
    """DL19-like pair lengths (log-normal around `mean` tokens) when the data file is absent."""
    rng = random.Random(seed)
    mu = math.log(mean) - 0.5 * 0.35**2
    return [max(8, min(max_length, int(rng.lognormvariate(mu, 0.35)))) for _ in range(n)]


def synthetic_workload(n: int, vocab_size: int, seed: int = 0, max_length: int = 512) -> Workload:
    """Random token ids with DL19-like lengths; ids avoid 0..3 (special tokens) except <s>/</s>."""
    rng = random.Random(seed)
    lengths = synthetic_lengths(n, seed, max_length)
    ids = [[0] + [rng.randrange(4, vocab_size) for _ in range(n_tok - 2)] + [2] for n_tok in lengths]
    return Workload(
        input_ids=ids,
        type_ids=[[0] * len(x) for x in ids],
        lengths=lengths,
        pair_ids=[("synthetic", str(i)) for i in range(n)],
        source="synthetic",
    )


def spread_indices(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return [(i * n_total) // n for i in range(n)]


# --------------------------------------------------------------------------------------------
# Batching (pure)
# --------------------------------------------------------------------------------------------


def token_budget_batches(lengths: Sequence[int], budget: int, sort: bool = True) -> list[list[int]]:
    """Micro-batches of pair indices whose token sum stays within `budget`.

    With sort=True pairs are taken shortest first (ties by index), so each batch holds similar
    lengths. A pair longer than the budget gets a batch of its own. Every index appears once.
    """
    if budget < 1:
        raise ValueError("budget must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in order:
        n = int(lengths[i])
        if cur and cur_tokens + n > budget:
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        batches.append(cur)
    return batches


def fixed_size_batches(lengths: Sequence[int], batch_size: int, sort: bool = False) -> list[list[int]]:
    """Batches of `batch_size` pairs in workload order (or sorted by length), the padded-batch baseline."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_token_count(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens a padded forward processes: each batch is padded to its longest pair."""
    return int(sum(len(b) * max(lengths[i] for i in b) for b in batches if b))


def cu_seqlens_of(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def length_groups(lengths: Sequence[int], bucket: int = 1) -> dict[int, list[int]]:
    """Indices grouped by length rounded up to a multiple of `bucket` (1: identical lengths)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        key = int(math.ceil(n / bucket) * bucket)
        groups.setdefault(key, []).append(i)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------------------------
# FLOP counting (pure)
# --------------------------------------------------------------------------------------------


def encoder_param_counts(cfg: dict) -> dict[str, int]:
    """Parameter counts of a BERT/XLM-R sequence-classification model from its config.json."""
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    labels = int(cfg.get("num_labels") or len(cfg.get("id2label") or {0: 0}))
    per_layer = (
        4 * h * h + 4 * h  # q, k, v, attention output projections (+ biases)
        + 2 * h  # attention output LayerNorm
        + 2 * h * inter + inter + h  # FFN up/down (+ biases)
        + 2 * h  # output LayerNorm
    )
    embedding = (
        int(cfg["vocab_size"]) * h
        + int(cfg["max_position_embeddings"]) * h
        + int(cfg.get("type_vocab_size", 2)) * h
        + 2 * h  # embedding LayerNorm
    )
    head = h * h + h + h * labels + labels  # dense + out_proj (XLM-R) / pooler + classifier (BERT)
    non_embedding = layers * per_layer
    return {
        "per_layer": per_layer,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "head": head,
        "total": non_embedding + embedding + head,
    }


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int) -> float:
    """FLOPs of non-causal attention over packed sequences: QK^T and PV, 4 * sum(L^2) * H * D."""
    return 4.0 * float(sum(int(n) * int(n) for n in lengths)) * heads * head_dim


def encoder_flops(lengths: Sequence[int], cfg: dict) -> float:
    """Useful FLOPs of a cross-encoder forward over pairs of the given lengths (no padding).

    Per pair of L tokens: 2 * non-embedding params * L (every token through every layer's
    matmuls) + per layer 4 * L^2 * hidden (attention scores and weighted sum) + the
    classification head on one token (2 * head params).
    """
    counts = encoder_param_counts(cfg)
    h = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    tokens = float(sum(int(n) for n in lengths))
    sq = float(sum(int(n) * int(n) for n in lengths))
    return 2.0 * counts["non_embedding"] * tokens + layers * 4.0 * sq * h + 2.0 * counts["head"] * len(lengths)


# --------------------------------------------------------------------------------------------
# Results: summary parsing, targets, rendering, writing (pure)
# --------------------------------------------------------------------------------------------

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("3 passed, 1 failed, 2 skipped in 1.2s")."""
    counts: dict[str, int] = {}
    for line in reversed(text.strip().splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for num, word in found:
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(num)
            break
    return counts


_PYTEST_PROGRESS = re.compile(r"^([.sFExX]+)(\s+\[\s*\d+%\])?$")


def parse_pytest_progress(lines: Sequence[str]) -> dict[str, int]:
    """Outcome counts from pytest -q progress lines ("..s.F [ 27%]"), for a run cut short."""
    names = {".": "passed", "s": "skipped", "F": "failed", "E": "errors", "x": "xfailed", "X": "xpassed"}
    counts: dict[str, int] = {}
    for line in lines:
        m = _PYTEST_PROGRESS.match(line.strip())
        if m:
            for ch in m.group(1):
                counts[names[ch]] = counts.get(names[ch], 0) + 1
    return counts


def _get(d: Any, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def compute_derived(results: dict) -> None:
    """Fill MFU of encoder variants and the target checks from the stage data (in place)."""
    peak_bf16 = _get(results, "stages", "env", "data", "matmul_tflops", "bfloat16")
    peak_fp16 = _get(results, "stages", "env", "data", "matmul_tflops", "float16")
    variants = _get(results, "stages", "encoder", "data", "variants", default={}) or {}
    for v in variants.values():
        if not isinstance(v, dict) or not v.get("tflops"):
            continue
        if peak_bf16:
            v["mfu_vs_bf16_matmul"] = v["tflops"] / peak_bf16
        if peak_fp16:
            v["mfu_vs_fp16_matmul"] = v["tflops"] / peak_fp16

    targets = []
    cases = _get(results, "stages", "attention", "data", "cases", default=[]) or []
    for case in cases:
        if "_pack" in case.get("case", "") and case.get("speedup_vs_best_torch") is not None:
            targets.append(
                {
                    "name": f"attention {case['case']} {case['dtype']}: ours vs best torch (equal work)",
                    "value": case["speedup_vs_best_torch"],
                    "target": TARGET_ATTENTION_VS_TORCH,
                    "unit": "x",
                    "met": case["speedup_vs_best_torch"] >= TARGET_ATTENTION_VS_TORCH,
                }
            )
    tri = variants.get("packed_triton") or {}
    hf = variants.get("hf_padded") or {}
    if tri.get("pairs_per_s") and hf.get("pairs_per_s"):
        ratio = tri["pairs_per_s"] / hf["pairs_per_s"]
        targets.append(
            {
                "name": "encoder: packed-triton vs HF padded-batch pairs/s",
                "value": ratio,
                "target": TARGET_PACKED_VS_HF,
                "unit": "x",
                "met": ratio >= TARGET_PACKED_VS_HF,
            }
        )
    if tri.get("mfu_vs_bf16_matmul") is not None:
        targets.append(
            {
                "name": "encoder: packed-triton MFU (vs measured bf16 matmul)",
                "value": tri["mfu_vs_bf16_matmul"],
                "target": TARGET_MFU,
                "unit": "fraction",
                "met": tri["mfu_vs_bf16_matmul"] >= TARGET_MFU,
            }
        )
    results["targets"] = targets


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.1f}"
    return str(x).replace("|", "/").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    return lines


def render_markdown(results: dict) -> str:
    """Readable summary of the results dict (robust to missing or partial stages)."""
    env = _get(results, "stages", "env", "data", default={}) or {}
    card = env.get("device_name") or results.get("device", "?")
    lines = [f"# GPU check: {card}", ""]
    lines.append(
        f"Started {results.get('started', '?')}, last update {results.get('updated', '?')}, "
        f"elapsed {_fmt(results.get('elapsed_s'))} s of {_fmt(results.get('budget_s'))} s; "
        f"args `{' '.join(results.get('argv', []))}`."
    )
    files = results.get("data_files") or {}
    missing = [f for f, ok in files.items() if not ok]
    lines.append(
        f"Data: `{results.get('data_dir')}`"
        + (f" (missing: {', '.join(missing)}; synthetic lengths / built-in config used)" if missing else "")
        + "."
    )
    lines.append("")
    lines += _table(
        ["stage", "status", "seconds", "note"],
        [
            [name, st.get("status"), st.get("seconds"), st.get("reason") or st.get("error_summary") or ""]
            for name, st in (results.get("stages") or {}).items()
        ],
    )
    lines.append("")

    targets = results.get("targets") or []
    if targets:
        lines += ["## Targets", ""]
        lines += _table(
            ["check", "value", "target", "met"],
            [[t["name"], t["value"], f">= {t['target']}", t["met"]] for t in targets],
        )
        lines.append("")

    if env:
        lines += ["## Environment", ""]
        rows = [
            ["device", env.get("device_name")],
            ["compute capability", env.get("capability")],
            ["SMs", env.get("sm_count")],
            ["memory GiB", env.get("memory_gib")],
            ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
            ["triton", env.get("triton")],
            ["transformers", env.get("transformers")],
            ["python", env.get("python")],
        ]
        for dt, tf in (env.get("matmul_tflops") or {}).items():
            rows.append([f"{dt} matmul TFLOP/s (n={env.get('matmul_n')})", tf])
        if env.get("nvidia_smi"):
            rows.append(["nvidia-smi", env["nvidia_smi"]])
        lines += _table(["item", "value"], rows)
        lines.append("")

    tests = _get(results, "stages", "tests", default={}) or {}
    if tests.get("data"):
        td = tests["data"]
        lines += ["## Kernel tests", ""]
        lines.append(
            f"`{td.get('command', '')}` -> exit {td.get('returncode')}, counts {td.get('counts')}"
            + (f", progress before the cut {td['progress_counts']}" if td.get("progress_counts") else "")
        )
        lines += ["", "```", *(td.get("tail") or [])[-25:], "```", ""]

    att = _get(results, "stages", "attention", "data", default={}) or {}
    if att.get("cases"):
        lines += ["## Attention kernel", ""]
        lines.append(
            f"H={att.get('heads')}, D={att.get('head_dim')}, lengths from {att.get('length_source')}. "
            "TFLOP/s count useful work (4 * sum L^2 * H * D); padded methods also list executed work. "
            "speed = that method's time / ours (>1: ours faster)."
        )
        lines.append("")
        rows = []
        for case in att["cases"]:
            for name, m in (case.get("methods") or {}).items():
                rows.append(
                    [
                        case.get("case"),
                        case.get("dtype"),
                        case.get("n_seqs"),
                        case.get("total_tokens"),
                        name,
                        m.get("ms"),
                        m.get("tflops"),
                        m.get("executed_flops_ratio"),
                        m.get("speed_ours_vs_this"),
                        m.get("error"),
                    ]
                )
        lines += _table(
            ["case", "dtype", "seqs", "tokens", "method", "ms", "TFLOP/s", "exec/useful", "ours speed x", "error"],
            rows,
        )
        lines.append("")
        lines += _table(
            ["case", "dtype", "max abs err vs ref", "max abs err vs torch", "ours vs best torch"],
            [
                [
                    c.get("case"),
                    c.get("dtype"),
                    c.get("max_abs_err_vs_reference"),
                    c.get("max_abs_err_vs_torch_varlen"),
                    c.get("speedup_vs_best_torch"),
                ]
                for c in att["cases"]
            ],
        )
        lines.append("")

    enc = _get(results, "stages", "encoder", "data", default={}) or {}
    if enc:
        lines += ["## Encoder", ""]
        wl = enc.get("workload") or {}
        lines.append(
            f"Model {enc.get('model')} ({_fmt(enc.get('params_total'))} params, "
            f"{_fmt(enc.get('params_non_embedding'))} non-embedding), dtype {enc.get('dtype')}, random weights. "
            f"Workload {wl.get('pairs')} pairs / {_fmt(wl.get('tokens'))} tokens ({wl.get('source')}, "
            f"mean {_fmt(wl.get('mean_length'))}, max {wl.get('max_length')}, truncated {wl.get('truncated')}); "
            f"useful FLOPs per pass {_fmt(enc.get('flops_per_pass'))}."
        )
        lines.append("")
        rows = []
        for name, v in (enc.get("variants") or {}).items():
            rows.append(
                [
                    name,
                    v.get("batches"),
                    v.get("pass_s"),
                    v.get("pairs_per_s"),
                    v.get("tokens_per_s"),
                    v.get("tflops"),
                    v.get("mfu_vs_bf16_matmul"),
                    v.get("pad_fraction"),
                    v.get("error"),
                ]
            )
        lines += _table(
            ["variant", "batches", "s/pass", "pairs/s", "tokens/s", "TFLOP/s", "MFU", "pad frac", "error"], rows
        )
        lines.append("")
        agree = enc.get("agreement") or {}
        if agree:
            lines += _table(
                ["score agreement", "max abs diff", "mean abs diff"],
                [[k, v.get("max_abs_diff"), v.get("mean_abs_diff")] for k, v in agree.items() if isinstance(v, dict)],
            )
            lines.append(f"\nHF score std on the subset: {_fmt(agree.get('hf_score_std'))} (n={agree.get('n')}).")
            lines.append("")

    errors = []
    for name, st in (results.get("stages") or {}).items():
        for err in _get(st, "data", "errors", default=[]) or []:
            errors.append(f"- {name} / {err.get('where')}: {err.get('error')}")
        if st.get("error"):
            errors.append(f"- {name}: {st['error'].strip().splitlines()[-1] if st['error'].strip() else ''}")
    if errors:
        lines += ["## Errors", "", *errors, ""]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out_dir: str | Path, results: dict) -> tuple[Path, Path]:
    """Write OUT/gpu_results.json and OUT/gpu_results.md (atomically) from the results dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compute_derived(results)
    jp, mp = out / RESULTS_JSON, out / RESULTS_MD
    _atomic_write(jp, json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    try:
        md = render_markdown(results)
    except Exception:  # never lose the JSON because of a rendering bug
        md = "# GPU check\n\nRendering failed:\n\n```\n" + traceback.format_exc() + "```\n"
    _atomic_write(mp, md)
    return jp, mp


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _err_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Child-stage plumbing
# --------------------------------------------------------------------------------------------


class StageRecorder:
    """Accumulates one stage's data and rewrites its JSON file on every update."""

    def __init__(self, path: str | Path | None, deadline: float | None):
        self.path = Path(path) if path else None
        self.deadline = deadline
        self.data: dict[str, Any] = {"status": "running", "errors": []}
        self.flush()

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        self.data["errors"].append({"where": where, "error": _err_text(exc), "traceback": traceback.format_exc()[-3000:]})
        log(f"ERROR {where}: {_err_text(exc)}")
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


@contextlib.contextmanager
def guarded(rec: StageRecorder, where: str):
    """Record an exception under `where` and go on."""
    try:
        yield
    except Exception as exc:
        rec.error(where, exc)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 10, max_seconds: float = 10.0) -> float:
    """Mean milliseconds per call: CUDA events around `iters` back-to-back calls (perf_counter on CPU).

    Iterations are reduced when one call is slow so a measurement stays within ~max_seconds.
    """
    import torch

    t0 = time.perf_counter()
    fn()  # first call: compilation, autotuning, allocator warmup
    _sync(device)
    per_call = time.perf_counter() - t0
    t1, done = time.perf_counter(), 0
    for _ in range(max(0, warmup - 1)):
        fn()
        done += 1
        if time.perf_counter() - t1 > max_seconds / 4:
            break
    _sync(device)
    if done:
        per_call = (time.perf_counter() - t1) / done
    iters = max(1, min(iters, int(max_seconds / 2 / max(per_call, 1e-6))))
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t1 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t1) * 1e3 / iters


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _load_model_config(data_dir: Path | None, tiny: bool) -> tuple[dict, str]:
    cfg, source = dict(BGE_RERANKER_V2_M3_CONFIG), "built-in bge-reranker-v2-m3"
    if data_dir is not None and (data_dir / CONFIG_FILE).is_file():
        cfg, source = json.loads((data_dir / CONFIG_FILE).read_text()), str(data_dir / CONFIG_FILE)
    if tiny:
        cfg.update(TINY_CONFIG_OVERRIDES)
        source += " (tiny smoke overrides)"
    return cfg, source


def _load_workload(data_dir: Path | None, max_length: int, vocab_size: int, n_synthetic: int = 4300) -> Workload:
    """DL19 pairs tokenized with the XLM-R tokenizer, else synthetic ids with DL19-like lengths."""
    if data_dir is not None and (data_dir / DL19_FILE).is_file() and (data_dir / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(data_dir / TOKENIZER_FILE))
        wl = tokenize_pairs(tok, load_dl19(data_dir / DL19_FILE), max_length=max_length)
        if tok.get_vocab_size() > vocab_size:  # tiny models keep the real vocabulary; guard anyway
            wl.input_ids = [[t % vocab_size for t in ids] for ids in wl.input_ids]
        return wl
    return synthetic_workload(n_synthetic, vocab_size, max_length=max_length)


# --------------------------------------------------------------------------------------------
# Stage 1: environment
# --------------------------------------------------------------------------------------------


def stage_env(args: argparse.Namespace, rec: StageRecorder) -> None:
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:
            versions[mod] = f"unavailable ({_err_text(exc)})"
    for k, v in versions.items():
        rec.data[k] = v
    rec.set("triton_interpret", os.environ.get("TRITON_INTERPRET"))
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        rec.data["device_name"] = props.name
        rec.data["capability"] = f"{props.major}.{props.minor}"
        rec.data["sm_count"] = props.multi_processor_count
        rec.data["memory_gib"] = round(props.total_memory / 2**30, 1)
        rec.set("device_count", torch.cuda.device_count())
        with guarded(rec, "nvidia-smi"):
            q = "name,driver_version,clocks.max.sm,clocks.max.memory,power.limit,temperature.gpu"
            r = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15,
            )
            rec.set("nvidia_smi", (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "")
    else:
        rec.data["device_name"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        rec.set("memory_gib", None)
    log(f"env: {rec.data.get('device_name')} torch {versions['torch']} triton {versions.get('triton')}")

    n = 8192 if device == "cuda" else 512
    rec.set("matmul_n", n)
    rates: dict[str, float] = {}
    for name in ("bfloat16", "float16"):
        with guarded(rec, f"matmul {name}"):
            dt = _torch_dtype(name)
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            c = torch.empty(n, n, device=device, dtype=dt)
            ms = bench_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device, warmup=10, iters=50)
            rates[name] = 2.0 * n**3 / (ms * 1e-3) / 1e12
            rec.set("matmul_tflops", dict(rates))
            log(f"env: {name} {n}^3 matmul {ms:.3f} ms -> {rates[name]:.1f} TFLOP/s")
            del a, b, c
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Stage 3: attention kernel
# --------------------------------------------------------------------------------------------


def _sdpa_context(device: str, backend_name: str):
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend_name))


def _torch_varlen_fn():
    """torch's public varlen flash attention (torch >= 2.9), else the aten flash op, else None."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn

        def run(q, k, v, cu, max_len):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len)

        return run, "torch.nn.attention.varlen.varlen_attn"
    except Exception:
        pass
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        return None, None

    def run_aten(q, k, v, cu, max_len):
        return op(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)[0]

    return run_aten, "torch.ops.aten._flash_attention_forward"


def attention_cases(
    lengths: Sequence[int], device: str, quick: bool, seed: int = 0, source: str = "dl19"
) -> list[tuple[str, list[int]]]:
    """Named packs of sequence lengths for the attention benchmark (random draws from `lengths`).

    The first case is the main one (also run in bf16); "*_pack*" cases count toward the target.
    """
    rng = random.Random(seed)
    pool = list(lengths)
    if device != "cuda":
        return [(f"{source}_pack8", [min(n, 96) for n in rng.sample(pool, min(8, len(pool)))])]
    cases = [(f"{source}_pack128", rng.sample(pool, min(128, len(pool))))]
    if not quick:
        cases.append((f"{source}_pack256", rng.sample(pool, min(256, len(pool)))))
        cases.append(("uniform512_x32", [512] * 32))
    return cases


def _time_attention_method(rec: StageRecorder, case: dict, name: str, method, device: str, where: str) -> None:
    import torch

    fn, executed = method
    if rec.time_left() < 8:
        case["methods"][name] = {"error": "skipped: stage deadline near"}
        return
    useful = case["useful_flops"]
    entry: dict[str, Any] = {"executed_flops": executed, "executed_flops_ratio": executed / useful}
    case["methods"][name] = entry
    try:
        with torch.inference_mode():
            ms = bench_ms(fn, device, warmup=3, iters=20 if device == "cuda" else 2)
        entry["ms"] = ms
        entry["tflops"] = useful / (ms * 1e-3) / 1e12
        entry["tflops_executed"] = executed / (ms * 1e-3) / 1e12
    except Exception as exc:
        entry["error"] = _err_text(exc)
        rec.error(f"{where}/{name}", exc)
    rec.flush()


def stage_attention(args: argparse.Namespace, rec: StageRecorder) -> None:
    import torch
    import torch.nn.functional as F

    from triton_rerank.kernels.varlen_attention import varlen_attention, varlen_attention_reference

    device = args.device
    data_dir = resolve_data_dir(args.data_dir)
    heads, head_dim = (16, 64) if device == "cuda" else (2, 64)
    rec.data.update({"heads": heads, "head_dim": head_dim, "device": device})
    try:
        wl = _load_workload(data_dir, args.max_length, 250002)
        lengths, source = wl.lengths, wl.source
    except Exception as exc:
        rec.error("tokenize DL19", exc)
        lengths, source = synthetic_lengths(4300, max_length=args.max_length), "synthetic"
    rec.set("length_source", source)
    torch_varlen, torch_varlen_name = _torch_varlen_fn()
    rec.set("torch_varlen_impl", torch_varlen_name)
    dtypes = ["float16", "bfloat16"] if device == "cuda" else ["float32"]
    cases_out: list[dict] = []
    rec.set("cases", cases_out)
    gen = torch.Generator(device="cpu").manual_seed(0)

    for dtype_name in dtypes:
        dt = _torch_dtype(dtype_name)
        for case_no, (case_name, lens) in enumerate(attention_cases(lengths, device, args.quick, source=source)):
            if dtype_name == "bfloat16" and case_no > 0:
                continue  # bf16: the main pack is enough
            if rec.time_left() < 15:
                rec.error(f"{case_name}/{dtype_name}", TimeoutError("stage deadline near; case skipped"))
                continue
            where = f"{case_name}/{dtype_name}"
            try:
                total, max_len = int(sum(lens)), int(max(lens))
                useful = attention_flops(lens, heads, head_dim)
                case: dict[str, Any] = {
                    "case": case_name,
                    "dtype": dtype_name,
                    "n_seqs": len(lens),
                    "total_tokens": total,
                    "max_len": max_len,
                    "mean_len": total / len(lens),
                    "useful_flops": useful,
                    "methods": {},
                }
                cases_out.append(case)
                q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(device=device, dtype=dt) for _ in range(3))
                cu = torch.tensor(cu_seqlens_of(lens), dtype=torch.int32, device=device)
                cu_list = cu_seqlens_of(lens)

                def seq(t, i, cu_list=cu_list):
                    return t[cu_list[i] : cu_list[i + 1]]

                methods: dict[str, tuple[Callable[[], Any], float]] = {}
                methods["ours"] = (lambda q=q, k=k, v=v, cu=cu, m=max_len: varlen_attention(q, k, v, cu, m), useful)
                # As the encoder calls it: q, k, v are strided views of one fused [T, 3, H, D] projection.
                qkv = torch.stack((q, k, v), dim=1)
                fq, fk, fv = qkv.unbind(1)
                methods["ours_fused_qkv_views"] = (
                    lambda q=fq, k=fk, v=fv, cu=cu, m=max_len: varlen_attention(q, k, v, cu, m),
                    useful,
                )
                if torch_varlen is not None and device == "cuda":
                    methods["torch_varlen_flash"] = (
                        lambda q=q, k=k, v=v, cu=cu, m=max_len: torch_varlen(q, k, v, cu, m),
                        useful,
                    )
                # SDPA on groups of identical length: exactly the same work, one call per length.
                backend = "FLASH_ATTENTION" if device == "cuda" else "MATH"
                groups = length_groups(lens, 1)
                grouped = []
                for _L, idx in groups.items():
                    qs = [torch.stack([seq(t, i) for i in idx]).transpose(1, 2) for t in (q, k, v)]  # [n, H, L, D]
                    grouped.append(qs)

                def run_grouped(grouped=grouped, backend=backend):
                    with _sdpa_context(device, backend):
                        return [F.scaled_dot_product_attention(a, b, c) for a, b, c in grouped]

                methods["sdpa_flash_grouped_exact"] = (run_grouped, useful)
                # SDPA flash on buckets of 64: padded keys take part (timing only), padding FLOPs counted.
                buckets = length_groups(lens, 64)
                bucketed, bucket_flops = [], 0.0
                for Lb, idx in buckets.items():
                    parts = []
                    for t in (q, k, v):
                        x = torch.zeros(len(idx), Lb, heads, head_dim, device=device, dtype=dt)
                        for j, i in enumerate(idx):
                            x[j, : lens[i]] = seq(t, i)
                        parts.append(x.transpose(1, 2))
                    bucketed.append(parts)
                    bucket_flops += 4.0 * len(idx) * Lb * Lb * heads * head_dim

                def run_bucketed(bucketed=bucketed, backend=backend):
                    with _sdpa_context(device, backend):
                        return [F.scaled_dot_product_attention(a, b, c) for a, b, c in bucketed]

                methods["sdpa_flash_bucket64_padded"] = (run_bucketed, bucket_flops)
                # One batch padded to the longest sequence (what a padded model does), key-masked.
                padded = []
                for t in (q, k, v):
                    x = torch.zeros(len(lens), max_len, heads, head_dim, device=device, dtype=dt)
                    for i in range(len(lens)):
                        x[i, : lens[i]] = seq(t, i)
                    padded.append(x.transpose(1, 2))
                keep = torch.zeros(len(lens), 1, 1, max_len, dtype=torch.bool, device=device)
                for i, n in enumerate(lens):
                    keep[i, ..., :n] = True
                pad_flops = 4.0 * len(lens) * max_len * max_len * heads * head_dim
                eff = "EFFICIENT_ATTENTION" if device == "cuda" else "MATH"

                def run_padded_masked(padded=padded, keep=keep, eff=eff):
                    with _sdpa_context(device, eff):
                        return F.scaled_dot_product_attention(*padded, attn_mask=keep)

                methods["sdpa_efficient_padded_masked"] = (run_padded_masked, pad_flops)

                # torch baselines first: should our kernel take the CUDA context down, they are kept.
                for name in [n for n in methods if not n.startswith("ours")]:
                    _time_attention_method(rec, case, name, methods[name], device, where)

                # Correctness of ours on this pack.
                with guarded(rec, f"{where}/correctness"), torch.inference_mode():
                    out = varlen_attention(q, k, v, cu, max_len)
                    ref = varlen_attention_reference(q, k, v, cu, max_len)
                    case["max_abs_err_vs_reference"] = float((out.float() - ref.float()).abs().max())
                    case["ours_finite"] = bool(torch.isfinite(out).all())
                    if "torch_varlen_flash" in methods:
                        tv = methods["torch_varlen_flash"][0]()
                        case["max_abs_err_vs_torch_varlen"] = float((out.float() - tv.float()).abs().max())
                    g = run_grouped()
                    worst = 0.0
                    for (_L, idx), o in zip(groups.items(), g, strict=True):
                        for j, i in enumerate(idx):
                            worst = max(worst, float((seq(out, i).float() - o[j].transpose(0, 1).float()).abs().max()))
                    case["max_abs_err_vs_sdpa_grouped"] = worst
                    rec.flush()

                for name in [n for n in methods if n.startswith("ours")]:
                    _time_attention_method(rec, case, name, methods[name], device, where)

                ours_ms = case["methods"].get("ours", {}).get("ms")
                for m in case["methods"].values():
                    if ours_ms and m.get("ms"):
                        m["speed_ours_vs_this"] = m["ms"] / ours_ms
                equal = [case["methods"].get(n, {}).get("ms") for n in ("torch_varlen_flash", "sdpa_flash_grouped_exact")]
                equal = [x for x in equal if x]
                if ours_ms and equal:
                    case["best_torch_equal_work_ms"] = min(equal)
                    case["speedup_vs_best_torch"] = min(equal) / ours_ms
                bucket_ms = case["methods"].get("sdpa_flash_bucket64_padded", {}).get("ms")
                if ours_ms and bucket_ms:
                    case["speedup_vs_sdpa_bucket64"] = bucket_ms / ours_ms
                log(
                    f"attention {where}: ours {_fmt(ours_ms)} ms, best torch {_fmt(case.get('best_torch_equal_work_ms'))} ms, "
                    f"ratio {_fmt(case.get('speedup_vs_best_torch'))}, err {_fmt(case.get('max_abs_err_vs_reference'))}"
                )
                rec.flush()
                del q, k, v, qkv, fq, fk, fv, grouped, bucketed, padded, methods
                if device == "cuda":
                    torch.cuda.empty_cache()
            except Exception as exc:  # this case only; the next one still runs
                rec.error(where, exc)
                if device == "cuda":
                    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Stage 4: encoder
# --------------------------------------------------------------------------------------------


def build_random_hf_model(cfg: dict, model_dir: Path, device: str, dtype):
    """Random-weight HF sequence-classification model of `cfg`, initialised on `device`, saved to model_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        except TypeError:
            config._attn_implementation = "sdpa"
            model = AutoModelForSequenceClassification.from_config(config)
    model = model.to(device=device, dtype=dtype).eval()
    try:
        model.save_pretrained(str(model_dir), safe_serialization=True)
    except TypeError:  # an argument transformers may drop (safetensors is its default)
        model.save_pretrained(str(model_dir))
    return model


def _pack_batch(wl: Workload, idx: Sequence[int], device: str, with_types: bool):
    import torch

    ids = torch.tensor([t for i in idx for t in wl.input_ids[i]], dtype=torch.long)
    cu = torch.tensor(cu_seqlens_of([wl.lengths[i] for i in idx]), dtype=torch.int32)
    types = torch.tensor([t for i in idx for t in wl.type_ids[i]], dtype=torch.long) if with_types else None
    return (
        ids.to(device),
        cu.to(device),
        int(max(wl.lengths[i] for i in idx)),
        types.to(device) if types is not None else None,
    )


def _pad_batch(wl: Workload, idx: Sequence[int], device: str, pad_id: int, with_types: bool):
    import torch

    L = max(wl.lengths[i] for i in idx)
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    types = torch.zeros((len(idx), L), dtype=torch.long) if with_types else None
    for j, i in enumerate(idx):
        n = wl.lengths[i]
        ids[j, :n] = torch.tensor(wl.input_ids[i])
        mask[j, :n] = 1
        if types is not None:
            types[j, :n] = torch.tensor(wl.type_ids[i])
    return ids.to(device), mask.to(device), types.to(device) if types is not None else None


def stage_encoder(args: argparse.Namespace, rec: StageRecorder) -> None:
    import torch

    device = args.device
    dtype = _torch_dtype(args.dtype)
    tiny = device != "cuda"
    data_dir = resolve_data_dir(args.data_dir)
    cfg, cfg_source = _load_model_config(data_dir, tiny)
    counts = encoder_param_counts(cfg)
    rec.data.update(
        {
            "model": f"bge-reranker-v2-m3 shape ({cfg_source})",
            "config": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")},
            "dtype": args.dtype,
            "device": device,
            "params_non_embedding": counts["non_embedding"],
            "params_total_formula": counts["total"],
        }
    )
    rec.set("variants", {})
    variants: dict[str, dict] = rec.data["variants"]

    t0 = time.time()
    # Smoke mode: interpreted Triton kernels are slow, so short pairs and few of them.
    max_length = min(args.max_length, 128) if tiny else args.max_length
    wl = _load_workload(data_dir, max_length, int(cfg["vocab_size"]))
    n_pairs = args.pairs or (16 if tiny else (1024 if args.quick else len(wl)))
    if n_pairs < len(wl):
        wl = wl.subset(spread_indices(len(wl), n_pairs))
    with_types = int(cfg.get("type_vocab_size", 1)) > 1
    flops_pass = encoder_flops(wl.lengths, cfg)
    rec.data["workload"] = {
        "source": wl.source,
        "pairs": len(wl),
        "tokens": wl.total_tokens,
        "mean_length": wl.total_tokens / max(1, len(wl)),
        "max_length": max(wl.lengths),
        "truncated": wl.truncated,
        "tokenize_s": time.time() - t0,
    }
    rec.set("flops_per_pass", flops_pass)
    log(f"encoder: workload {len(wl)} pairs, {wl.total_tokens} tokens ({wl.source}), {flops_pass / 1e12:.1f} TFLOP/pass")

    tmp_root = Path(tempfile.mkdtemp(prefix="gpu_check_model_"))
    try:
        t0 = time.time()
        hf = build_random_hf_model(cfg, tmp_root / "model", device, dtype)
        rec.data["params_total"] = sum(p.numel() for p in hf.parameters())
        rec.data["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
        rec.set("build_model_s", time.time() - t0)
        log(f"encoder: random model built and saved in {time.time() - t0:.1f}s ({rec.data['params_total'] / 1e6:.0f}M params)")

        from triton_rerank.kernels.encoder import load_cross_encoder

        # One packed model; its attention backend ("triton" / "sdpa") is a settable attribute.
        packed_model = None
        with guarded(rec, "load packed model"):
            t0 = time.time()
            packed_model = load_cross_encoder(
                str(tmp_root / "model"), dtype=dtype, device=device, attention_backend="triton"
            )
            rec.set("load_packed_s", time.time() - t0)
        packed: dict[str, Any] = {} if packed_model is None else {"sdpa": packed_model, "triton": packed_model}

        pad_id = int(cfg.get("pad_token_id", 1) or 0)

        def packed_fn(model, backend):
            def fwd(batch):
                ids, cu, m, types = batch
                model.attention_backend = backend
                return model(ids, cu, m, token_type_ids=types)

            return fwd

        def hf_fwd(batch):
            ids, mask, types = batch
            kw = {"token_type_ids": types} if types is not None else {}
            return hf(input_ids=ids, attention_mask=mask, **kw).logits[:, 0]

        def check_agreement() -> None:
            """Scores of the packed model (both backends) vs HF on the first pairs (reported, not asserted)."""
            sub = list(range(min(64 if not tiny else 16, len(wl))))
            ref = hf_fwd(_pad_batch(wl, sub, device, pad_id, with_types)).float()
            agree: dict[str, Any] = {"n": len(sub), "hf_score_std": float(ref.std()) if len(sub) > 1 else None}
            for backend, model in packed.items():
                try:
                    got = packed_fn(model, backend)(_pack_batch(wl, sub, device, with_types)).float().reshape(-1)
                    d = (got - ref).abs()
                    agree[f"packed_{backend}_vs_hf"] = {
                        "max_abs_diff": float(d.max()),
                        "mean_abs_diff": float(d.mean()),
                        "max_abs_diff_over_hf_std": float(d.max() / ref.std()) if len(sub) > 1 else None,
                        "finite": bool(torch.isfinite(got).all()),
                    }
                except Exception as exc:
                    rec.error(f"agreement packed_{backend}", exc)
            rec.set("agreement", agree)
            log(f"encoder: agreement {json.dumps({k: v for k, v in agree.items() if isinstance(v, dict)})}")

        passes = 1 if (args.quick or tiny) else 3
        # Order: torch-only paths first, so a Triton kernel fault (which ends the CUDA context) cannot
        # cost the baselines; then the agreement check, then the Triton path.
        plans: list[tuple[str, Callable | None, list[list[int]], str]] = []
        budget_batches = token_budget_batches(wl.lengths, args.token_budget, sort=True)
        plans.append(("hf_padded", hf_fwd, fixed_size_batches(wl.lengths, args.hf_batch_size, sort=False), "padded"))
        if "sdpa" in packed:
            plans.append(("packed_sdpa", packed_fn(packed["sdpa"], "sdpa"), budget_batches, "packed"))
        plans.append(("agreement", None, [], "agreement"))
        if "triton" in packed:
            plans.append(("packed_triton", packed_fn(packed["triton"], "triton"), budget_batches, "packed"))
        plans.append(("hf_padded_sorted", hf_fwd, fixed_size_batches(wl.lengths, args.hf_batch_size, sort=True), "padded"))

        for name, fwd, batches, kind in plans:
            if kind == "agreement":
                with guarded(rec, "agreement"), torch.inference_mode():
                    check_agreement()
                continue
            if rec.time_left() < 20:
                variants[name] = {"error": "skipped: stage deadline near"}
                rec.flush()
                continue
            entry: dict[str, Any] = {"batches": len(batches)}
            variants[name] = entry
            try:
                if kind == "packed":
                    prepared = [_pack_batch(wl, b, device, with_types) for b in batches]
                    executed_tokens = wl.total_tokens
                    entry["token_budget"] = args.token_budget
                else:
                    prepared = [_pad_batch(wl, b, device, pad_id, with_types) for b in batches]
                    executed_tokens = padded_token_count(wl.lengths, batches)
                    entry["batch_size"] = args.hf_batch_size
                entry["executed_tokens"] = executed_tokens
                entry["pad_fraction"] = 1.0 - wl.total_tokens / executed_tokens
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    done = 0
                    for b in prepared:  # warmup pass: Triton compiles, cuBLAS heuristics, allocator
                        fwd(b)
                        done += 1
                        if rec.time_left() < 10:
                            break
                    _sync(device)
                    entry["warmup_s"] = time.perf_counter() - t0
                    if done < len(prepared):
                        raise TimeoutError(f"stage deadline reached in the warmup pass ({done}/{len(prepared)} batches)")
                    times: list[float] = []
                    for _ in range(passes):
                        if rec.time_left() < (times[-1] if times else entry["warmup_s"]) + 5:
                            entry["note"] = "fewer passes: stage deadline near"
                            break
                        t0 = time.perf_counter()
                        for b in prepared:
                            fwd(b)
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                if not times:  # fall back on the warmup pass (includes compile time)
                    times = [entry["warmup_s"]]
                    entry["note"] = "timed from the warmup pass only (includes compilation)"
                mean = sum(times) / len(times)
                entry.update(
                    {
                        "pass_times_s": times,
                        "pass_s": mean,
                        "pairs_per_s": len(wl) / mean,
                        "pairs_per_s_best_pass": len(wl) / min(times),
                        "tokens_per_s": wl.total_tokens / mean,
                        "tflops": flops_pass / mean / 1e12,
                    }
                )
                log(
                    f"encoder {name}: {mean:.3f} s/pass, {len(wl) / mean:.1f} pairs/s, "
                    f"{flops_pass / mean / 1e12:.1f} TFLOP/s, pad {entry['pad_fraction']:.2f}"
                )
            except Exception as exc:
                entry["error"] = _err_text(exc)
                rec.error(f"variant {name}", exc)
            finally:
                prepared = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            rec.flush()
        tri, base = variants.get("packed_triton", {}), variants.get("hf_padded", {})
        if tri.get("pairs_per_s") and base.get("pairs_per_s"):
            rec.set("packed_triton_vs_hf_padded", tri["pairs_per_s"] / base["pairs_per_s"])
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Orchestration (parent; imports no torch)
# --------------------------------------------------------------------------------------------


def ensure_package_importable() -> str | None:
    """Make `triton_rerank.*` importable when the project is not installed (returns a shim path).

    Builds a temp folder holding triton_rerank/{kernels,client,serving} as links to the repo's
    folders and puts it on sys.path and PYTHONPATH (so child processes and pytest see it too).
    """
    try:
        import triton_rerank.client  # noqa: F401

        return None
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="triton_rerank_shim_"))
    pkg = shim / "triton_rerank"
    pkg.mkdir()
    for name in ("kernels", "client", "serving"):
        if (REPO_ROOT / name).is_dir():
            (pkg / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    sys.path.insert(0, str(shim))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    import importlib

    importlib.invalidate_caches()
    return str(shim)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def run_streaming(
    cmd: list[str],
    timeout: float,
    prefix: str,
    env: dict | None = None,
    on_tick: Callable[[], None] | None = None,
    tail_lines: int = 80,
    echo: bool = True,
) -> tuple[int | None, list[str], bool]:
    """Run cmd in its own process group, echoing its output; kill it after `timeout` seconds.

    Returns (returncode or None when killed, last output lines, timed_out).
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(
        cmd,
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )

    def reader():
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if echo:
                print(f"{prefix}{line}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    end = time.time() + timeout
    timed_out = False
    last_tick = time.time()
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_tick is not None and time.time() - last_tick > 10:
                last_tick = time.time()
                with contextlib.suppress(Exception):
                    on_tick()
            if time.time() > end:
                timed_out = True
                _kill_group(proc)
                break
    finally:  # also on SIGTERM/Ctrl-C of the parent: never leave a child holding the GPU
        _kill_group(proc)
    th.join(timeout=5)
    return (None if timed_out else proc.returncode), list(tail), timed_out


def _child_cmd(args: argparse.Namespace, stage: str, stage_out: Path, deadline: float) -> list[str]:
    cmd = [sys.executable, "-m", "triton_rerank.client.gpu_check", "--out", str(args.out)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    cmd += [
        "--dtype", args.dtype, "--device", args.device, "--max-minutes", str(args.max_minutes),
        "--token-budget", str(args.token_budget), "--hf-batch-size", str(args.hf_batch_size),
        "--max-length", str(args.max_length),
        "--stage", stage, "--stage-out", str(stage_out), "--deadline", f"{deadline:.3f}",
    ]  # fmt: skip
    if args.pairs:
        cmd += ["--pairs", str(args.pairs)]
    if args.quick:
        cmd.append("--quick")
    return cmd


def _child_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    # No network on the GPU machine: never wait on the Hub; keep logs readable.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    else:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run_tests_stage(args: argparse.Namespace, timeout: float, results: dict, flush: Callable[[], None]) -> dict:
    import importlib.util

    tests_dir = REPO_ROOT / "tests" / "kernels"
    if not tests_dir.is_dir():
        return {"status": "error", "error": f"{tests_dir} does not exist"}
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p", "no:cacheprovider", "-rfE"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    data: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": round(timeout, 1)}
    rc, tail, timed_out = run_streaming(
        cmd, timeout, "  [pytest] ", env=_child_env(args), on_tick=flush, echo=False, tail_lines=400
    )
    text = "\n".join(tail)
    data.update({"returncode": rc, "timed_out": timed_out, "counts": parse_pytest_summary(text), "tail": tail[-60:]})
    if not data["counts"]:  # cut short: count the progress characters instead
        data["progress_counts"] = parse_pytest_progress(tail)
    for line in tail[-15:]:
        print(f"  [pytest] {line}", flush=True)
    if timed_out:
        status = "timeout"
    elif rc == 0:
        status = "ok"
    elif rc == 5:
        status = "no tests"
    else:
        status = "failed"
    return {"status": status, "data": data}


def _merge_child(stage_out: Path) -> dict:
    try:
        return json.loads(stage_out.read_text())
    except Exception:
        return {}


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> int:
    t_start = time.time()
    budget = args.max_minutes * 60.0
    deadline = t_start + budget
    # Children run in the repo root: hand them absolute paths.
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    shim = ensure_package_importable()
    requested_data_dir = args.data_dir
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is not None:
        data_dir = data_dir.resolve()
        args.data_dir = str(data_dir)
    results: dict[str, Any] = {
        "tool": "triton_rerank.client.gpu_check",
        "argv": list(argv),
        "device": args.device,
        "started": _now_iso(),
        "budget_s": budget,
        "data_dir": str(data_dir) if data_dir else None,
        "data_dir_requested": requested_data_dir,
        "data_files": {
            f: (data_dir is not None and (data_dir / f).is_file()) for f in (DL19_FILE, TOKENIZER_FILE, CONFIG_FILE)
        },
        "package_shim": shim,
        "repo_root": str(REPO_ROOT),
        "targets_spec": {
            "attention_vs_best_torch_equal_work": TARGET_ATTENTION_VS_TORCH,
            "packed_triton_vs_hf_padded_pairs_per_s": TARGET_PACKED_VS_HF,
            "packed_triton_mfu_vs_bf16_matmul": TARGET_MFU,
        },
        "stages": {name: {"status": "pending"} for name in STAGES},
    }

    def flush() -> None:
        results["updated"] = _now_iso()
        results["elapsed_s"] = round(time.time() - t_start, 1)
        write_results(out, results)

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    old_handler = None
    with contextlib.suppress(ValueError):  # not in the main thread (tests)
        old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    flush()
    log(f"start: out={out} data={data_dir} device={args.device} budget={budget:.0f}s")
    try:
        return _run_stages(args, results, deadline, flush, t_start)
    except BaseException as exc:
        for name, st in results["stages"].items():
            if st.get("status") == "running" and (out / f"stage-{name}.json").is_file():
                st["data"] = _merge_child(out / f"stage-{name}.json")  # what the child got done
            if st.get("status") in ("running", "pending"):
                st["status"] = "interrupted" if st["status"] == "running" else "not run"
                st["reason"] = _err_text(exc)
        flush()
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _run_stages(args: argparse.Namespace, results: dict, deadline: float, flush: Callable[[], None], t_start: float) -> int:
    out = Path(args.out)
    will_run = [s for s in STAGES if (args.only is None or s in args.only) and not (s == "tests" and args.skip_tests)]
    later_min = {s: sum(STAGE_MIN_SECONDS[x] for x in will_run[will_run.index(s) + 1 :]) for s in will_run}
    any_error = False
    for name in STAGES:
        st = results["stages"][name]
        remaining = deadline - time.time()
        if name == "tests" and args.skip_tests:
            st.update({"status": "skipped", "reason": "--skip-tests"})
            flush()
            continue
        if args.only is not None and name not in args.only:
            st.update({"status": "skipped", "reason": "not in --only"})
            flush()
            continue
        reserve = later_min[name]
        limit = min(STAGE_CAP_SECONDS[name], remaining - reserve - 5)
        if name == "encoder":
            limit = remaining - 5
        if limit < STAGE_MIN_SECONDS[name] * 0.75:
            # Later stages' reserve cannot be honoured: give this stage its minimum if that is left.
            limit = min(STAGE_MIN_SECONDS[name], remaining - 5)
            if limit < STAGE_MIN_SECONDS[name] * 0.75:
                st.update({"status": "skipped", "reason": f"time budget: {remaining:.0f}s left"})
                log(f"stage {name}: skipped ({remaining:.0f}s left)")
                flush()
                continue
        if name == "tests":
            limit = min(limit, args.tests_timeout)
        log(f"stage {name}: start (limit {limit:.0f}s, {remaining:.0f}s left)")
        st.update({"status": "running", "limit_s": round(limit, 1)})
        flush()
        t0 = time.time()
        try:
            if name == "tests":
                st.update(_run_tests_stage(args, limit, results, flush))
            else:
                stage_out = out / f"stage-{name}.json"
                with contextlib.suppress(FileNotFoundError):
                    stage_out.unlink()
                stage_deadline = time.time() + limit

                def tick(stage_out=stage_out, st=st, t0=t0) -> None:
                    st["data"] = _merge_child(stage_out)
                    st["seconds"] = round(time.time() - t0, 1)
                    flush()

                rc, tail, timed_out = run_streaming(
                    _child_cmd(args, name, stage_out, stage_deadline),
                    limit + 15,  # the child stops itself at its deadline; the kill is a backstop
                    f"  [{name}] ",
                    env=_child_env(args),
                    on_tick=tick,
                )
                data = _merge_child(stage_out)
                st["data"] = data
                st["returncode"] = rc
                child_status = data.get("status")
                if timed_out:
                    st["status"] = "timeout"
                elif rc != 0 or child_status not in ("ok",):
                    st["status"] = "error"
                    st["log_tail"] = tail[-40:]
                elif data.get("errors"):
                    st["status"] = "ok (with errors)"
                else:
                    st["status"] = "ok"
                if data.get("fatal"):
                    st["error_summary"] = data["fatal"].strip().splitlines()[-1]
                elif st["status"] != "ok" and data.get("errors"):
                    st["error_summary"] = f"{len(data['errors'])} error(s); first: {data['errors'][0]['error'][:200]}"
                elif st["status"] in ("error", "timeout") and tail:
                    st["error_summary"] = tail[-1][:200]
        except Exception as exc:
            st.update({"status": "error", "error": traceback.format_exc()[-3000:], "error_summary": _err_text(exc)})
        st["seconds"] = round(time.time() - t0, 1)
        any_error = any_error or st["status"] not in ("ok", "skipped")
        flush()
        log(f"stage {name}: {st['status']} in {st['seconds']:.1f}s")
    flush()
    for t in results.get("targets") or []:
        log(f"target {t['name']}: {_fmt(t['value'])} (>= {t['target']}) {'MET' if t['met'] else 'NOT met'}")
    log(f"done in {time.time() - t_start:.1f}s: {out / RESULTS_JSON}, {out / RESULTS_MD}")
    return 1 if any_error else 0


def child_main(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede importing the kernels
    rec = StageRecorder(args.stage_out, args.deadline)
    fn = {"env": stage_env, "attention": stage_attention, "encoder": stage_encoder}[args.stage]
    try:
        fn(args, rec)
        rec.data["status"] = "ok"
    except BaseException as exc:  # includes KeyboardInterrupt/SystemExit from the stage
        rec.data["status"] = "error"
        rec.data["fatal"] = traceback.format_exc()[-4000:]
        log(f"stage {args.stage} failed: {_err_text(exc)}")
    rec.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.stage:
        return child_main(args)
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
