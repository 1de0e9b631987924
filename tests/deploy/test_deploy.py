"""The GPU deployment: docker-compose.yml and deploy/ (image, entry point, load balancer, perf input).

CI runs without a Docker engine or a GPU, so the deployment is checked without
them: the compose file by parsing and by `docker-compose config -q` (Debian's docker-compose 1.29
validates against the Compose Specification schema without an engine), nginx.conf by `nginx -t`,
the image's entry point by rendering the packaged model repository exactly as the container does
and printing the launcher's one hardened command line, and the load balancer live: two replicas,
each the real entry point running the bundled tritonserver (CPU) supervised, behind
deploy/nginx.conf. The tools are Debian packages; tests that need a missing one skip:
`apt-get install docker-compose nginx-light`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_rerank.launcher.repository import (
    RepositorySettings,
    copy_tree,
    packaged_model_repository,
    render_model_repository,
)
from triton_rerank.launcher.restart import RestartPolicy
from triton_rerank.launcher.server import (
    REDACTED_KEY,
    ServerAddress,
    free_ports,
    process_group_alive,
    server_command,
)
from triton_rerank.launcher.supervisor import stub_models

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.py"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3"
# The settings the entry point reads from the environment: kept out of the tests' subprocesses.
ENTRYPOINT_VARIABLES = ["MODEL_PATH", "DEVICE", "DTYPE", "ENGINE", "ATTENTION_BACKEND", "MAX_LENGTH",
                        "MAX_BATCH_TOKENS", "INSTANCES", "GPUS", "NUM_THREADS", "MODEL_REPOSITORY_SOURCE",
                        "MODEL_REPOSITORY", "TRITON_HOST", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT",
                        "TRITON_METRICS_PORT", "TRITONSERVER", "TRITON_BACKEND_DIRECTORY", "READY_TIMEOUT",
                        "TRITON_ARGS"]

_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's `${VAR:-default}` substitution over a parsed file (what the tests below read)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    return value


@pytest.fixture(scope="module")
def compose():
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENTRYPOINT_VARIABLES}
    env.update(values)
    return env


# --- docker-compose.yml -------------------------------------------------------------------------


def test_services_ports_and_gpu_reservation(compose):
    services = compose["services"]
    assert set(services) == {"triton", "lb", "api", "perf"}

    triton = services["triton"]
    assert triton["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile",
                               "args": {"TRITON_IMAGE": TRITON_IMAGE}}
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert triton["shm_size"] == "2gb"
    assert triton["deploy"]["replicas"] == "1"
    # Replicas publish nothing (any number of them can run); the load balancer owns the host ports.
    assert "ports" not in triton and set(triton["expose"]) == {"8000", "8001", "8002"}
    assert triton["environment"]["DEVICE"] == "cuda"
    assert triton["environment"]["MODEL_PATH"] == "BAAI/bge-reranker-v2-m3"
    assert triton["environment"]["HF_HOME"] == "/hf-cache"
    assert set(triton["volumes"]) == {"hf-cache:/hf-cache", "models:/models:ro"}
    assert set(compose["volumes"]) == {"hf-cache", "models"}

    assert triton["stop_grace_period"] == "30s"  # tritonserver finishes requests in flight (up to 15 s)
    # The load balancer publishes the public ports; its perf port (model config, statistics) stays inside.
    assert services["lb"]["ports"] == ["8000:8000", "8001:8001"] and services["lb"]["expose"] == ["8003"]
    assert services["lb"]["volumes"] == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"]
    assert services["lb"]["depends_on"] == {"triton": {"condition": "service_healthy"}}

    api = services["api"]
    assert shlex.join(api["command"]) == "triton-rerank api --triton-url lb:8001 --host 0.0.0.0 --port 30000"
    assert api["ports"] == ["30000:30000"]
    assert api["depends_on"]["triton"] == {"condition": "service_healthy"}
    assert api["image"] == triton["image"] and api["build"] == triton["build"]
    assert "deploy" not in api  # the gateway needs no GPU


def test_healthchecks(compose):
    services = compose["services"]
    triton = services["triton"]["healthcheck"]
    assert triton["test"][:2] == ["CMD", "curl"] and triton["test"][-1] == "http://127.0.0.1:8000/v2/health/ready"
    assert triton["start_period"] == "30m"  # the first start downloads the model
    assert services["lb"]["healthcheck"]["test"][-1] == "http://127.0.0.1:8000/v2/health/ready"
    assert services["api"]["healthcheck"]["test"][-1] == "http://127.0.0.1:30000/health"


def test_perf_profile_runs_perf_analyzer_on_the_ensemble(compose):
    perf = compose["services"]["perf"]
    assert perf["profiles"] == ["perf"]
    assert perf["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3-sdk"
    command = perf["command"]
    assert command[0] == "perf_analyzer"
    assert command[command.index("-m") + 1] == "reranker"
    # perf_analyzer reads the model configuration and statistics: the load balancer's perf port.
    assert command[command.index("-u") + 1] == "lb:8003" and command[command.index("-i") + 1] == "grpc"
    input_data = command[command.index("--input-data") + 1]
    assert f"./deploy/perf-input.json:{input_data}:ro" in perf["volumes"]


def test_perf_input_is_perf_analyzer_json():
    data = json.loads((DEPLOY / "perf-input.json").read_text())["data"]
    assert data
    for entry in data:
        assert set(entry) == {"QUERY", "DOCUMENTS"}
        assert len(entry["QUERY"]) == 1 and entry["QUERY"][0].strip()
        assert entry["DOCUMENTS"]["shape"] == [len(entry["DOCUMENTS"]["content"])]


def test_environment_overrides(compose):
    raw = yaml.safe_load(COMPOSE.read_text())
    env = {"MODEL_DIR": "/srv/models/my-reranker", "MODEL_PATH": "/models", "HF_CACHE": "/srv/hf",
           "TRITON_REPLICAS": "3", "GPUS": "0,1", "INSTANCES": "2", "HTTP_PORT": "18000", "MAX_RESTARTS": "2",
           "LONG_DOCUMENTS": "chunk"}
    triton = interpolate(raw, env)["services"]["triton"]
    assert set(triton["volumes"]) == {"/srv/hf:/hf-cache", "/srv/models/my-reranker:/models:ro"}
    assert triton["deploy"]["replicas"] == "3"
    assert {k: triton["environment"][k] for k in ("MODEL_PATH", "GPUS", "INSTANCES", "MAX_RESTARTS",
                                                  "LONG_DOCUMENTS")} == {
        "MODEL_PATH": "/models", "GPUS": "0,1", "INSTANCES": "2", "MAX_RESTARTS": "2", "LONG_DOCUMENTS": "chunk"}
    # The entry point's own defaults, so that an unset variable changes nothing.
    assert {k: interpolate(raw, {})["services"]["triton"]["environment"][k]
            for k in ("MAX_RESTARTS", "RESTART_WINDOW", "RESTART_BACKOFF", "LONG_DOCUMENTS", "MAX_CHUNKS_PER_DOC")} == {
        "MAX_RESTARTS": str(RestartPolicy.max_restarts), "RESTART_WINDOW": f"{RestartPolicy.window:g}",
        "RESTART_BACKOFF": f"{RestartPolicy.backoff:g}", "LONG_DOCUMENTS": RepositorySettings.long_documents,
        "MAX_CHUNKS_PER_DOC": str(RepositorySettings.max_chunks_per_doc)}
    assert interpolate(raw, env)["services"]["lb"]["ports"][0] == "18000:8000"


def docker_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian package docker-compose, 1.29) is not installed")
    # Only what compose needs: no variable of the caller's shell leaks into the interpolation.
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([binary, "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})}, cwd=ROOT)


def test_compose_file_validates_against_the_compose_schema():
    result = docker_compose("config", "-q")
    assert result.returncode == 0, result.stderr
    services = docker_compose("config", "--services")
    assert set(services.stdout.split()) == {"triton", "lb", "api", "perf"}, services.stderr


def test_compose_renders_the_overrides():
    env = {"MODEL_DIR": "/srv/models/my-reranker", "MODEL_PATH": "/models", "HF_CACHE": "/srv/hf",
           "TRITON_REPLICAS": "2"}
    result = docker_compose("config", env=env)
    assert result.returncode == 0, result.stderr
    triton = yaml.safe_load(result.stdout)["services"]["triton"]
    assert triton["deploy"]["replicas"] == 2
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/srv/models/my-reranker:/models:ro" in triton["volumes"]
    assert "/srv/hf:/hf-cache:rw" in triton["volumes"]
    assert triton["environment"]["MODEL_PATH"] == "/models"


# --- the image ----------------------------------------------------------------------------------


# --- the image ----------------------------------------------------------------------------------


def test_image_is_the_ngc_server_with_the_installed_package():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE={TRITON_IMAGE}\nFROM ${{TRITON_IMAGE}}" in dockerfile
    assert re.search(r"^WORKDIR /opt/triton-rerank$", dockerfile, re.MULTILINE)
    copies = re.findall(r"^COPY (.+) (\S+)$", dockerfile, re.MULTILINE)
    # The package (its model repository included) is copied, installed not editable without its
    # dependency list (which would replace torch), and its sources removed: the container uses the
    # installed package and finds the repository through importlib.resources.
    copied = {path for sources, target in copies if target.startswith("src/") for path in sources.split()}
    assert "RUN pip3 install --no-cache-dir --no-deps ./src && rm -rf src" in dockerfile
    assert "pip3 install --no-cache-dir -r deploy/requirements.txt" in dockerfile
    assert dockerfile.rstrip().endswith('CMD ["python3", "/opt/triton-rerank/deploy/entrypoint.py"]')
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package.split(".")[1] for package in setuptools["packages"] if "." in package}
    package_data = {pattern.split("/")[0] for pattern in setuptools["package-data"]["triton_rerank"]}
    top_files = {p.name for p in ROOT.glob("*.py")}
    assert folders | package_data | top_files | {"pyproject.toml", "README.md"} <= copied, "the image misses a part"
    assert "model_repository" in package_data
    # Every COPY source reaches the build context through deploy/Dockerfile.dockerignore.
    allowed = {line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources, _ in copies:
        for path in sources.split():
            assert path in allowed, f"{path} is not let through Dockerfile.dockerignore"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_image_requirements_follow_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (DEPLOY / "requirements.txt").read_text().splitlines()]
    image = [line for line in lines if line and not line.startswith("#")]
    # torch comes from the PyTorch CUDA index, and the NGC image is the server nvidia-pytriton carries.
    expected = {_requirement_name(r) for r in pyproject} - {"torch", "nvidia-pytriton"}
    assert {_requirement_name(r) for r in image} == expected
    server_release = [r for r in pyproject if _requirement_name(r) == "tritonclient"][0].split("==")[1]
    assert f"tritonclient[grpc,http]=={server_release}" in image
    assert "numpy<2" in image


# --- the entry point ----------------------------------------------------------------------------


def fake_model(tmp_path: Path) -> Path:
    """A directory the model resolver accepts (the entry point renders; it loads nothing)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "bert"}')
    return model


