"""CPU unit tests of `triton-rerank bench`: arguments, perf_analyzer output, workloads, reports, Infinity."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from triton_rerank.bench import command as bench
from triton_rerank.bench import peer as bench_peer
from triton_rerank.bench import perf_sweep as bench_perf
from triton_rerank.bench import report as bench_report
from triton_rerank.bench import served
from triton_rerank.bench import workload as bench_workload
from triton_rerank.bench.perf_analyzer import write_input_data

# A CSV written by perf_analyzer 2.51 (`-f`) against the ensemble: no "Avg latency" column.
PERF_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "1,3.9968,13,2365,2,102,13413,788,5,18323,24146,24146,24146\n"
    "4,11.5,20,3000,120000,150,200000,900,7,330000,350000,360000,380000\n"
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="triton-rerank")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_arguments_defaults_quick_and_errors():
    args = _parse([])
    assert args.func is bench.run
    assert args.concurrency == [1, 2, 4, 8, 16] and args.protocols == ["grpc", "http"]
    assert args.contenders == ["hf", "packed", "triton", "infinity"] and args.threads is None  # = usable cores
    assert args.docs_per_request == 20 and args.workload == "dl19" and args.infinity_python is None
    assert args.paired and not _parse(["--no-paired-latency"]).paired and args.infinity_batch_size == 16

    quick = _parse(["--quick"])
    bench.apply_quick(quick)
    assert quick.concurrency == [1, 4] and quick.max_queries == 12 and quick.latency_repeats is None
    assert served.level_count(quick, 1) == 6 and served.level_count(quick, 4) == 8

    args = _parse(["--concurrency", "1,3", "--protocols", "grpc", "--contenders", "packed,triton",
                   "--triton-variant", "delay=0,instances=2,threads=1", "--triton-variant", "tok=1",
                   "--infinity-python", "/x/python", "--infinity-arg=--compile"])
    assert args.concurrency == [1, 3] and args.protocols == ["grpc"] and args.contenders == ["packed", "triton"]
    variants = bench.triton_variants(args)
    assert variants[0] == bench_perf.TritonVariant(0, 2, 1, None, quantize="none")
    assert variants[1].tokenizer_threads == 1 and variants[1].queue_delay_us is not None  # config.pbtxt's delay
    assert variants[0].label() == "delay=0us inst=2 thr=1"
    assert args.infinity_arg == ["--compile"]
    for bad in (["--concurrency", "0"], ["--protocols", "udp"], ["--contenders", "vllm"]):
        with pytest.raises(SystemExit):
            _parse(bad)
    with pytest.raises(ValueError):
        bench_perf.parse_variant("delay=x", 2)
    with pytest.raises(ValueError, match="q=none|int8"):
        bench_perf.parse_variant("q=int4", 2)
    # --quantize is every contender's; a variant's q= is its own.
    args = _parse(["--quantize", "int8", "--triton-variant", "mbt=4096", "--triton-variant", "q=none"])
    assert [v.quantize for v in bench.triton_variants(args)] == ["int8", "none"]
    assert bench.triton_variants(args)[0].label().endswith("mbt=4096 int8")
    assert bench_perf.parse_variant("compile=1", 2).label().endswith("compiled")
    openvino = bench_perf.parse_variant("mbt=4096,engine=openvino", 2)
    assert openvino.engine == "openvino" and openvino.label().endswith("mbt=4096 openvino")
    assert bench_perf.parse_variant("mbt=4096", 2).engine == "packed"
    int8 = bench_perf.parse_variant("engine=openvino,q=int8,dtype=float32", 2)
    assert (int8.dtype, int8.label()) == ("float32", "inst=1 thr=2 int8 openvino float32")
    assert bench_perf.parse_variant("mbt=4096", 2).dtype is None
    with pytest.raises(ValueError, match="dtype=auto|float32"):
        bench_perf.parse_variant("dtype=fp8", 2)
    with pytest.raises(ValueError, match="engine=packed|hf|openvino"):
        bench_perf.parse_variant("engine=onnx", 2)
    assert bench.triton_variants(_parse(["--quantize", "int8"]))[0].quantize == "int8"


def test_perf_csv_parsing_and_command():
    points = bench_perf.parse_perf_csv(PERF_CSV)
    assert [p.concurrency for p in points] == [1, 4]
    first = points[0]
    assert first.infer_per_s == pytest.approx(3.9968) and first.p50_us == 18323 and first.p99_us == 24146
    assert first.server_queue_us == 2 and first.server_infer_us == 13413
    assert first.avg_us == 13 + 2365 + 2 + 102 + 13413 + 788 + 5  # the sum of the components
    with pytest.raises(ValueError, match="not a perf_analyzer CSV"):
        bench_perf.parse_perf_csv("a,b\n1,2\n")

    settings = bench_perf.PerfSettings(request_count=16)
    cmd = bench_perf.perf_command("pa", "127.0.0.1:1", "grpc", Path("in.json"), 8, Path("o.csv"), settings)
    assert cmd[:7] == ["pa", "-m", "reranker", "-u", "127.0.0.1:1", "-i", "grpc"]
    assert cmd[cmd.index("--concurrency-range") + 1] == "8" and cmd[cmd.index("--request-count") + 1] == "16"
    windows = bench_perf.perf_command("pa", "h:1", "http", Path("in.json"), 2, Path("o.csv"),
                                      bench_perf.PerfSettings(request_count=0, measurement_interval_ms=4000))
    assert "--request-count" not in windows and windows[windows.index("--measurement-interval") + 1] == "4000"
    with pytest.raises(ValueError):
        bench_perf.perf_command("pa", "h:1", "udp", Path("in.json"), 1, Path("o.csv"), settings)


def test_profile_export_gives_exact_throughput():
    ms = 1_000_000
    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 2}, "requests": [
        {"timestamp": 0, "response_timestamps": [100 * ms], "request_inputs": {"QUERY": "q"}},
        {"timestamp": 0, "response_timestamps": [200 * ms]},
        {"timestamp": 100 * ms, "response_timestamps": [300 * ms]},
        {"timestamp": 200 * ms, "response_timestamps": [400 * ms]},
        {"timestamp": 300 * ms, "response_timestamps": []},  # no answer: not counted
    ], "window_boundaries": [0, 1000 * ms]}], "version": "2.51.0"}
    raw = json.dumps(export).encode().replace(b'"q"', b'"\xf9"')  # raw BYTES inputs, not UTF-8
    records = bench_perf.parse_profile_export(raw)
    assert records == [(0, 100 * ms), (0, 200 * ms), (100 * ms, 300 * ms), (200 * ms, 400 * ms)]
    point = bench_perf.point_from_records(2, records, bench_perf.parse_perf_csv(PERF_CSV)[0])
    assert point.infer_per_s == pytest.approx(4 / 0.4) and point.p50_us == pytest.approx(200_000)
    assert point.avg_us == pytest.approx(175_000) and point.server_infer_us == 13413


def test_metrics_give_step_times():
    text = "\n".join([
        "# HELP nv_inference_request_success Number of successful inference requests",
        'nv_inference_request_success{model="reranker",version="1"} 4',
        'nv_inference_request_success{model="tokenizer",version="1"} 4',
        'nv_inference_compute_infer_duration_us{model="tokenizer",version="1"} 24000',
        'nv_inference_compute_infer_duration_us{model="cross_encoder",version="1"} 1000000',
        'rerank_compute_seconds_total{model="cross_encoder",version="1"} 0.9',
        'nv_gpu_utilization{gpu_uuid="x"} 0',
    ])
    after = bench_perf.parse_metrics(text)
    assert after[("nv_inference_request_success", "reranker")] == 4 and len(after) == 5
    before = {("nv_inference_request_success", "reranker"): 2.0,
              ("nv_inference_compute_infer_duration_us", "tokenizer"): 12000.0,
              ("rerank_compute_seconds_total", "cross_encoder"): 0.4}
    times = bench_perf.step_times(before, after)
    assert times.requests == 2 and times.tokenizer_ms == pytest.approx(6.0) and times.encoder_ms == pytest.approx(250)
    assert bench_perf.step_times(after, after) is None


def test_queue_delay_and_rendered_repository(tmp_path, monkeypatch):
    monkeypatch.setattr("triton_rerank.models.dtypes.cpu_flags", lambda: {"avx512_vnni"})  # int8 renders anywhere
    from google.protobuf import text_format
    from tritonclient.grpc.model_config_pb2 import ModelConfig, ModelInstanceGroup

    def parse(model: str) -> ModelConfig:
        return text_format.Parse((repo / model / "config.pbtxt").read_text(), ModelConfig())

    spec = bench_perf.ServerSpec(tmp_path / "model", bench_perf.TritonVariant(500, 2, 1, quantize="int8"),
                                 device="cpu", max_batch_tokens=4096)
    repo = bench_perf.render_repository(spec, tmp_path / "repo")
    config = parse("cross_encoder")
    assert config.parameters["quantize"].string_value == "int8"
    assert bench_perf.configured_queue_delay(repo) == 500 == config.dynamic_batching.max_queue_delay_microseconds
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["num_threads"].string_value == "1"
    assert config.parameters["max_batch_tokens"].string_value == "4096"
    assert parse("tokenizer").dynamic_batching.max_queue_delay_microseconds == 0  # only the encoder waits
    # No delay in the variant: the one in the packaged config.pbtxt, which is what configured_queue_delay reads.
    spec = bench_perf.ServerSpec(tmp_path / "model", bench_perf.TritonVariant(None, 1, 1))
    repo = bench_perf.render_repository(spec, tmp_path / "repo")
    assert bench_perf.configured_queue_delay(repo) == bench_perf.configured_queue_delay()
    assert parse("cross_encoder").parameters["engine"].string_value == "packed"
    spec = bench_perf.ServerSpec(tmp_path / "model", bench_perf.TritonVariant(None, 1, 1, engine="openvino"))
    repo = bench_perf.render_repository(spec, tmp_path / "repo")
    assert parse("cross_encoder").parameters["engine"].string_value == "openvino"


def test_workloads_and_input_data(tmp_path):
    records = [{"qid": "1", "query": "q one", "candidates": [{"text": f"doc {i}"} for i in range(30)]},
               {"qid": "2", "query": "q two", "candidates": [{"text": "only"}]}]
    path = tmp_path / "dl19.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    requests = bench_workload.dl19_requests(path, docs_per_request=20)
    assert [len(r.documents) for r in requests.requests] == [20, 1] and requests.num_pairs == 21
    assert requests.requests[0].documents[:2] == ("doc 0", "doc 1") and "2 queries x top 20" in requests.source
    assert len(bench_workload.dl19_requests(path, 5, max_queries=1).requests) == 1

    data = json.loads(write_input_data(tmp_path / "input.json", requests.as_tuples()).read_text())["data"]
    assert data[0]["QUERY"] == ["q one"] and data[0]["DOCUMENTS"]["shape"] == [20]
    assert data[1]["DOCUMENTS"] == {"content": ["only"], "shape": [1]}

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": {"[CLS]": 0, "##ing": 1, "panda": 2, "bear": 3, "a": 4,
                                                         "forest": 5}}}))
    words = bench_workload.vocabulary_words(tokenizer)
    assert words == ["bear", "forest", "panda"]
    synthetic = bench_workload.synthetic_requests(words, 3, 4, query_tokens=2, doc_tokens=7, seed=1)
    assert synthetic.num_pairs == 12 and all(len(d.split()) == 7 for r in synthetic.requests for d in r.documents)
    assert synthetic.requests == bench_workload.synthetic_requests(words, 3, 4, 2, 7, seed=1).requests
    assert bench_workload.parse_synthetic("q=8,d=200,n=10") == {"query_tokens": 8, "doc_tokens": 200,
                                                               "docs_per_request": 10, "num_requests": 40}
    with pytest.raises(ValueError):
        bench_workload.parse_synthetic("q=0")


def _rows() -> list[bench_report.Row]:
    R = bench_report.Row
    triton = "tritonserver ensemble"
    return [
        R("hf-padded", "in-process", "offline", 0, "bs=32", "transformers", 43, 2.0, 40.0),
        R("hf-padded", "in-process", "latency", 1, "bs=32", "transformers", 10, 2.5, 50.0, 400.0, 420.0, 401.0),
        R("packed", "in-process", "offline", 0, "thr=2", "PackedEngine", 43, 3.5, 70.0),
        R("packed", "in-process", "latency", 1, "thr=2", "PackedEngine", 10, 4.0, 80.0, 250.0, 260.0, 251.0, 3.5,
          247.0),
        R("triton-grpc", "server", "sweep", 1, "delay=0us", triton, 16, 3.9, 78.0, 253.0, 270.0, 255.0, 6.0, 245.0,
          4.0),
        R("triton-grpc", "server", "sweep", 4, "delay=0us", triton, 16, 3.2, 64.0, 1200.0, 1300.0, 1210.0),
        R("infinity-http", "server", "sweep", 1, "bs=32", "infinity", 16, 1.5, 30.0, 600.0, 650.0, 610.0),
        R("infinity-http", "server", "sweep", 4, "bs=32", "infinity", 16, 2.0, 40.0, 1900.0, 2000.0, 1950.0),
        R("triton-grpc", "server", "paired", 1, "delay=0us", "tritonclient", 16, 3.9, 78.0, 254.0, 270.0, 255.0),
        R("packed", "in-process", "paired", 1, "paired with [delay=0us]", "PackedEngine", 16, 4.0, 80.0, 250.5,
          260.0, 251.0),
    ]


def _info() -> bench_report.RunInfo:
    return bench_report.RunInfo("vm", "Xeon (avx512)", 2, "2.13.0", "minilm (bert, 6 layers)", "float32", "cpu",
                                "dl19 (43 queries x top 20)", 20, "abc1234-dirty", "2026-01-01 00:00 UTC", "bench")


def test_targets():
    got = {t.name.split("] ")[1]: t for t in bench_report.targets(_rows())}
    assert got["vs HF padded in-process"].measured == pytest.approx(78 / 40) and got["vs HF padded in-process"].met
    assert got["vs Infinity (best)"].measured == pytest.approx(78 / 40) and got["vs Infinity (best)"].met
    assert got["vs packed in-process"].measured == pytest.approx(78 / 70) and got["vs packed in-process"].met
    latency = got["p50 at concurrency 1 minus in-process"]
    assert latency.measured == pytest.approx(3.0) and latency.met
    overhead = got["serving overhead of one request"]
    assert overhead.measured == pytest.approx(4.0) and overhead.met and "tokenizer step 6.0" in overhead.detail
    added = got["latency added by serving one request"]
    assert added.measured == pytest.approx(4.0 + 6.0 - 3.5) and not added.met
    paired = got["p50 of one request minus in-process, alternating"]
    assert paired.measured == pytest.approx(3.5) and paired.met and "interleaved" in paired.detail


def test_aggregate_takes_medians_over_runs():
    import dataclasses

    rows = _rows()
    runs = [dataclasses.replace(r, run=1) for r in rows] + [
        dataclasses.replace(r, run=2, pairs_per_s=r.pairs_per_s * 2) for r in rows] + [
        dataclasses.replace(r, run=3, pairs_per_s=r.pairs_per_s * 3) for r in rows]
    merged = bench_report.aggregate(runs)
    assert len(merged) == len(rows)
    assert [(m.contender, m.measure, m.concurrency) for m in merged] == [(r.contender, r.measure, r.concurrency)
                                                                         for r in rows]
    assert all(m.runs == 3 and m.run == 0 for m in merged)
    assert merged[0].pairs_per_s == 2 * rows[0].pairs_per_s and merged[0].requests == 3 * rows[0].requests
    assert merged[1].p50_ms == rows[1].p50_ms and merged[0].p50_ms is None
    each = bench_report.per_run_targets(runs)
    assert each["triton-grpc [delay=0us] vs HF padded in-process"] == pytest.approx([78 / 40] * 3)
    text = bench_report.markdown(merged, _info(), None, None, runs)
    assert "| 1.95, 1.95, 1.95 |" in text


def test_report_files(tmp_path):
    rows, info = _rows(), _info()
    bench_report.write_csv(tmp_path / "bench.csv", rows, info)
    with open(tmp_path / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for column in ("contender", "concurrency", "runs", "pairs_per_s", "p50_ms", "p99_ms", "machine", "cpu", "model",
                   "dtype", "backend", "commit", "workload"):
        assert column in table[0]
    assert {r["commit"] for r in table} == {"abc1234-dirty"} and table[4]["pairs_per_s"] == "78.0"

    text = bench_report.markdown(rows, info, "bench.png", ["a note"])
    for name in ("hf-padded", "packed", "triton-grpc", "infinity-http", "abc1234-dirty", "Xeon", "float32",
                 "minilm", "![throughput", "a note", "## Targets"):
        assert name in text
    png = bench_report.write_plot(tmp_path / "bench.png", rows, info)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_machine_and_commit():
    assert bench_report.usable_cores() >= 1 and bench_report.cpu_model()
    commit = bench_report.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) >= 7


def test_infinity_command_and_skip(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    settings = bench_peer.InfinitySettings(python=str(python), batch_size=16, threads=2, extra_args=("--compile",))
    cmd = bench_peer.infinity_command(settings, Path("/m"), 7997)
    assert cmd[:4] == [str(python), "-m", "infinity_emb.cli", "v2"]  # no infinity_emb script: module
    (python.parent / "infinity_emb").write_text("")
    cmd = bench_peer.infinity_command(settings, Path("/m"), 7997)
    assert cmd[:2] == [str(python.parent / "infinity_emb"), "v2"]
    for flag, value in (("--model-id", "/m"), ("--engine", "torch"), ("--device", "cpu"), ("--batch-size", "16"),
                        ("--port", "7997"), ("--host", "127.0.0.1"), ("--dtype", "float32")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-model-warmup" in cmd and cmd[-1] == "--compile"
    assert bench_peer.infinity_prefix(bench_peer.InfinitySettings(command="/opt/inf run")) == ["/opt/inf", "run"]
    env = bench_peer.infinity_environment(settings)
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert bench_peer.rerank_body("q", ("a", "b")) == {"model": bench_peer.SERVED_NAME, "query": "q",
                                                      "documents": ["a", "b"], "return_documents": False}

    notes: list[str] = []
    assert bench.infinity_settings(_parse(["--contenders", "infinity"]), notes) is None
    assert "Infinity skipped" in notes[0] and "pip install" in notes[0]
    with pytest.raises(FileNotFoundError):
        bench_peer.infinity_prefix(bench_peer.InfinitySettings(python=str(tmp_path / "nope")))


def test_http_load_generator():
    """drive_http against a local asyncio HTTP server: counts, concurrency and latencies."""
    import asyncio
    import threading

    in_flight = {"now": 0, "max": 0}

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed its connection
                return
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            await asyncio.sleep(0.02)
            in_flight["now"] -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        result = bench_peer.drive_http(f"http://127.0.0.1:{port}/rerank", [{"a": 1}, {"b": 2}], concurrency=3,
                                       count=9)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert result.requests == 9 and len(result.latencies_s) == 9 and in_flight["max"] == 3
    assert all(lat >= 0.015 for lat in result.latencies_s) and 0 < result.requests_per_s < 9 / 0.05


def test_bench_model_without_shared_data(tmp_path):
    """No data folder: the MiniLM-L6 shape from the built-in config, with a generated tokenizer."""
    from triton_rerank.bench.random_model import build_bench_model, describe_model, model_sources

    empty = tmp_path / "data"
    empty.mkdir()
    assert model_sources(empty)["tokenizer"].startswith("generated")
    model = build_bench_model(tmp_path / "model", data_dir=empty)
    config = json.loads((model / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (6, 384, 12)
    assert config["vocab_size"] < 30522 and (model / "tokenizer.json").is_file()
    assert json.loads((model / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    assert "6 layers, hidden 384" in describe_model(model)
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert build_bench_model(tmp_path / "model", data_dir=empty) == model  # reused, not rebuilt
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp


def test_peers_are_asked_for_and_skipped_with_a_note_without_their_venv(tmp_path):
    assert "peers" not in _parse([]).contenders  # not by default: they need a venv of their own
    args = _parse(["--contenders", "peers", "--peers", "st-onnx-int8,st-openvino", "--peer-batch-size", "8"])
    assert args.contenders == ["peers"] and args.peers == ["st-onnx-int8", "st-openvino"] and args.peer_batch_size == 8
    with pytest.raises(SystemExit):
        _parse(["--peers", "st-vllm"])
    notes = []
    assert bench.peers(args, tmp_path, None, tmp_path, print, notes) == []
    assert bench.peers(args, tmp_path, None, tmp_path, print, notes) == []
    assert len(notes) == 1 and "peers skipped: pass --peer-python" in notes[0] and "sentence-transformers" in notes[0]
