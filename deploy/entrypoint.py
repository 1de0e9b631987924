#!/usr/bin/env python3
"""Entry point of the GPU image: render the model repository for this container, then run tritonserver
supervised, exactly as `triton-rerank serve` does.

The repository is the package's own model_repository/ (package data of the installed
triton-rerank), rendered by the renderer `triton-rerank serve` and the tests use; the server runs
with the launcher's one hardened command line (models loaded at start, repository/shared-memory/
trace/logging APIs closed behind a random admin header, exit on a model that fails to load, strict
readiness), under the stub supervisor (a model whose backend process dies is reloaded), restarted
in the container when it exits on its own (the loop `triton-rerank serve` runs, bounded by
MAX_RESTARTS within RESTART_WINDOW seconds; past that the entry point exits with an error and the
container's restart policy takes over), and SIGTERM/SIGINT stop it and every backend process.
The model is resolved first (a local directory, or a Hugging Face id downloaded once into
HF_HOME), so the backend stubs all read one local snapshot.

Every setting comes from an environment variable (what docker-compose.yml passes) or the flag of
the same name; anything after `--` goes to tritonserver as is (it may not change the flags the
launcher sets). `--render-only` renders, prints the tritonserver command and exits (tests, and a
look at what a container would run).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from triton_rerank.launcher.errors import LauncherError
from triton_rerank.launcher.repository import (
    RepositorySettings,
    add_decoder_options,
    add_long_document_options,
    packaged_model_repository,
    render_model_repository,
)
from triton_rerank.launcher.restart import RestartPolicy, ServerKeeper, add_restart_options, restart_policy
from triton_rerank.launcher.serve import DEFAULT_MODEL
from triton_rerank.launcher.server import ServerAddress, StopRequested, TritonServer, stop_on_signals
from triton_rerank.launcher.triton_install import SYSTEM_BACKEND_DIRECTORY, TritonInstall
from triton_rerank.models.dtypes import DTYPE_NAMES, QUANTIZE_NAMES
from triton_rerank.models.families import ENGINE_CHOICES
from triton_rerank.serving.model_files import ModelNotFoundError, resolve_model_path

# --tritonserver value that means the server bundled in the nvidia-pytriton wheel (tests, no image).
BUNDLED = "bundled"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value.strip() else default


def parse_gpus(text: str) -> tuple[int, ...]:
    """'0,1' or '0 1' -> (0, 1); '' or 'all' -> () (every GPU the container sees)."""
    text = text.strip()
    if text in ("", "all"):
        return ()
    try:
        gpus = tuple(int(part) for part in re.split(r"[,\s]+", text) if part)
    except ValueError:
        raise ValueError(f"GPUS must be comma-separated GPU indices like 0,1 (or empty for all), got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"GPUS must list distinct non-negative GPU indices, got {text!r}")
    return gpus


def settings_from(args: argparse.Namespace, model_path: str) -> RepositorySettings:
    """The renderer's settings for this container; checks what does not need the model.

    DEVICE=cuda: KIND_GPU instances, INSTANCES on every GPU the container sees, or on each GPU in
    GPUS; cpu: KIND_CPU; auto: Triton decides.
    """
    gpus = parse_gpus(args.gpus)
    if gpus and args.device != "cuda":
        raise ValueError(f"GPUS={args.gpus!r} needs DEVICE=cuda, got DEVICE={args.device}")
    if args.instances < 1:
        raise ValueError(f"INSTANCES must be at least 1, got {args.instances}")
    settings = RepositorySettings(
        model_path=model_path, device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
        engine=args.engine,
        attention_backend=args.attention_backend, max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens, instances=args.instances, gpus=gpus, num_threads=args.num_threads,
        long_documents=args.long_documents, max_chunks_per_doc=args.max_chunks_per_doc,
        reranker_kind=args.reranker_kind, prompt_template=args.chat_template or "",
        default_instruction=args.default_instruction or "", prefix_sharing=args.prefix_sharing,
    )
    settings.check()
    return settings


def source_of(args: argparse.Namespace):
    """The repository to render: --source, or the one packaged with triton-rerank."""
    return Path(args.source).resolve() if args.source else packaged_model_repository()


def check_target(args: argparse.Namespace) -> None:
    source, target = source_of(args), Path(args.target).resolve()
    if not (source / "reranker" / "config.pbtxt").is_file():
        raise ValueError(f"{source} is not the reranker model repository")
    if isinstance(source, Path) and (target == source or target in source.parents):
        raise ValueError(f"the rendered copy ({target}) must not replace its source ({source})")


def install_of(args: argparse.Namespace) -> TritonInstall:
    if args.tritonserver == BUNDLED:
        return TritonInstall.find()
    return TritonInstall.system(args.tritonserver, args.backend_directory)


def server_for(args: argparse.Namespace, repository: Path, extra: list[str]) -> TritonServer:
    """The supervised server of this container: the launcher's TritonServer, log on stdout."""
    address = ServerAddress(args.host, args.http_port, args.grpc_port, args.metrics_port)
    return TritonServer(repository, repository.parent, address, log_file="-", install=install_of(args),
                        extra_args=[*shlex.split(args.triton_args), *extra], gpu_metrics=args.device != "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Render the reranker model repository for this container and run tritonserver supervised. "
        "Each flag defaults to the environment variable in capitals (e.g. --max-batch-tokens <- MAX_BATCH_TOKENS); "
        "arguments after -- are passed to tritonserver.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", default=_env("MODEL_PATH", DEFAULT_MODEL),
                   help="model directory inside the container (e.g. /models) or Hugging Face id")
    p.add_argument("--device", choices=["cuda", "cpu", "auto"], default=_env("DEVICE", "cuda"),
                   help="cuda: KIND_GPU instances; cpu: KIND_CPU; auto: Triton decides")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default=_env("DTYPE", "auto"),
                   help="cross-encoder precision; auto = float16 on GPU, on CPU bfloat16 where it has AMX or "
                        "AVX512-BF16, else float32")
    p.add_argument("--quantize", choices=QUANTIZE_NAMES, default=_env("QUANTIZE", "none"),
                   help="int8: the cross-encoder's linears in int8 on a CPU's VNNI or AMX-INT8 (DEVICE=cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   default=_env("COMPILE", "false").lower() not in ("false", "0", "no", ""),
                   help="torch.compile the cross-encoder's layers at start (DEVICE=cpu; needs a C++ compiler in the "
                   "image)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default=_env("ENGINE", "auto"),
                   help="auto (openvino for a cross-encoder with DEVICE=cpu, else packed), packed, hf (the "
                   "transformers reference) or openvino (cross-encoders, DEVICE=cpu)")
    p.add_argument("--attention-backend", choices=["", "triton", "sdpa"], default=_env("ATTENTION_BACKEND", ""),
                   help="empty = triton on GPU, sdpa on CPU")
    p.add_argument("--max-length", type=int, default=_env("MAX_LENGTH", "0"))
    p.add_argument("--max-batch-tokens", type=int, default=_env("MAX_BATCH_TOKENS", "0"))
    add_long_document_options(p, _env("LONG_DOCUMENTS", "truncate"), _env("MAX_CHUNKS_PER_DOC", "64"))
    add_decoder_options(p, _env("RERANKER_KIND", "auto"), _env("CHAT_TEMPLATE", ""), _env("DEFAULT_INSTRUCTION", ""),
                        _env("PREFIX_SHARING", "true").lower() not in ("false", "0", "no"))
    p.add_argument("--instances", type=int, default=_env("INSTANCES", "1"),
                   help="cross_encoder instances per GPU (per listed GPU with --gpus)")
    p.add_argument("--gpus", default=_env("GPUS", ""),
                   help="GPU indices for the cross_encoder instances, e.g. 0,1; empty = every visible GPU")
    p.add_argument("--num-threads", type=int, default=_env("NUM_THREADS", "0"))
    p.add_argument("--source", default=_env("MODEL_REPOSITORY_SOURCE", ""),
                   help="the model repository to render; empty = the one packaged with triton-rerank")
    p.add_argument("--target", default=_env("MODEL_REPOSITORY", "/tmp/model_repository"),
                   help="where the rendered repository goes")
    p.add_argument("--host", default=_env("TRITON_HOST", "0.0.0.0"), help="address every listener binds")
    p.add_argument("--http-port", type=int, default=_env("TRITON_HTTP_PORT", "8000"))
    p.add_argument("--grpc-port", type=int, default=_env("TRITON_GRPC_PORT", "8001"))
    p.add_argument("--metrics-port", type=int, default=_env("TRITON_METRICS_PORT", "8002"))
    p.add_argument("--tritonserver", default=_env("TRITONSERVER", "tritonserver"),
                   help=f"the server binary (looked up on PATH); {BUNDLED!r} = the nvidia-pytriton wheel's")
    p.add_argument("--backend-directory", default=_env("TRITON_BACKEND_DIRECTORY", str(SYSTEM_BACKEND_DIRECTORY)),
                   help="the server's backends (unused with --tritonserver bundled)")
    p.add_argument("--ready-timeout", type=float, default=_env("READY_TIMEOUT", "1200"),
                   help="seconds to wait until every model is loaded")
    add_restart_options(p, max_restarts=_env("MAX_RESTARTS", str(RestartPolicy.max_restarts)),
                        window=_env("RESTART_WINDOW", str(RestartPolicy.window)),
                        backoff=_env("RESTART_BACKOFF", str(RestartPolicy.backoff)))
    p.add_argument("--triton-args", default=_env("TRITON_ARGS", ""),
                   help="extra tritonserver arguments, one shell-quoted string (e.g. --log-verbose=1)")
    p.add_argument("--render-only", action="store_true",
                   help="render, print the tritonserver command and exit without starting it")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse leaves defaults (here: from the environment) unchecked
        if action.choices is not None and getattr(args, action.dest) not in action.choices:
            parser.error(f"{action.dest.upper()}={getattr(args, action.dest)!r}: choose from {list(action.choices)}")
    try:
        # Everything that can be checked before the model is downloaded, first.
        policy = restart_policy(args)
        settings_from(args, args.model_path)
        check_target(args)
        repository = Path(args.target).resolve()
        server = server_for(args, repository, extra)
        command = server.command(redact=True)
        model_dir = resolve_model_path(args.model_path, progress=True)
        render_model_repository(settings_from(args, str(model_dir)), repository, source=source_of(args))
    except (ModelNotFoundError, LauncherError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model {args.model_path} -> {model_dir}; repository {repository}", flush=True)
    print(shlex.join(command), flush=True)
    if args.render_only:
        return 0
    return run(server, args.ready_timeout, policy)


def run(server: TritonServer, ready_timeout: float, policy: RestartPolicy) -> int:
    """Starts the server and waits until it is ready; then restarts it whenever it exits on its own,
    as the policy allows, until SIGTERM/SIGINT stop it (0) or the policy gives up (1)."""
    stop_on_signals()
    try:
        server.start()
        server.wait_ready(ready_timeout)
        print(f"tritonserver is ready (HTTP {server.address.http_url}, gRPC {server.address.grpc_url}, "
              f"metrics {server.address.host}:{server.address.metrics_port})", flush=True)
        return ServerKeeper(server, policy, ready_timeout).run()
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, StopRequested):
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
