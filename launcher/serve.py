"""`triton-rerank serve`: the model repository, rendered for one model, on the bundled tritonserver,
with the HTTP rerank gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank, NIM /v1/ranking,
vLLM /score) in front of it."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from ..gateway.command import add_gateway_options, gateway_settings
from ..gateway.settings import GatewayStartError
from ..models.dtypes import DTYPE_NAMES, QUANTIZE_NAMES, auto_dtype
from ..models.families import ENGINE_CHOICES
from ..serving.model_files import ModelNotFoundError, resolve_model_path
from .errors import LauncherError
from .repository import (
    RepositorySettings,
    add_decoder_options,
    add_long_document_options,
    render_model_repository,
)
from .restart import ServerKeeper, add_restart_options, restart_policy
from .server import ServerAddress, StopRequested, TritonServer, free_ports, loopback, stop_on_signals

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start tritonserver with the reranker ensemble, and the HTTP rerank gateway",
        description="Resolve the model (local directory or Hugging Face id), render a run copy of the model "
        "repository with its parameters, start the bundled tritonserver and wait until it is ready, then start "
        "the HTTP gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank, NIM /v1/ranking, vLLM /score) "
        "on --api-port unless --no-api. "
        "KServe v2 over HTTP (tritonclient.http) is on --http-port, answered by the gateway, which checks "
        "every request before Triton sees it; tritonserver's own HTTP frontend listens on loopback only "
        "(--triton-http-port), since one malformed request can crash it (tritonserver 2.51). "
        "A tritonserver that exits on its own is restarted (bounded: --max-restarts, --restart-window); "
        "meanwhile the gateway answers 503 with Retry-After. "
        "Ctrl-C or SIGTERM stops the gateway, the server and every backend process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", default=DEFAULT_MODEL, help="model directory or Hugging Face repo id")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the cross-encoder runs; auto = GPU when Triton sees one")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="cross-encoder precision; auto = float16 on GPU, on CPU bfloat16 where it has AMX or "
                        "AVX512-BF16, else float32")
    p.add_argument("--quantize", choices=QUANTIZE_NAMES, default="none",
                   help="int8: the cross-encoder's linears in int8 on the CPU's VNNI or AMX-INT8 instructions, the "
                        "rest in --dtype; CPUs only. The packed engine: weights per channel, activations per "
                        "token, compiled at start (seconds). --engine openvino: activation ranges calibrated at "
                        "start on synthetic pairs (seconds); fastest with --dtype float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the cross-encoder's layers at start (seconds; fuses norms, GELU and casts "
                        "around the matmuls; needs a C++ compiler); --quantize int8 always compiles")
    p.add_argument("--attention-backend", choices=["triton", "sdpa"], default=None,
                   help="attention of the packed encoder; default triton on GPU, sdpa on CPU")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="auto (default) = openvino for a cross-encoder on the CPU (float32 or bfloat16, without "
                        "--quantize or --compile), else packed; packed = our unpadded encoder; hf = transformers "
                        "reference (padded); openvino = cross-encoders on OpenVINO, CPU only")
    p.add_argument("--max-length", type=int, default=0,
                   help="max tokens of a (query, document) pair; 0 = the model's limit")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="token budget of one encoder forward; 0 = 4096 on CPU, 16384 on GPU, 1024 for the openvino "
                        "engine")
    add_long_document_options(p)
    add_decoder_options(p)
    p.add_argument("--instances", type=int, default=1, help="cross_encoder model instances")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads per CPU instance; 0 = torch default")
    p.add_argument("--host", default="127.0.0.1", help="address every listener binds (0.0.0.0 to expose)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="KServe v2 HTTP (inference of 'reranker', health, metadata), served by the gateway; "
                   "with --no-api, tritonserver's own HTTP frontend")
    p.add_argument("--triton-http-port", type=int, default=0,
                   help="port of tritonserver's own HTTP frontend, on 127.0.0.1 only (the gateway and the "
                   "launcher use it); 0 = any free port")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--run-dir", default=None, help="where the rendered model repository and logs go; "
                   "default a temporary directory removed at exit")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    add_restart_options(p.add_argument_group("restarts of tritonserver after it exits on its own"))
    g = p.add_argument_group(
        "HTTP gateway (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank, NIM /v1/ranking, vLLM /score)")
    g.add_argument("--api-port", type=int, default=30000, help="port of the gateway")
    g.add_argument("--api-host", default=None, help="address the gateway binds; default --host")
    g.add_argument("--no-api", action="store_true", help="start tritonserver only, no gateway")
    add_gateway_options(g)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        model_dir = resolve_model_path(args.model_path, progress=True)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        policy = restart_policy(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    temporary = args.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="triton-rerank-") if temporary else args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = RepositorySettings(
        model_path=str(model_dir), device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
        engine=args.engine,
        attention_backend=args.attention_backend or "", max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens, instances=args.instances, num_threads=args.num_threads,
        # One limit for every door: the gateway's, the tokenizer step's and the scoring step's.
        max_documents=args.max_documents,
        long_documents=args.long_documents, max_chunks_per_doc=args.max_chunks_per_doc,
        reranker_kind=args.reranker_kind, prompt_template=args.chat_template or "",
        default_instruction=args.default_instruction or "", prefix_sharing=args.prefix_sharing,
    )
    address = server_address(args)
    try:
        repository = render_model_repository(settings, run_dir / "model_repository")
        server = TritonServer(repository, run_dir, address, extra_args=[f"--log-verbose={args.log_verbose}"])
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    # SIGTERM (docker stop, systemd) takes the same clean path as Ctrl-C.
    stop_on_signals()
    linears = ("" if args.quantize == "none" else f", {args.quantize} linears") + (
        ", compiled" if args.engine != "openvino" and (args.compile or args.quantize != "none") else "")
    print(f"starting tritonserver for {model_dir}, encoder {encoder_precision(args.device, args.dtype)}{linears} "
          f"(log: {server.log_file})", flush=True)
    gateway = None
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        if not args.no_api:
            gateway = _gateway(args, address)
            gateway.start()
        print(ready_banner(address, gateway.settings if gateway else None), flush=True)
        # From here on, until Ctrl-C or SIGTERM: the gateway keeps answering (503 while Triton is
        # down) and the server is restarted whenever it ends; the keeper returns when it gives up.
        return ServerKeeper(server, policy, args.ready_timeout).run()
    except (LauncherError, GatewayStartError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, StopRequested):
        print("stopping the gateway and tritonserver ..." if gateway else "stopping tritonserver ...", flush=True)
        return 0
    finally:
        # The gateway first, so that requests it is still answering reach a live Triton.
        if gateway is not None:
            gateway.stop()
        server.stop()
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)


def server_address(args) -> ServerAddress:
    """Where tritonserver listens. Under the gateway its HTTP frontend is on loopback, on
    --triton-http-port (any free port by default), and --http-port is the gateway's; gRPC and
    metrics on --host as asked. With --no-api, all of them as asked."""
    if args.no_api:
        return ServerAddress(args.host, args.http_port, args.grpc_port, args.metrics_port)
    port = args.triton_http_port or free_ports(1)[0]
    return ServerAddress(args.host, port, args.grpc_port, args.metrics_port, http_host="127.0.0.1")


def _gateway(args, address: ServerAddress):
    """The HTTP gateway, in a thread of this process: stopping `serve` cannot leave it running.

    It listens on --api-port and on --http-port, where it is the KServe v2 front of Triton
    (inference of 'reranker' checked by the gateway, health and metadata asked of Triton's
    loopback HTTP frontend)."""
    from ..gateway.server import GatewayThread

    # Access logs would flood the console of an interactive `serve`; warnings and errors still show.
    settings = gateway_settings(args, address.grpc_url, args.api_host or args.host, args.api_port, "warning",
                                default_model_name=args.model_path, triton_http_url=address.local_http_url,
                                kserve_port=args.http_port)
    return GatewayThread(settings)


def encoder_precision(device: str, dtype: str) -> str:
    """The encoder's dtype as the startup line tells it: what --dtype auto means here, and why."""
    if dtype != "auto":
        return f"dtype {dtype}"
    cpu, why = auto_dtype("cpu")
    if device == "cpu":
        return f"dtype {cpu} (auto: {why})"
    return f"dtype auto (float16 on a GPU; on this CPU {cpu}: {why})"


def ready_banner(address: ServerAddress, gateway=None) -> str:
    """Where everything listens, and a command to try (SGLang's example when the gateway runs)."""
    lines = ["triton-rerank is ready:"]
    if gateway is not None:
        api = f"http://{loopback(gateway.host)}:{gateway.port}"
        lines.append(f"  rerank API  {api}  (SGLang /v1/rerank, TEI /rerank, Cohere /v2/rerank, NIM /v1/ranking, vLLM /score; docs {api}/docs)")
    if gateway is not None and gateway.kserve_port is not None:
        http = f"http://{loopback(gateway.host)}:{gateway.kserve_port}"
        lines.append(f"  HTTP        {http}  (KServe v2, model 'reranker', through the gateway)")
    else:
        http = f"http://{loopback(address.http_bind)}:{address.http_port}"
        lines.append(f"  HTTP        {http}  (KServe v2, tritonserver's own frontend: keep it off untrusted "
                     "networks, the gateway's front checks requests it does not)")
    lines += [
        f"  gRPC        {loopback(address.host)}:{address.grpc_port}",
        f"  metrics     http://{loopback(address.host)}:{address.metrics_port}/metrics",
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