def entrypoint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ENTRYPOINT), "--render-only", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env(**(env or {})))


def printed_command(result: subprocess.CompletedProcess) -> list[str]:
    return shlex.split(result.stdout.strip().splitlines()[-1])


def shm_prefix_of(command: list[str]) -> str:
    (prefix,) = [arg.split("=", 2)[2] for arg in command if arg.startswith("--backend-config=python,shm-region-prefix-name=")]
    return prefix


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_entrypoint_renders_the_repository_the_tests_serve(tmp_path):
    model = fake_model(tmp_path)
    result = entrypoint("--model-path", str(model), "--target", str(tmp_path / "image"), "--dtype", "bfloat16",
                        "--instances", "2", "--gpus", "0,1", "--long-documents", "chunk", "--max-chunks-per-doc", "9")
    assert result.returncode == 0, result.stderr
    image = tmp_path / "image"
    # The same renderer, the same (packaged) source, the same settings: file for file what
    # render_model_repository gives.
    reference = render_model_repository(
        RepositorySettings(model_path=str(model), device="cuda", dtype="bfloat16", instances=2, gpus=(0, 1),
                           long_documents="chunk", max_chunks_per_doc=9),
        tmp_path / "ref")
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(image) for p in image.rglob("*") if p.is_file())
    assert Path("cross_encoder/1/model.py") in files and (image / "reranker" / "1").is_dir()
    for name in files:
        assert (image / name).read_bytes() == (reference / name).read_bytes(), name

    # What tritonserver will read: every config parses as a Triton ModelConfig.
    configs = {name: parse_config(image / name / "config.pbtxt") for name in ("tokenizer", "cross_encoder", "reranker")}
    cross = configs["cross_encoder"]
    assert [(g.kind, g.count, list(g.gpus)) for g in cross.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2, [0, 1])]
    params = {k: v.string_value for k, v in cross.parameters.items()}
    # "auto": each GPU instance runs on the GPU Triton gave it ("cuda" would be cuda:0 for all).
    assert params["device"] == "auto" and params["dtype"] == "bfloat16" and params["max_chunks_per_doc"] == "9"
    assert configs["tokenizer"].parameters["long_documents"].string_value == "chunk"
    # The model is linked into each step, so that configs clients can read name no host path.
    for step in ("tokenizer", "cross_encoder"):
        link = configs[step].parameters["model_path"].string_value
        assert not Path(link).is_absolute() and (image / step / link).resolve() == model.resolve()
    assert configs["reranker"].platform == "ensemble"


