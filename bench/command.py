"""`triton-rerank bench`: the served ensemble against in-process baselines and a peer server, one run.

Contenders, each measured alone (one server at a time, nothing else of ours running), with the
same torch thread count, on the same requests:
- triton-grpc / triton-http: the `reranker` ensemble driven by the real perf_analyzer, one run
  per concurrency level, a fixed number of requests per level after a warm-up;
- hf-padded (in-process): transformers, padded batches of 32, SDPA (what a user writes by hand);
- packed (in-process): our packed encoder without the server;
- infinity-http: Infinity (infinity-emb) on the same model directory, the same requests at the
  same concurrency levels over HTTP (skipped, with a note, when not installed);
- peers (asked for with --contenders ...,peers): the CPU rerankers people pick, sentence-transformers'
  CrossEncoder on torch fp32/bf16, ONNX Runtime (fp32, O3, int8) and OpenVINO, each in its own
  process from their own venv (--peer-python), all pairs in one go, checked against transformers fp32.
Writes bench.csv, bench.md and bench.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

from ..models.dtypes import DTYPE_NAMES, QUANTIZE_NAMES
from . import report
from .cpu_peers import PEER_SETUP, PEERS
from .peer import INFINITY_OPTIMUM_SETUP, INFINITY_SETUP
from .served import level_count
from .workload import (
    DL19_FILE,
    RequestSet,
    dl19_requests,
    parse_synthetic,
    resolve_data_dir,
    synthetic_requests,
    vocabulary_words,
)

CONTENDERS = ("hf", "packed", "triton", "infinity", "peers")
DEFAULT_CONTENDERS = ("hf", "packed", "triton", "infinity")
QUICK = {"concurrency": "1,4", "requests_per_level": 6, "rounds": 2, "max_queries": 12, "warmup": 4}


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return names
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/bench", help="folder for bench.csv, bench.md and bench.png")
    p.add_argument("--work-dir", default="build/bench-work", help="server run folders and logs")
    p.add_argument("--quick", action="store_true",
                   help=f"a ~2 minute run: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    g = p.add_argument_group("model and workload")
    g.add_argument("--model-dir", default=None, help="a cross-encoder directory; default: build the random-weight "
                   "MiniLM-L6-shaped BERT (real config and bert-base-uncased tokenizer from the data folder when "
                   "present, generated otherwise) in build/bench-model-minilm-l6")
    g.add_argument("--data-dir", default=None, help="the shared data folder; default ../shared/data if present")
    g.add_argument("--workload", choices=["dl19", "synthetic"], default="dl19",
                   help="dl19: each DL19 query with its first --docs-per-request BM25 candidates (synthetic when "
                   "the file is absent)")
    g.add_argument("--docs-per-request", type=int, default=20)
    g.add_argument("--max-queries", type=int, default=None, help="use only the first N DL19 queries")
    g.add_argument("--synthetic", default="q=16,d=96,r=40", help="synthetic workload: q=QUERY_TOKENS,"
                   "d=DOC_TOKENS,r=REQUESTS (n=DOCS_PER_REQUEST, default --docs-per-request)")
    g = p.add_argument_group("measurement")
    g.add_argument("--contenders", type=_names(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                   help=f"which to run, comma-separated, from {', '.join(CONTENDERS)} (default: "
                   f"{','.join(DEFAULT_CONTENDERS)})")
    g.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16], help="levels of the sweep")
    g.add_argument("--protocols", type=_names(("grpc", "http")), default=["grpc", "http"])
    g.add_argument("--requests-per-level", type=int, default=16,
                   help="requests measured at each concurrency level (at least --rounds x concurrency)")
    g.add_argument("--rounds", type=int, default=4, help="see --requests-per-level")
    g.add_argument("--warmup", type=int, default=6, help="requests sent to each server before measuring")
    g.add_argument("--latency-repeats", type=int, default=None, help="single requests timed in-process; default "
                   "the count of the concurrency-1 level, so that both time the same requests")
    g.add_argument("--repeat", type=int, default=1, help="run every contender this many times, interleaved "
                   "(hf, packed, triton, infinity, hf, ...); the report gives the median of the runs (each run's "
                   "rows are in bench_runs.csv). On a shared or throttled machine speed drifts by minutes: 3 helps")
    g.add_argument("--no-paired-latency", dest="paired", action="store_false",
                   help="skip the alternating served/in-process single-request latency (after each Triton sweep)")
    g.add_argument("--threads", type=int, default=None, help="torch threads of every contender; default the "
                   "cores this process may use")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="every contender's dtype; auto (default): what `serve` picks on this device, the precision "
                   "a user gets (on a CPU bfloat16 with AMX or AVX512-BF16, else float32)")
    g.add_argument("--quantize", default="none", choices=QUANTIZE_NAMES,
                   help="int8: our contenders' linears in int8 (serve --quantize int8); a --triton-variant may say "
                   "q=int8 or q=none for itself")
    g.add_argument("--max-batch-tokens", type=int, default=16384, help="packed encoder token budget (server and "
                   "in-process)")
    g.add_argument("--attention-backend", default="", choices=["", "sdpa", "triton"])
    g.add_argument("--hf-batch-size", type=int, default=32)
    g.add_argument("--triton-variant", action="append", default=None, metavar="SPEC",
                   help="server settings, repeatable: delay=US,instances=N,threads=N,tok=N,mbt=N,compile=0|1,"
                   "q=none|int8,engine=packed|hf|openvino,dtype=NAME (queue delay of cross_encoder, its instances, torch "
                   "threads per instance, RAYON_NUM_THREADS of the tokenizer, max_batch_tokens, serve --compile, "
                   "quantize, serve --engine, serve --dtype); default: config.pbtxt's delay, 1 instance, --threads, "
                   "--max-batch-tokens, no compile, --quantize, the packed engine, --dtype")
    g = p.add_argument_group("peer server (Infinity)", "Create its environment once:\n" + INFINITY_SETUP
                             + "\nIts ONNX Runtime engine (--infinity-engine optimum) needs older pins:\n"
                             + INFINITY_OPTIMUM_SETUP)
    g.add_argument("--infinity-python", default=None, help="python of the Infinity venv, e.g. /tmp/infvenv/bin/python")
    g.add_argument("--infinity-cmd", default=None, help="or the command that runs Infinity's CLI")
    g.add_argument("--infinity-engine", default="torch", help="torch, optimum, ctranslate2")
    g.add_argument("--infinity-batch-size", type=int, default=16,
                   help="Infinity's --batch-size (its default is 32; 16 measured best on the 2-core CPU)")
    g.add_argument("--infinity-arg", action="append", default=[], help="extra Infinity CLI argument, repeatable")
    g = p.add_argument_group("CPU peers (sentence-transformers, ONNX Runtime, OpenVINO)",
                             "Create their environment once:\n" + PEER_SETUP)
    g.add_argument("--peer-python", default=None, help="python of the peers' venv, e.g. build/cpu-peers-venv/bin/python")
    g.add_argument("--peers", type=_names(PEERS), default=list(PEERS), help=f"which peers, comma-separated, from "
                   f"{', '.join(PEERS)} (st-torch-fp32, the reference, always runs)")
    g.add_argument("--peer-batch-size", type=int, default=16, help="CrossEncoder.predict batch size")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark the served ensemble against in-process baselines and Infinity",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def apply_quick(args: argparse.Namespace) -> None:
    if not args.quick:
        return
    args.concurrency = _int_list(QUICK["concurrency"]) if args.concurrency == [1, 2, 4, 8, 16] else args.concurrency
    args.requests_per_level = min(args.requests_per_level, QUICK["requests_per_level"])
    args.rounds = min(args.rounds, QUICK["rounds"])
    args.max_queries = args.max_queries or QUICK["max_queries"]
    args.warmup = min(args.warmup, QUICK["warmup"])


def load_requests(args, data_dir: Path | None, model_dir: Path, notes: list[str]) -> RequestSet:
    if args.workload == "dl19":
        if data_dir is not None and (data_dir / DL19_FILE).is_file():
            return dl19_requests(data_dir / DL19_FILE, args.docs_per_request, args.max_queries)
        notes.append(f"{DL19_FILE} not found: synthetic workload instead")
    spec = parse_synthetic(args.synthetic)
    spec.setdefault("docs_per_request", args.docs_per_request)
    if "n=" not in args.synthetic:
        spec["docs_per_request"] = args.docs_per_request
    if args.max_queries:
        spec["num_requests"] = min(spec["num_requests"], args.max_queries)
    return synthetic_requests(vocabulary_words(model_dir / "tokenizer.json"), spec["num_requests"],
                              spec["docs_per_request"], spec["query_tokens"], spec["doc_tokens"])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .random_model import build_bench_model, describe_model

    apply_quick(args)
    notes: list[str] = []
    if args.dtype == "auto":
        from ..models.dtypes import auto_dtype

        args.dtype, why = auto_dtype("cuda" if args.device.startswith("cuda") else "cpu")
        notes.append(f"dtype auto: {args.dtype} for every contender ({why}), as `serve` picks it on this device")
    if args.threads is None:
        args.threads = report.usable_cores()
    if args.latency_repeats is None:
        args.latency_repeats = level_count(args, 1)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    model_dir = Path(args.model_dir) if args.model_dir else build_bench_model(
        Path("build") / "bench-model-minilm-l6", data_dir)
    requests = load_requests(args, data_dir, model_dir, notes)
    info = run_info(args, model_dir, requests, describe_model(model_dir))
    variants = triton_variants(args)
    infinity = infinity_settings(args, notes) if "infinity" in args.contenders else None

    levels = len(args.concurrency)
    total = args.repeat * (("hf" in args.contenders) + ("packed" in args.contenders) + ("peers" in args.contenders)
                           + ("triton" in args.contenders) * len(variants) * len(args.protocols) * levels
                           + (infinity is not None) * levels)
    raw: list[report.Row] = []
    started = time.monotonic()
    load = info_load()
    with tqdm(total=total, desc="bench", unit="point", dynamic_ncols=True, file=sys.stderr) as bar:
        for run_number in range(1, args.repeat + 1):
            def note(text: str, n: int = run_number) -> None:
                bar.set_postfix_str((f"run {n}/{args.repeat}: " if args.repeat > 1 else "") + text[:60], refresh=True)

            rows: list[report.Row] = []
            run_contenders(args, model_dir, requests, variants, infinity, work, note, bar, notes, rows)
            raw += [dataclasses.replace(r, run=run_number) for r in rows]
    notes.append(f"whole run {time.monotonic() - started:.0f} s; load average at start {load}")
    notes += method_notes(args, requests)
    rows = report.aggregate(raw)
    report.write_bench_report(out, rows, raw, info, notes)
    print(report.markdown(rows, info, None, None))
    print(f"wrote {out / 'bench.csv'}, {out / 'bench_runs.csv'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0 if rows else 1


def run_contenders(args, model_dir: Path, requests: RequestSet, variants, infinity, work: Path, note, bar,
                   notes: list[str], rows: list[report.Row]) -> None:
    """One pass over every contender, one at a time; a failure is noted and the others still run."""
    for name in ("hf", "packed"):
        if name in args.contenders:
            _guard(notes, name, lambda n=name: rows.extend(in_process(n, args, model_dir, requests, note)))
            bar.update(1)
    if "triton" in args.contenders:
        from .served import sweep_triton

        for variant in variants:
            _guard(notes, f"triton [{variant.label()}]", lambda v=variant: rows.extend(
                sweep_triton(args, model_dir, requests, v, work, note, bar)))
    if "peers" in args.contenders:
        _guard(notes, "peers", lambda: rows.extend(peers(args, model_dir, requests, work, note, notes)))
        bar.update(1)
    if infinity is not None:
        from .served import sweep_infinity

        _guard(notes, "infinity", lambda: rows.extend(
            sweep_infinity(args, model_dir, requests, infinity, work, note, bar)))


def peers(args, model_dir: Path, requests: RequestSet, work: Path, note, notes: list[str]) -> list[report.Row]:
    from .cpu_peers import run_peers

    if not args.peer_python:
        if not any("peers skipped" in n for n in notes):
            notes.append("peers skipped: pass --peer-python; create their environment with: "
                         + "; ".join(PEER_SETUP.splitlines()))
        return []
    return run_peers(args.peer_python, args.peers, model_dir, requests, work, args.threads, args.peer_batch_size,
                     note)


def _guard(notes: list[str], name: str, step) -> None:
    """Runs one contender; a failure becomes a note in the report, the others still run."""
    try:
        step()
    except Exception as error:  # noqa: BLE001 - reported, the run goes on
        notes.append(f"{name} failed: {type(error).__name__}: {str(error)[:500]}")
        print(f"\n{name} failed: {error}", file=sys.stderr)


def in_process(name: str, args, model_dir: Path, requests: RequestSet, note) -> list[report.Row]:
    from . import baselines as bench_baselines

    if name == "hf":
        result = bench_baselines.hf_padded(model_dir, requests, threads=args.threads, batch_size=args.hf_batch_size,
                                           device=args.device, dtype=args.dtype,
                                           latency_repeats=args.latency_repeats, progress=note)
        variant = f"bs={args.hf_batch_size} thr={args.threads}"
    else:
        result = bench_baselines.packed(model_dir, requests, threads=args.threads, max_batch_tokens=args.max_batch_tokens,
                                        device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
                                        quantize=args.quantize, latency_repeats=args.latency_repeats, progress=note)
        variant = f"thr={args.threads}" + ("" if args.quantize == "none" else f" {args.quantize}")
    per_request = requests.num_pairs / len(requests.requests)
    rows = [report.Row(result.name, "in-process", "offline", 0, variant, result.backend, len(requests.requests),
                       result.pairs_per_s / per_request, result.pairs_per_s)]
    if result.latencies_s:
        from .served import latency_row

        row = latency_row(result.name, "in-process", "latency", 1, variant, result.backend, result.latencies_s,
                          per_request)
        if result.tokenize_s:
            row.tokenizer_ms = 1000 * sum(result.tokenize_s) / len(result.tokenize_s)
            row.encoder_ms = 1000 * sum(result.encode_s) / len(result.encode_s)
        rows.append(row)
    return rows


def triton_variants(args):
    from .perf_sweep import TritonVariant, configured_queue_delay, parse_variant

    threads = args.threads or report.usable_cores()
    if not args.triton_variant:
        return [TritonVariant(configured_queue_delay(), 1, threads, quantize=args.quantize)]
    variants = [parse_variant(spec, threads) for spec in args.triton_variant]
    default_delay = configured_queue_delay()
    return [dataclasses.replace(v, queue_delay_us=default_delay if v.queue_delay_us is None else v.queue_delay_us,
                                quantize=v.quantize or args.quantize) for v in variants]


def infinity_settings(args, notes: list[str]):
    from .peer import InfinitySettings, infinity_prefix

    settings = InfinitySettings(python=args.infinity_python, command=args.infinity_cmd, engine=args.infinity_engine,
                                batch_size=args.infinity_batch_size, dtype=args.dtype, device=args.device,
                                threads=args.threads, extra_args=tuple(args.infinity_arg))
    try:
        infinity_prefix(settings)
    except FileNotFoundError as error:
        notes.append(f"Infinity skipped: {error}. Create its environment with: "
                     + "; ".join(INFINITY_SETUP.splitlines()) + "; then --infinity-python /tmp/infvenv/bin/python")
        return None
    return settings


def run_info(args, model_dir: Path, requests: RequestSet, model: str) -> report.RunInfo:
    command = "triton-rerank bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    return report.run_info(model, args.dtype, args.device, requests.source, requests.docs_per_request, command)


def info_load() -> str:
    import os

    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def method_notes(args, requests: RequestSet) -> list[str]:
    levels = ", ".join(f"c={c}: {level_count(args, c)}" for c in args.concurrency)
    return [
        f"workload: {requests.source}, {requests.num_pairs} pairs in {len(requests.requests)} requests; "
        f"every contender gets the same requests (text in, scores out; tokenization included everywhere)",
        f"servers: started one at a time, {args.warmup} warm-up requests, then per concurrency level a fixed "
        f"number of requests ({levels}); Triton by perf_analyzer --request-count, Infinity by an asyncio httpx "
        f"client in the bench process (POST /rerank); p99 of few samples is close to their maximum",
        f"in-process: the whole workload once after a 2-request warm-up (offline pairs/s), and "
        f"{args.latency_repeats} single requests one after another (latency)",
        f"torch threads {args.threads} for every contender (Infinity: OMP_NUM_THREADS)",
        *([f"{args.repeat} runs, interleaved; each figure is the median over the runs (bench_runs.csv has each "
           "run)"] if args.repeat > 1 else []),
    ]
