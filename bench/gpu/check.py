"""One-shot GPU check: environment, kernel tests, attention, encoder and decoder benchmarks.

Run it once on a GPU machine (it fits a few minutes) and read ``OUT/gpu_results.md``::

    python3 -P bench/gpu/check.py --out OUT --data-dir .gpu-data
    python -m triton_rerank.bench.gpu.check --out OUT          # when the package is installed

Stages, in order, each timed and recorded, each allowed to fail without stopping the others:

1. ``env``       versions, card, SM count, memory; measured bf16/fp16 dense matmul TFLOP/s.
2. ``tests``     ``pytest tests/kernels -q -x`` in a subprocess (compiled kernels on CUDA).
3. ``attention`` ``varlen_attention`` vs torch (``varlen_attn`` and SDPA flash grouped by length,
                 both equal work; SDPA flash on padded buckets, padding FLOPs counted apart) on
                 packs of DL19 pair lengths; max abs error vs the reference.
4. ``encoder``   random-weight bge-reranker-v2-m3 on the 4,300 DL19 pairs: packed encoder with the
                 Triton and the SDPA attention backend (micro-batched as the server does) vs Hugging
                 Face padded batches of 32; pairs/s, real tokens/s, model FLOP utilisation vs the
                 measured bf16 matmul rate; score agreement packed vs Hugging Face.
5. ``decoder``   random-weight Qwen3-Reranker 0.6B and 4B in bf16 on the Qwen3-Reranker prompts of
                 DL19 queries and passages: packed causal decoder with the Triton and the SDPA
                 backend (micro-batched as the server does) vs Hugging Face's causal LM the model
                 card's way (left-padded batches, SDPA, logits[:, -1, [no, yes]]); pairs/s, real
                 tokens/s, MFU, the ratio to HF; scores vs HF and vs a float32 reference.
6. ``served``    the encoder served by the bundled tritonserver (the `reranker` ensemble), DL19
                 requests of 20 and 100 passages from async gRPC clients at several concurrencies;
                 pairs/s, p50/p99, MFU end to end, and the ratio to stage 4's in-process encoder.

``--carry DIR`` brings what the GPU machine lacks (the tritonserver wheel, tritonclient, the data
files; ``python -m triton_rerank.bench.gpu.carry`` packs it): it is unpacked before any stage.

Every stage but ``tests`` runs in a child process (a crashed CUDA context or a hung compile costs
one stage, not the run); the parent imports no torch, enforces ``--max-minutes`` by killing a
child at its stage deadline, and rewrites ``gpu_results.json`` / ``gpu_results.md`` after every
stage and every few seconds while a stage runs, so a hard kill still leaves data.

``--device cpu --quick`` is a smoke mode: stages 3-6 on tiny shapes (a 2-layer model, a few
pairs, Triton kernels interpreted) to exercise the code paths without a GPU.

This file is the entry point: arguments, stage scheduling and deadlines, child processes.
The rest lives beside it: ``bench/workload.py`` (workloads, batching, FLOP counts),
``bench/random_model.py`` (the random-weight models), ``bench/report.py`` (run context, atomic
files, markdown tables), ``results`` (derived metrics, targets, the results' markdown),
``stage_*`` (the stage bodies, their processes and recorder) and ``timing``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any


def ensure_package_importable() -> str | None:
    """Make `triton_rerank.*` importable from a bare checkout (returns the shim folder, or None).

    The checkout's root is the package itself, so a temporary folder holding one link,
    ``triton_rerank -> <checkout>``, is all it takes; it goes first on sys.path and PYTHONPATH
    (so the stage processes and pytest see it too). Idempotent.
    """
    shim = os.environ.get("TRITON_RERANK_SHIM")
    if shim:
        return shim
    try:
        import triton_rerank  # noqa: F401

        return None
    except ImportError:
        pass
    shim = tempfile.mkdtemp(prefix="triton_rerank_shim_")
    Path(shim, "triton_rerank").symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH")) if p)
    os.environ["TRITON_RERANK_SHIM"] = shim
    return shim


if __name__ == "__main__" and not __package__:
    # Run as a file (`python3 -P bench/gpu/check.py`) on a machine where the project is not
    # installed: reach the package through the shim, then run this file as its module.
    import runpy

    ensure_package_importable()
    runpy.run_module("triton_rerank.bench.gpu.check", run_name="__main__", alter_sys=True)
    sys.exit(0)

from ...models.dtypes import DTYPE_NAMES  # noqa: E402
from ..report import fmt, now_iso, run_context  # noqa: E402
from ..workload import (  # noqa: E402
    CONFIG_FILE,
    DEFAULT_DATA_DIR,
    DL19_FILE,
    REPO_ROOT,
    TOKENIZER_FILE,
    resolve_data_dir,
)
from .carry import DECODER_DATA_FILES  # noqa: E402
from .results import (  # noqa: E402
    RESULTS_JSON,
    RESULTS_MD,
    TARGET_ATTENTION_VS_TORCH,
    TARGET_MFU,
    TARGET_PACKED_VS_HF,
    write_results,
)
from .stage_process import child_env, read_stage_file, run_child_stage  # noqa: E402
from .stage_recorder import StageRecorder, error_text, log  # noqa: E402

STAGES = ("env", "tests", "attention", "encoder", "decoder", "served")
CHILD_STAGES = ("env", "attention", "encoder", "decoder", "served")
# Seconds reserved for later stages when sizing an earlier one's time limit.
STAGE_MIN_SECONDS = {"env": 20, "tests": 30, "attention": 40, "encoder": 90, "decoder": 90, "served": 120}
STAGE_CAP_SECONDS = {"env": 90, "tests": 180, "attention": 120, "encoder": 330, "decoder": 240, "served": 420}


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_rerank.bench.gpu.check",
        description=(
            "One-shot GPU check of triton-rerank: environment and matmul rate, kernel tests, "
            "varlen attention benchmark, packed encoder and packed decoder (Qwen3-Reranker) vs Hugging "
            "Face benchmarks, the served encoder. Writes "
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
            "shared data folder holding msmarco-dl19-bm25top100.jsonl, tokenizers/xlm-roberta/, "
            f"tokenizers/qwen3/ and configs/ (default: {DEFAULT_DATA_DIR}, then ./.gpu-data, "
            "./shared/data); synthetic lengths and the built-in bge-reranker-v2-m3 config are used when "
            "the encoder's files are missing; the decoder stage needs its own"
        ),
    )
    p.add_argument(
        "--carry",
        default=None,
        help="folder packed by `python -m triton_rerank.bench.gpu.carry` (the tritonserver wheel, tritonclient, "
        "the data files): what this machine lacks of it is unpacked first; its data is the default --data-dir",
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=DTYPE_NAMES,
        help="dtype of the encoder benchmark (default float16; forced to float32 with --device cpu); the "
        "decoder stage runs in bfloat16, as the Qwen3-Reranker releases ship",
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
    p.add_argument(
        "--pairs", type=int, default=None, help="limit the encoder workload (and each decoder shape's) to this many pairs"
    )
    # Internal: one stage in a child process.
    p.add_argument("--stage", choices=CHILD_STAGES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_minutes <= 0:
        parser.error("--max-minutes must be positive")
    if args.token_budget < 1 or args.hf_batch_size < 1 or args.max_length < 4:
        parser.error("--token-budget, --hf-batch-size must be >= 1 and --max-length >= 4")
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be >= 1")
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in STAGES]
        if bad or not only:
            parser.error(f"--only takes stages of {','.join(STAGES)}, got {args.only!r}")
        args.only = only
    if args.device == "cpu":
        args.dtype = "float32"
    return args


# --------------------------------------------------------------------------------------------
# Orchestration (parent; imports no torch)
# --------------------------------------------------------------------------------------------


def _stage_limit(name: str, remaining: float, reserve: float) -> float | None:
    """Seconds stage `name` may take, leaving `reserve` for later stages; None: not worth starting."""
    limit = min(STAGE_CAP_SECONDS[name], remaining - reserve - 5)
    if name == STAGES[-1]:  # the last stage takes whatever is left
        limit = remaining - 5
    if limit < STAGE_MIN_SECONDS[name] * 0.75:
        # Later stages' reserve cannot be honoured: give this stage its minimum if that is left.
        limit = min(STAGE_MIN_SECONDS[name], remaining - 5)
        if limit < STAGE_MIN_SECONDS[name] * 0.75:
            return None
    return limit


def _unpack_carry(args: argparse.Namespace) -> dict | None:
    """Unpacks --carry into a scratch folder removed at exit; its data becomes the default --data-dir."""
    if not args.carry:
        return None
    from .carry import unpack

    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_carry_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    carried = unpack(Path(args.carry).expanduser().resolve(), scratch)
    if args.data_dir is None and "data_dir" in carried:
        args.data_dir = carried["data_dir"]
    log(f"carry: {carried}")
    return carried


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> int:
    t_start = time.time()
    budget = args.max_minutes * 60.0
    deadline = t_start + budget
    # Children run in the repo root: hand them absolute paths.
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    shim = ensure_package_importable()
    carried = _unpack_carry(args)
    requested_data_dir = args.data_dir
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is not None:
        data_dir = data_dir.resolve()
        args.data_dir = str(data_dir)
    results: dict[str, Any] = {
        "tool": "triton_rerank.bench.gpu.check",
        "argv": list(argv),
        "device": args.device,
        "started": now_iso(),
        # Machine, CPU model, GPU, versions and commit, gathered without importing torch.
        "context": asdict(run_context()),
        "budget_s": budget,
        "data_dir": str(data_dir) if data_dir else None,
        "data_dir_requested": requested_data_dir,
        "data_files": {
            f: (data_dir is not None and (data_dir / f).is_file())
            for f in (DL19_FILE, TOKENIZER_FILE, CONFIG_FILE, *DECODER_DATA_FILES)
        },
        "package_shim": shim,
        "carried": carried,
        "repo_root": str(REPO_ROOT),
        "targets_spec": {
            "attention_vs_best_torch_equal_work": TARGET_ATTENTION_VS_TORCH,
            "packed_triton_vs_hf_padded_pairs_per_s": TARGET_PACKED_VS_HF,
            "packed_triton_mfu_vs_bf16_matmul": TARGET_MFU,
        },
        "stages": {name: {"status": "pending"} for name in STAGES},
    }

    def flush() -> None:
        results["updated"] = now_iso()
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
                st["data"] = read_stage_file(out / f"stage-{name}.json")  # what the child got done
            if st.get("status") in ("running", "pending"):
                st["status"] = "interrupted" if st["status"] == "running" else "not run"
                st["reason"] = error_text(exc)
        flush()
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _run_stages(
    args: argparse.Namespace, results: dict, deadline: float, flush: Callable[[], None], t_start: float
) -> int:
    """Each stage in order, each within its time limit; 1 when any stage did not end ok or skipped."""
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
        limit = _stage_limit(name, remaining, later_min[name])
        if limit is None:
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
                from .stage_tests import run_kernel_tests

                st.update(run_kernel_tests(REPO_ROOT, limit, child_env(args), flush))
            else:
                run_child_stage(args, name, st, limit, flush)
        except Exception as exc:
            st.update({"status": "error", "error": traceback.format_exc()[-3000:], "error_summary": error_text(exc)})
        st["seconds"] = round(time.time() - t0, 1)
        any_error = any_error or st["status"] not in ("ok", "skipped")
        flush()
        log(f"stage {name}: {st['status']} in {st['seconds']:.1f}s")
    flush()
    for t in results.get("targets") or []:
        log(f"target {t['name']}: {fmt(t['value'])} (>= {t['target']}) {'MET' if t['met'] else 'NOT met'}")
    log(f"done in {time.time() - t_start:.1f}s: {Path(args.out) / RESULTS_JSON}, {Path(args.out) / RESULTS_MD}")
    return 1 if any_error else 0


def child_main(args: argparse.Namespace) -> int:
    """Run one stage (--stage) in this process; its record goes to --stage-out, never an exit code."""
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel module is imported: before the stages import them
    rec = StageRecorder(args.stage_out, args.deadline)
    try:
        if args.stage == "env":
            from .stage_env import stage_env as fn
        elif args.stage == "attention":
            from .stage_attention import stage_attention as fn
        elif args.stage == "encoder":
            from .stage_encoder import stage_encoder as fn
        elif args.stage == "decoder":
            from .stage_decoder import stage_decoder as fn
        else:
            from .stage_served import stage_served as fn
        fn(args, rec)
        rec.data["status"] = "ok"
    except BaseException as exc:  # includes KeyboardInterrupt/SystemExit from the stage
        rec.data["status"] = "error"
        rec.data["fatal"] = traceback.format_exc()[-4000:]
        log(f"stage {args.stage} failed: {error_text(exc)}")
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