def test_entrypoint_runs_the_launchers_hardened_command(tmp_path):
    """The container's tritonserver command is the launcher's, flag for flag: the image's binary and
    backends, every listener on 0.0.0.0 inside the container, GPU metrics on; the admin key is
    never printed."""
    result = entrypoint("--model-path", str(fake_model(tmp_path)), "--target", str(tmp_path / "image"))
    assert result.returncode == 0, result.stderr
    command = printed_command(result)
    image = (tmp_path / "image").resolve()
    # Each server names its shared-memory regions with a random prefix of its own (removed after a crash).
    prefix = shm_prefix_of(command)
    assert prefix.startswith("triton_rerank_")
    assert command == server_command("tritonserver", image, Path("/opt/tritonserver/backends"),
                                     ServerAddress("0.0.0.0", 8000, 8001, 8002), REDACTED_KEY, gpu_metrics=True,
                                     shm_prefix=prefix)
    assert {"--model-control-mode=explicit", "--load-model=*", "--exit-on-error=true",
            "--strict-readiness=true"} <= set(command)
    assert f"--http-restricted-api=shared-memory,model-repository,trace,logging:triton-rerank-admin={REDACTED_KEY}" in command
    # `triton-rerank serve` runs the same flags, with the bundled server, its backends, on its host.
    serve = server_command("/bundled/tritonserver", image, tmp_path / "backends", ServerAddress(), REDACTED_KEY,
                           shm_prefix="p_")
    assert [arg.split("=")[0] for arg in command[1:]] == [arg.split("=")[0] for arg in serve[1:]]
    # The settings the environment may change; the entry point's own ports and binary.
    env = {"TRITONSERVER": "/usr/local/bin/tritonserver", "TRITON_BACKEND_DIRECTORY": "/srv/backends",
           "TRITON_HTTP_PORT": "9000", "TRITON_HOST": "10.1.2.3", "DEVICE": "cpu"}
    result = entrypoint("--model-path", str(fake_model(tmp_path)), "--target", str(tmp_path / "image"), env=env)
    command = printed_command(result)
    assert command == server_command(
        "/usr/local/bin/tritonserver", image, Path("/srv/backends"), ServerAddress("10.1.2.3", 9000, 8001, 8002),
        REDACTED_KEY, gpu_metrics=False, shm_prefix=shm_prefix_of(command))


