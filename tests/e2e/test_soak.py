"""A bounded soak (under a minute): good, bad and hostile requests; every good answer right, memory flat."""

import json

from triton_rerank.bench.soak import run_soak


def test_soak_has_no_unexpected_outcome_and_bounded_memory(tiny_model_dirs, start_extra_server, tmp_path):
    running = start_extra_server(tiny_model_dirs["bert"], "bert")
    # The warm-up covers torch's first allocations for the range of batch shapes.
    report = run_soak(running.grpc_url, duration=30, concurrency=6, server_pgid=running.server.process.pid,
                      warmup=15)
    (tmp_path / "soak.json").write_text(json.dumps(report.as_dict(), indent=2))
    print(json.dumps(report.as_dict()))
    assert report.unexpected == 0, report.outcomes
    # "unexpected" includes a good request answered with scores other than its own alone.
    assert report.outcomes["ok"] > 50 and report.outcomes["invalid_refused"] > 0
    assert report.outcomes["hostile_refused"] > 0
    growth = report.rss_at_end - report.rss_after_warmup
    assert report.rss_after_warmup > 0
    # Allocator noise is a few MB; a leak of request data would grow with the ~thousand requests.
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"
