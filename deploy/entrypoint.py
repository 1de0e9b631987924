#!/usr/bin/env python3
"""Entry point of the GPU image: render the model repository for this container, then exec tritonserver.

The repository is the project's own model_repository/ (copied into the image), rendered by the
same `render_model_repository` that `triton-rerank serve` and the tests use, so the container
serves exactly what the tests serve. The model is resolved first (a local directory, or a Hugging
Face id downloaded once into HF_HOME), so the backend stubs all read one local snapshot.

Every setting comes from an environment variable (what docker-compose.yml passes) or the flag of
the same name; anything after `--` goes to tritonserver as is. `--render-only` renders, prints the
tritonserver command and exits (tests, and a look at what a container would run).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from triton_rerank.launcher.server import LauncherError, RepositorySettings, render_model_repository
from triton_rerank.serving.model_files import ModelNotFoundError, resolve_model_path

# Where the Dockerfile copies the project's model_repository/.
IMAGE_SOURCE = "/opt/triton-rerank/model_repository"
DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value.strip() else default


def parse_gpus(text: str) -> list[int]:
    """'0,1' or '0 1' -> [0, 1]; '' or 'all' -> [] (every GPU the container sees)."""
    text = text.strip()
    if text in ("", "all"):
        return []
    try:
        gpus = [int(part) for part in re.split(r"[,\s]+", text) if part]
    except ValueError:
        raise ValueError(f"GPUS must be comma-separated GPU indices like 0,1 (or empty for all), got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"GPUS must list distinct non-negative GPU indices, got {text!r}")
    return gpus


def instance_group(count: int, device: str, gpus: list[int]) -> str:
    """The cross_encoder's instance_group line.

    KIND_GPU without `gpus` places `count` instances on every GPU the container sees; with
    `gpus: [ ... ]`, `count` instances on each GPU listed. KIND_CPU: `count` CPU instances.
    Left out (device auto), Triton picks GPU when it sees one.
    """
    body = f"count: {count}"
    if device == "cuda":
        body += ", kind: KIND_GPU" + (f", gpus: [ {', '.join(map(str, gpus))} ]" if gpus else "")
    elif device == "cpu":
        body += ", kind: KIND_CPU"
    return f"instance_group [ {{ {body} }} ]"


def check(args: argparse.Namespace) -> list[int]:
    """The GPU list, after checking the settings that do not need the model."""
    gpus = parse_gpus(args.gpus)
    if gpus and args.device != "cuda":
        raise ValueError(f"GPUS={args.gpus!r} needs DEVICE=cuda, got DEVICE={args.device}")
    if args.instances < 1:
        raise ValueError(f"INSTANCES must be at least 1, got {args.instances}")
    source, target = Path(args.source).resolve(), Path(args.target).resolve()
    if not (source / "reranker" / "config.pbtxt").is_file():
        raise ValueError(f"{source} is not the reranker model repository")
    if target == source or target in source.parents:
        raise ValueError(f"the rendered copy ({target}) must not replace its source ({source})")
    return gpus


def render(args: argparse.Namespace, model_path: str) -> Path:
    """Renders the repository with the project's renderer, then sets the cross_encoder placement."""
    gpus = check(args)
    settings = RepositorySettings(
        model_path=model_path,
        # For GPU instances the encoder's `device` parameter stays "auto": each instance then runs on
        # the GPU Triton placed it on (model_instance_device_id). "cuda" would mean cuda:0 for all.
        device="cpu" if args.device == "cpu" else "auto",
        dtype=args.dtype,
        engine=args.engine,
        attention_backend=args.attention_backend,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        instances=args.instances,
        num_threads=args.num_threads,
    )
    target = render_model_repository(settings, Path(args.target), source=Path(args.source))
    config = target / "cross_encoder" / "config.pbtxt"
    text, n = re.subn(r"instance_group \[.*\]", instance_group(args.instances, args.device, gpus), config.read_text())
    if n != 1:
        raise LauncherError(f"{config} has no single-line instance_group to set")
    config.write_text(text)
    return target


def server_command(args: argparse.Namespace, repository: Path, extra: list[str]) -> list[str]:
    return [
        "tritonserver",
        f"--model-repository={repository}",
        # Models are fixed at start: no load/unload API for whoever reaches the port.
        "--model-control-mode=none",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=15",
        f"--http-port={args.http_port}",
        f"--grpc-port={args.grpc_port}",
        f"--metrics-port={args.metrics_port}",
        *shlex.split(args.triton_args),
        *extra,
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Render the reranker model repository for this container and exec tritonserver. "
        "Each flag defaults to the environment variable in capitals (e.g. --max-batch-tokens <- MAX_BATCH_TOKENS); "
        "arguments after -- are passed to tritonserver.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", default=_env("MODEL_PATH", DEFAULT_MODEL),
                   help="model directory inside the container (e.g. /models) or Hugging Face id")
    p.add_argument("--device", choices=["cuda", "cpu", "auto"], default=_env("DEVICE", "cuda"),
                   help="cuda: KIND_GPU instances; cpu: KIND_CPU; auto: Triton decides")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=_env("DTYPE", "auto"),
                   help="cross-encoder precision; auto = float16 on GPU")
    p.add_argument("--engine", choices=["packed", "hf"], default=_env("ENGINE", "packed"))
    p.add_argument("--attention-backend", choices=["", "triton", "sdpa"], default=_env("ATTENTION_BACKEND", ""),
                   help="empty = triton on GPU, sdpa on CPU")
    p.add_argument("--max-length", type=int, default=_env("MAX_LENGTH", "0"))
    p.add_argument("--max-batch-tokens", type=int, default=_env("MAX_BATCH_TOKENS", "0"))
    p.add_argument("--instances", type=int, default=_env("INSTANCES", "1"),
                   help="cross_encoder instances per GPU (per listed GPU with --gpus)")
    p.add_argument("--gpus", default=_env("GPUS", ""),
                   help="GPU indices for the cross_encoder instances, e.g. 0,1; empty = every visible GPU")
    p.add_argument("--num-threads", type=int, default=_env("NUM_THREADS", "0"))
    p.add_argument("--source", default=_env("MODEL_REPOSITORY_SOURCE", IMAGE_SOURCE),
                   help="the model repository to render (the project's model_repository/)")
    p.add_argument("--target", default=_env("MODEL_REPOSITORY", "/tmp/model_repository"),
                   help="where the rendered repository goes")
    p.add_argument("--http-port", type=int, default=_env("TRITON_HTTP_PORT", "8000"))
    p.add_argument("--grpc-port", type=int, default=_env("TRITON_GRPC_PORT", "8001"))
    p.add_argument("--metrics-port", type=int, default=_env("TRITON_METRICS_PORT", "8002"))
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
        check(args)
        model_dir = resolve_model_path(args.model_path, progress=True)
        repository = render(args, str(model_dir))
    except (ModelNotFoundError, LauncherError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = server_command(args, repository, extra)
    print(f"model {args.model_path} -> {model_dir}; repository {repository}", flush=True)
    print(shlex.join(command), flush=True)
    if args.render_only:
        return 0
    os.execvp(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