@pytest.mark.parametrize(("device", "gpus", "kind", "expected_gpus"), [
    ("cuda", "", "KIND_GPU", []),
    ("cuda", "2", "KIND_GPU", [2]),
    ("cuda", "1 0", "KIND_GPU", [1, 0]),
    ("cpu", "", "KIND_CPU", []),
    ("auto", "", "KIND_AUTO", []),
])
def test_entrypoint_instance_placement_from_the_environment(tmp_path, device, gpus, kind, expected_gpus):
    env = {"MODEL_PATH": str(fake_model(tmp_path)), "DEVICE": device, "GPUS": gpus, "INSTANCES": "3",
           "MODEL_REPOSITORY": str(tmp_path / "repo"), "TRITON_ARGS": "--log-verbose=1 --backend-config=python,a=b"}
    result = entrypoint("--", "--exit-timeout-secs=5", env=env)
    assert result.returncode == 0, result.stderr
    config = parse_config(tmp_path / "repo" / "cross_encoder" / "config.pbtxt")
    assert [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count, list(g.gpus))
            for g in config.instance_group] == [(kind, 3, expected_gpus)]
    assert config.parameters["device"].string_value == ("cpu" if device == "cpu" else "auto")
    command = printed_command(result)
    assert command[-3:] == ["--log-verbose=1", "--backend-config=python,a=b", "--exit-timeout-secs=5"]


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {"GPUS": "0,x"}, "GPUS must be comma-separated"),
    ([], {"GPUS": "1,1"}, "distinct"),
    (["--device", "cpu", "--gpus", "0"], {}, "needs DEVICE=cuda"),
    (["--instances", "0"], {}, "INSTANCES must be at least 1"),
    ([], {"DEVICE": "gpu"}, "DEVICE='gpu'"),
    # Extra arguments may add to the hardened command line, not undo it.
    ([], {"TRITON_ARGS": "--model-control-mode=poll"}, "--model-control-mode is set by triton-rerank"),
    (["--", "--http-restricted-api=trace:a=b"], {}, "--http-restricted-api is set by triton-rerank"),
    ([], {"MAX_RESTARTS": "-1"}, "the number of restarts must be 0 or more"),
    (["--restart-window", "0"], {}, "the restart window must be more than 0 seconds"),
])
def test_entrypoint_refuses_bad_settings(tmp_path, args, env, message):
    result = entrypoint("--model-path", str(fake_model(tmp_path)), "--target", str(tmp_path / "repo"), *args,
                        env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "repo").exists()


def test_entrypoint_names_a_missing_model_and_keeps_the_source(tmp_path):
    result = entrypoint("--model-path", str(tmp_path / "nowhere"), "--target", str(tmp_path / "repo"))
    assert result.returncode == 2 and "is not a directory" in result.stderr
    assert not (tmp_path / "repo").exists()
    source = copy_tree(packaged_model_repository(), tmp_path / "source")
    result = entrypoint("--source", str(source), "--target", str(source), "--model-path", str(fake_model(tmp_path)))
    assert result.returncode == 2 and "must not replace its source" in result.stderr
    assert (source / "reranker" / "config.pbtxt").is_file()
    # Another source directory (MODEL_REPOSITORY_SOURCE) renders like the packaged one.
    result = entrypoint("--target", str(tmp_path / "repo"), "--model-path", str(fake_model(tmp_path)),
                        env={"MODEL_REPOSITORY_SOURCE": str(source)})
    assert result.returncode == 0, result.stderr
    link = parse_config(tmp_path / "repo" / "tokenizer" / "config.pbtxt").parameters["model_path"].string_value
    assert (tmp_path / "repo" / "tokenizer" / link).resolve() == fake_model(tmp_path).resolve()


# --- the load balancer --------------------------------------------------------------------------


def nginx_binary() -> str:
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    return binary


