"""`triton-rerank serve`: the model repository, rendered for one model, on the bundled tritonserver,
with the HTTP rerank gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank) in front of it."""

from __future__ import annotations

import json
import shlex
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
    gateway = None
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        if not args.no_api:
            gateway = _gateway(args, address)
            gateway.start()
        print(ready_banner(address, gateway.settings if gateway else None), flush=True)
        return_code = server.process.wait()
        print(f"tritonserver exited with code {return_code}; last lines of its log:\n{server.log_tail()}",
              file=sys.stderr)
        return return_code or 1
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("stopping the gateway and tritonserver ..." if gateway else "stopping tritonserver ...", flush=True)
        return 0
    finally:
        # The gateway first, so that requests it is still answering reach a live Triton.
        if gateway is not None:
            gateway.stop()
        server.stop()
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)


def _gateway(args, address: ServerAddress):
    """The HTTP gateway, in a thread of this process: stopping `serve` cannot leave it running."""
    from triton_rerank.client.cli import gateway_settings
    from triton_rerank.client.gateway_server import GatewayThread

    # Access logs would flood the console of an interactive `serve`; warnings and errors still show.
    settings = gateway_settings(args, address.grpc_url, args.api_host or args.host, args.api_port, "warning",
                                default_model_name=args.model_path)
    return GatewayThread(settings)


def ready_banner(address: ServerAddress, gateway=None) -> str:
    """Where everything listens, and a command to try (SGLang's example when the gateway runs)."""
    http = f"http://{_reachable(address.host)}:{address.http_port}"
    lines = ["triton-rerank is ready:"]
    if gateway is not None:
        api = f"http://{_reachable(gateway.host)}:{gateway.port}"
        lines.append(f"  rerank API  {api}  (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank; docs {api}/docs)")
    lines += [
        f"  HTTP        {http}  (KServe v2; model 'reranker')",
        f"  gRPC        {_reachable(address.host)}:{address.grpc_port}",
        f"  metrics     http://{_reachable(address.host)}:{address.metrics_port}/metrics",
        "try:",
    ]
    if gateway is not None:
        body = json.dumps({"model": gateway.served_model_name, "query": "what is panda?",
                           "documents": ["hi", "The giant panda is a bear native to China."]})
        auth = " -H 'Authorization: Bearer <your api key>'" if gateway.api_key else ""
        lines.append(f"  curl -s {api}/v1/rerank -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}")
    else:
        lines.append(
            f"  curl -s {http}/v2/models/reranker/generate -d "
            "'{\"QUERY\": \"what is panda?\", \"DOCUMENTS\": [\"hi\", \"The giant panda is a bear native to China.\"]}'")
    lines.append("Ctrl-C stops the server.")
    return "\n".join(lines)


def _reachable(host: str) -> str:
    # A wildcard bind is reached through loopback from this machine.
    return host if host not in ("0.0.0.0", "::") else "127.0.0.1"
