"""`triton-rerank serve`: the model repository, rendered for one model, on the bundled tritonserver."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from pathlib import Path

from triton_rerank.client.launcher import (
    LauncherError,
    RepositorySettings,
    ServerAddress,
    TritonServer,
    render_model_repository,
)
from triton_rerank.serving.model_files import ModelNotFoundError, resolve_model_path


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop


def run(args) -> int:
    try:
        model_dir = resolve_model_path(args.model_path, progress=True)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    temporary = args.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="triton-rerank-") if temporary else args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = RepositorySettings(
        model_path=str(model_dir), device=args.device, dtype=args.dtype, engine=args.engine,
        attention_backend=args.attention_backend or "", max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens, instances=args.instances, num_threads=args.num_threads,
    )
    repository = render_model_repository(settings, run_dir / "model_repository")
    address = ServerAddress(args.host, args.http_port, args.grpc_port, args.metrics_port)
    server = TritonServer(repository, run_dir, address, extra_args=[f"--log-verbose={args.log_verbose}"])
    # SIGTERM (docker stop, systemd) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_stop)
    print(f"starting tritonserver for {model_dir} (log: {server.log_file})", flush=True)
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        print(ready_banner(address), flush=True)
        return_code = server.process.wait()
        print(f"tritonserver exited with code {return_code}; last lines of its log:\n{server.log_tail()}",
              file=sys.stderr)
        return return_code or 1
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)


def ready_banner(address: ServerAddress) -> str:
    host = address.host if address.host not in ("0.0.0.0", "::") else "127.0.0.1"
    http = f"http://{host}:{address.http_port}"
    return "\n".join([
        "triton-rerank is ready:",
        f"  HTTP     {http}  (KServe v2; model 'reranker')",
        f"  gRPC     {host}:{address.grpc_port}",
        f"  metrics  http://{host}:{address.metrics_port}/metrics",
        "try:",
        f"  curl -s {http}/v2/models/reranker/generate -d "
        "'{\"QUERY\": \"what is panda?\", \"DOCUMENTS\": [\"hi\", \"The giant panda is a bear native to China.\"]}'",
        "Ctrl-C stops the server.",
    ])