def local_nginx_config(run_dir: Path, http: list[int], grpc: list[int],
                       listen: tuple[int, int, int] = (8000, 8001, 8003), gateway: int = 30000) -> Path:
    """deploy/nginx.conf with what only a test machine needs changed: the compose host names `triton`
    and `api` become local replicas' and the gateway's ports (without `resolve`, which nginx < 1.27.3
    lacks and loopback addresses do not need), it listens on loopback ports, and keeps its temporary
    files in run_dir."""
    text = (DEPLOY / "nginx.conf").read_text()
    assert text.count("server triton:8000 ") == 1 and text.count("server triton:8001 ") == 1
    for port_in_compose, ports in ((8000, http), (8001, grpc)):
        text = re.sub(rf"server triton:{port_in_compose} ([^;]*);",
                      lambda m, ports=ports: " ".join(f"server 127.0.0.1:{p} {m.group(1)};" for p in ports), text)
    text, count = re.subn(r"server api:30000 ([^;]*) resolve;", rf"server 127.0.0.1:{gateway} \1;", text)
    assert count == 1
    for original, new in zip(("listen 8000;", "listen 8001 http2;", "listen 8003 http2;"), listen, strict=True):
        assert text.count(original) == 1
        text = text.replace(original, original.replace(original.split()[1].rstrip(";"), f"127.0.0.1:{new}"))
    temp = "".join(f"    {kind}_temp_path {run_dir / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    path = run_dir / "nginx.conf"
    path.write_text(text)
    return path


def test_nginx_config_is_valid(tmp_path):
    config = local_nginx_config(tmp_path, [18000], [18001])
    assert "listen 127.0.0.1:8001 http2;" in config.read_text()
    result = subprocess.run([nginx_binary(), "-t", "-c", str(config), "-p", str(tmp_path), "-e", "stderr",
                             "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


def test_nginx_lets_through_only_inference_health_and_metadata():
    """The allow-lists in deploy/nginx.conf, read from the file (the live test below exercises them)."""
    text = (DEPLOY / "nginx.conf").read_text()
    public_grpc, perf_grpc = text.split("listen 8001 http2;")[1].split("listen 8003 http2;")
    methods = re.compile(r"location = /inference\.GRPCInferenceService/(\w+)")
    assert methods.findall(public_grpc) == ["ModelInfer", "ServerLive", "ServerReady", "ModelReady",
                                            "ServerMetadata", "ModelMetadata"]
    assert set(methods.findall(perf_grpc)) == set(methods.findall(public_grpc)) | {"ModelConfig", "ModelStatistics"}
    assert public_grpc.count("return 403;") == perf_grpc.count("return 403;") == 1
    routes = [(re.compile(p), name) for p, name in re.findall(r'^\s+"~(\^[^"]+)"\s+(\w+);$', text, re.MULTILINE)]
    assert sorted(name for _, name in routes) == ["gateway", "health", "inference", "model_metadata", "model_ready",
                                                  "server_metadata"]

    def route(request: str) -> str | None:
        """The route of a request line: the first regex that matches, as nginx's map picks it."""
        return next((name for pattern, name in routes if pattern.search(request)), None)

    def allowed(request: str) -> bool:
        return route(request) is not None

    for request in ["GET /v2/health/live", "GET /v2/health/ready", "GET /v2", "GET /v2/models/reranker",
                    "GET /v2/models/reranker/versions/1", "GET /v2/models/reranker/ready",
                    "GET /v2/models/reranker/versions/1/ready", "POST /v2/models/reranker/infer",
                    "POST /v2/models/reranker/versions/1/infer", "POST /v2/models/reranker/generate",
                    "GET /v2/health/ready?verbose=1"]:
        assert allowed(request), request
    for request in ["GET /v2/models/reranker/config", "GET /v2/models/reranker/stats", "GET /v2/models/stats",
                    "GET /v2/models/reranker/versions/1/stats", "POST /v2/repository/index",
                    "POST /v2/repository/models/reranker/load", "POST /v2/repository/models/reranker/unload",
                    "POST /v2/systemsharedmemory/region/r/register", "GET /v2/systemsharedmemory/status",
                    "POST /v2/cudasharedmemory/region/r/register", "GET /v2/trace/setting",
                    "POST /v2/models/reranker/trace/setting", "GET /v2/logging", "POST /v2/logging",
                    "GET /v2/models/reranker/../../repository/index", "GET /metrics", "GET //v2/health/ready",
                    "POST /v2/models/reranker/ready", "GET /v2/models/reranker/infer",
                    "POST /v2/models/reranker/generate_stream"]:
        assert not allowed(request), request
    # HTTP inference of the ensemble goes to the gateway (which answers 4xx where Triton answers 500);
    # other models' inference and everything else that is let through, to the replicas.
    for request in ["POST /v2/models/reranker/infer", "POST /v2/models/reranker/versions/1/infer",
                    "POST /v2/models/reranker/generate", "POST /v2/models/reranker/versions/1/generate",
                    "POST /v2/models/reranker/infer?x=1", "POST /v2/models/reranker/versions/2/infer"]:
        assert route(request) == "gateway", request
    for request in ["POST /v2/models/tokenizer/infer", "POST /v2/models/rerankers/infer",
                    "POST /v2/models/reranker2/versions/1/infer", "POST /v2/models/cross_encoder/generate"]:
        assert route(request) == "inference", request
    assert route("GET /v2/models/reranker") == "model_metadata"
    upstreams = dict(re.findall(r"^\s+(\w+) (\w+_http);$", text.split("map $triton_http_route $http_upstream")[1],
                                re.MULTILINE))
    assert upstreams == {"default": "triton_http", "gateway": "gateway_http"}
    assert "proxy_pass http://$http_upstream;" in text


def test_nginx_bounds_bodies_and_headers_and_finds_the_gateway(compose):
    """The load balancer refuses what the gateway would (same body limit), in KServe's error shape, and
    reaches the compose service `api` on the port its command line gives."""
    from triton_rerank.gateway.settings import GatewaySettings

    text = (DEPLOY / "nginx.conf").read_text()
    http_block = text.split("server {")[0]
    size = re.search(r"^\s+client_max_body_size (\d+)m;$", http_block, re.MULTILINE)
    assert size and int(size.group(1)) * 1024 * 1024 == GatewaySettings().max_body_bytes
    assert re.search(r"^\s+large_client_header_buffers 4 8k;$", http_block, re.MULTILINE)
    assert "client_max_body_size" not in text.split("server {", 1)[1]  # one limit for every port
    assert text.count("error_page 413 @too_large;") == 3  # each port answers it in its protocol's shape
    assert "return 413 '{\"error\":" in text and text.count("add_header grpc-status 8 always;") == 2
    api = compose["services"]["api"]
    assert "--max-body-bytes" not in api["command"]  # the gateway keeps its default, nginx's limit
    port = api["command"][api["command"].index("--port") + 1]
    assert re.search(rf"^\s+server api:{port} [^;]* resolve;$", text, re.MULTILINE)
    # `resolve` looks the gateway up while running: it starts after the load balancer (depends_on).
    assert re.search(r"^\s+resolver 127\.0\.0\.11 ", http_block, re.MULTILINE)
    assert "lb" in api["depends_on"] and "api" not in compose["services"]["lb"].get("depends_on", {})


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {process.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def rerank(module, url: str, query: str, documents: list[str]) -> np.ndarray:
    inputs = [module.InferInput("QUERY", [1], "BYTES"), module.InferInput("DOCUMENTS", [len(documents)], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([query.encode()], dtype=object))
    inputs[1].set_data_from_numpy(np.array([d.encode() for d in documents], dtype=object))
    with module.InferenceServerClient(url) as client:
        return client.infer("reranker", inputs).as_numpy("SCORES")[0]


def inference_count(url: str) -> int:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        return int(client.get_inference_statistics("reranker")["model_stats"][0]["inference_count"])


def http_status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    try:
        with urlopen(Request(url, data=body, method=method), timeout=30) as response:
            return response.status
    except HTTPError as error:
        return error.code
    except OSError:  # nothing listens (yet)
        return 0


def http_answer(url: str, body: bytes) -> tuple[int, dict]:
    """Status and JSON body of a POST."""
    try:
        with urlopen(Request(url, data=body, method="POST"), timeout=60) as response:
            return response.status, json.loads(response.read())
    except HTTPError as error:
        return error.code, json.loads(error.read())


def raw_http_status(port: int, method: str, path: str) -> int:
    """The status for a request line sent exactly as written (no client-side path normalisation)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def served_since(replicas: list[Replica], before: list[int], expected: int) -> list[int]:
    """Requests each replica answered since its count `before`. Triton counts a request in its
    statistics just after answering it: waits (10 s at most) until `expected` are counted."""
    deadline = time.monotonic() + 10
    while True:
        served = [inference_count(r.http_url) - b for r, b in zip(replicas, before, strict=True)]
        if sum(served) >= expected or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


class Replica:
    """The image's entry point, run for real: it renders the packaged repository and runs the
    bundled tritonserver (CPU) with the launcher's hardened command line, supervised."""

    def __init__(self, model_dir: Path, run_dir: Path):
        self.run_dir = run_dir
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = run_dir / "entrypoint.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ENTRYPOINT), "--tritonserver", "bundled", "--host", "127.0.0.1",
                 "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                 "--device", "cpu", "--model-path", str(model_dir), "--target", str(run_dir / "model_repository"),
                 "--ready-timeout", "180", "--", "--exit-timeout-secs=3"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env())

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the entry point exited:\n{self.output()}"
            if http_status(f"http://{self.http_url}/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise TimeoutError(f"replica not ready:\n{self.output()}")

    def server_pid(self) -> int:
        """The tritonserver the entry point started (its child)."""
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    if (proc / "cmdline").read_bytes().split(b"\0")[0].endswith(b"/tritonserver"):
                        return int(proc.name)
            except (OSError, IndexError, ValueError):
                continue
        raise AssertionError(f"no tritonserver under the entry point:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.mark.server
def test_two_replicas_behind_nginx_serve_the_rendered_repository(tiny_model_dirs, tmp_path, chunked_crash_request):
    """Two replicas, each the image's entry point running the bundled tritonserver supervised (CPU),
    behind deploy/nginx.conf, with the gateway behind it as in docker-compose.yml (a gRPC client of
    the load balancer): HTTP, gRPC, the generate extension and perf_analyzer (with
    deploy/perf-input.json) pass through the load balancer and both replicas get requests; the
    ensemble's HTTP inference is answered by the gateway (4xx, not Triton's 500, for a malformed
    KServe request); a body over 16 MiB is refused by nginx; admin routes (repository, shared memory,
    trace, logging, model config, statistics) are refused by nginx; the request that crashes
    tritonserver 2.51 (a million one-byte chunks), sent to every published port, reaches no replica
    as such (nginx de-chunks bodies) and every replica keeps running; a replica whose backend process
    dies is repaired by its supervisor; SIGTERM stops every replica with its server and backend
    processes; a replica whose tritonserver dies is restarted by its entry point."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from triton_rerank.bench.perf_analyzer import perf_analyzer_binary, perf_analyzer_environment
    from triton_rerank.gateway.server import GatewayThread
    from triton_rerank.gateway.settings import GatewaySettings

    nginx = nginx_binary()
    replicas: list[Replica] = []
    balancer = gateway = None
    try:
        for i in range(2):
            run_dir = tmp_path / f"replica-{i}"
            run_dir.mkdir()
            replicas.append(Replica(tiny_model_dirs["xlm-roberta"], run_dir))
        for replica in replicas:
            replica.wait_ready()
        lb_http, lb_grpc, lb_perf, api = free_ports(4)
        # As the compose service "api": the gateway reaches Triton through the load balancer's gRPC port.
        gateway = GatewayThread(GatewaySettings(triton_url=f"127.0.0.1:{lb_grpc}", port=api,
                                                log_level="warning")).start()
        config = local_nginx_config(tmp_path, [r.http for r in replicas], [r.grpc for r in replicas],
                                    listen=(lb_http, lb_grpc, lb_perf), gateway=api)
        balancer = subprocess.Popen(
            [nginx, "-c", str(config), "-p", str(tmp_path), "-e", "stderr",
             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for port in (lb_http, lb_grpc, lb_perf):
            wait_for_port(port, balancer)

        # Inference passes, over both protocols, to both replicas.
        query = "what is panda?"
        documents = ["hi", "The giant panda is a bear native to south central China.", "panda panda panda"]
        direct = rerank(httpclient, replicas[0].http_url, query, documents)
        before = [inference_count(r.http_url) for r in replicas]
        for _ in range(4):
            np.testing.assert_allclose(rerank(httpclient, f"127.0.0.1:{lb_http}", query, documents), direct, atol=1e-5)
            np.testing.assert_allclose(rerank(grpcclient, f"127.0.0.1:{lb_grpc}", query, documents), direct, atol=1e-5)
        served = served_since(replicas, before, 8)
        assert sum(served) == 8 and min(served) >= 1, served
        # One gRPC target naming both replicas (as a headless Service's DNS name does in Kubernetes):
        # the project's client sends each call to the next one (round-robin), not all to the first.
        from triton_rerank.client.rerank_client import RerankClient

        before = [inference_count(r.http_url) for r in replicas]
        with RerankClient(f"ipv4:127.0.0.1:{replicas[0].grpc},127.0.0.1:{replicas[1].grpc}", retries=0) as client:
            for _ in range(6):
                np.testing.assert_allclose(client.score(query, documents).scores, direct, atol=1e-5)
        spread = served_since(replicas, before, 6)
        assert sum(spread) == 6 and min(spread) >= 2, spread
        lb = f"http://127.0.0.1:{lb_http}"
        body = json.dumps({"QUERY": query, "DOCUMENTS": documents}).encode()
        with urlopen(Request(f"{lb}/v2/models/reranker/generate", data=body, method="POST"), timeout=60) as response:
            np.testing.assert_allclose(json.loads(response.read())["SCORES"], direct, atol=1e-5)
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/reranker",
                     "/v2/models/reranker/versions/1", "/v2/models/reranker/ready"):
            assert http_status(lb + path) == 200, path

        # A malformed KServe request: Triton's HTTP frontend answers 500, the load balancer's front 400.
        negative_shape = json.dumps({"inputs": [
            {"name": "QUERY", "datatype": "BYTES", "shape": [1], "data": [query]},
            {"name": "DOCUMENTS", "datatype": "BYTES", "shape": [-1], "data": documents}]}).encode()
        assert http_status(f"http://{replicas[0].http_url}/v2/models/reranker/infer", "POST", negative_shape) == 500
        status, answer = http_answer(f"{lb}/v2/models/reranker/infer", negative_shape)
        assert status == 400 and "shape[0]: Input should be greater than or equal to 0" in answer["error"]
        status, answer = http_answer(f"{lb}/v2/models/reranker/generate", b'{"QUERY": "q", "DOCUMENTS": [1]}')
        assert status == 400 and "DOCUMENTS[0]: Input should be a valid string" in answer["error"]
        # A body over 16 MiB is refused by nginx in KServe's error shape, before the gateway or Triton.
        oversize = json.dumps({"QUERY": query, "DOCUMENTS": ["x" * (16 * 1024 * 1024)]}).encode()
        status, answer = http_answer(f"{lb}/v2/models/reranker/generate", oversize)
        assert status == 413 and "larger than 16 MiB" in answer["error"]
        with pytest.raises(InferenceServerException) as too_large:
            rerank(grpcclient, f"127.0.0.1:{lb_grpc}", query, ["x" * (16 * 1024 * 1024)])
        assert too_large.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than 16 MiB" in too_large.value.message()

        # Admin routes are answered by nginx, whatever the replica would say.
        for method, path in [("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/reranker/unload"),
                             ("GET", "/v2/models/reranker/config"), ("GET", "/v2/models/stats"),
                             ("GET", "/v2/models/reranker/stats"), ("GET", "/v2/systemsharedmemory/status"),
                             ("POST", "/v2/cudasharedmemory/region/r/unregister"), ("GET", "/v2/trace/setting"),
                             ("GET", "/v2/logging"), ("GET", "/v2/models/reranker/../../repository/index"),
                             ("GET", "/v2/models/reranker%2F..%2F..%2Frepository/index")]:
            assert raw_http_status(lb_http, method, path) == 403, (method, path)
        # The replicas close their own restricted APIs too, asked directly: the entry point runs the
        # hardened command (shared memory, repository, trace and logging need the launcher's header).
        assert http_status(f"http://{replicas[0].http_url}/v2/repository/index", "POST", b"{}") == 403
        for method, path in [("POST", "/v2/systemsharedmemory/region/r/register"), ("GET", "/v2/systemsharedmemory/status"),
                             ("POST", "/v2/cudasharedmemory/region/r/register"), ("GET", "/v2/trace/setting"),
                             ("GET", "/v2/logging"), ("POST", "/v2/repository/models/reranker/unload")]:
            assert raw_http_status(replicas[1].http, method, path) == 403, (method, path)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{replicas[1].grpc}") as client:
            with pytest.raises(InferenceServerException) as refused:
                client.register_system_shared_memory("r", "/triton_python_backend_shm", 64)
            # Triton 2.51's gRPC answer to a restricted call without the header (UNAVAILABLE, not 403).
            assert "This protocol is restricted, expecting header" in refused.value.message(), refused.value
        with grpcclient.InferenceServerClient(f"127.0.0.1:{lb_grpc}") as client:
            assert client.is_server_ready() and client.is_model_ready("reranker")
            assert client.get_model_metadata("reranker").name == "reranker"
            for call in (lambda: client.get_model_config("reranker"), client.get_model_repository_index,
                         lambda: client.unload_model("reranker"), lambda: client.get_inference_statistics("reranker"),
                         client.get_system_shared_memory_status, client.get_log_settings):
                with pytest.raises(InferenceServerException) as refused:
                    call()
                assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        assert all(r.process.poll() is None for r in replicas)  # nothing was unloaded

        # The crash request on every port docker-compose.yml publishes (the load balancer's HTTP and
        # gRPC, the gateway's), to routes the load balancer sends to the gateway and to the replicas.
        pids = [r.server_pid() for r in replicas]
        for port, path in [(lb_http, "/v2/models/reranker/generate"), (lb_http, "/v2/models/tokenizer/infer"),
                           (lb_http, "/v2/models/reranker/infer"), (lb_grpc, "/v2/models/reranker/generate"),
                           (api, "/v1/rerank")]:
            answer = chunked_crash_request(port, path)
            assert not answer.startswith(b"HTTP/1.1 2"), (port, path, answer)
            assert [r.server_pid() for r in replicas] == pids, (port, path, [r.output() for r in replicas])
        for replica in replicas:
            np.testing.assert_allclose(rerank(grpcclient, f"127.0.0.1:{replica.grpc}", query, documents), direct,
                                       atol=1e-5)
        assert not any("was killed" in r.output() for r in replicas)

        # perf_analyzer reads the model configuration: refused on the public port, served on the perf port.
        def perf(port: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(perf_analyzer_binary()), "-m", "reranker", "-u", f"127.0.0.1:{port}", "-i", "grpc",
                 "--input-data", str(DEPLOY / "perf-input.json"), "--concurrency-range", "2",
                 "--measurement-interval", "1000", "--stability-percentage", "1000", "--max-trials", "10"],
                env=perf_analyzer_environment(tmp_path / "libs"), capture_output=True, text=True, timeout=180)

        refused_perf = perf(lb_grpc)
        assert refused_perf.returncode != 0 and "model config" in refused_perf.stdout + refused_perf.stderr
        result = perf(lb_perf)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Throughput:" in result.stdout

        # The entry point's server is supervised: a dead backend process is replaced, the model reloaded.
        server_pid = replicas[0].server_pid()
        # One of the tokenizer's instances (it runs several): a dead one takes the model down.
        victim = min(pid for pid, model in stub_models(server_pid).items() if model == "tokenizer")
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tokenizers = [pid for pid, model in stub_models(server_pid).items() if model == "tokenizer"]
            # The surviving instance may answer before the supervisor's reload: wait for the reload too.
            reloaded = "reloading the model" in replicas[0].output() or "reloaded" in replicas[0].output()
            if tokenizers and victim not in tokenizers and reloaded:
                try:
                    np.testing.assert_allclose(rerank(httpclient, replicas[0].http_url, query, documents), direct,
                                               atol=1e-5)
                    break
                except InferenceServerException:
                    pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"the tokenizer was not reloaded:\n{replicas[0].output()}")
        assert "reloading the model" in replicas[0].output() or "reloaded" in replicas[0].output()

        # The entry point restarts a server that dies (the loop `triton-rerank serve` runs), same ports.
        dead = replicas[1].server_pid()
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while "tritonserver is ready again" not in replicas[1].output():
            assert time.monotonic() < deadline, replicas[1].output()
            time.sleep(0.25)
        replicas[1].wait_ready()
        assert replicas[1].server_pid() != dead
        assert f"tritonserver (pid {dead}) was killed by SIGKILL (signal 9)" in replicas[1].log.read_text(errors="replace")
        np.testing.assert_allclose(rerank(grpcclient, f"127.0.0.1:{replicas[1].grpc}", query, documents), direct,
                                   atol=1e-5)

        # SIGTERM (docker stop) stops each replica, its server and every backend process.
        pids = [r.server_pid() for r in replicas]
        assert [r.stop() for r in replicas] == [0, 0], [r.output() for r in replicas]
        assert not any(process_group_alive(pid) for pid in pids)
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=30)
        if gateway is not None:
            gateway.stop()
        for replica in replicas:
            replica.stop()
