"""The GPU deployment: docker-compose.yml and deploy/ (image, entry point, load balancer, perf input).

Neither CI nor these machines run a Docker engine or a GPU, so the deployment is checked without
them: the compose file by parsing and by `docker-compose config -q` (Debian's docker-compose 1.29
validates against the Compose Specification schema without an engine), nginx.conf by `nginx -t`,
the image's entry point by rendering the project's model repository exactly as the container does,
and the load balancer live, in front of two real tritonserver replicas (CPU) serving the
repository the entry point rendered. The tools are Debian packages; tests that need a missing one
skip: `apt-get install docker-compose nginx-light`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_rerank.launcher.server import (
    DEFAULT_MODEL_REPOSITORY,
    RepositorySettings,
    ServerAddress,
    TritonServer,
    free_ports,
    render_model_repository,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.py"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3"
# The settings the entry point reads from the environment: kept out of the tests' subprocesses.
ENTRYPOINT_VARIABLES = ["MODEL_PATH", "DEVICE", "DTYPE", "ENGINE", "ATTENTION_BACKEND", "MAX_LENGTH",
                        "MAX_BATCH_TOKENS", "INSTANCES", "GPUS", "NUM_THREADS", "MODEL_REPOSITORY_SOURCE",
                        "MODEL_REPOSITORY", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT",
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

    assert services["lb"]["ports"] == ["8000:8000", "8001:8001"]
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
    assert command[command.index("-u") + 1] == "lb:8001" and command[command.index("-i") + 1] == "grpc"
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
           "TRITON_REPLICAS": "3", "GPUS": "0,1", "INSTANCES": "2", "HTTP_PORT": "18000"}
    triton = interpolate(raw, env)["services"]["triton"]
    assert set(triton["volumes"]) == {"/srv/hf:/hf-cache", "/srv/models/my-reranker:/models:ro"}
    assert triton["deploy"]["replicas"] == "3"
    assert {k: triton["environment"][k] for k in ("MODEL_PATH", "GPUS", "INSTANCES")} == {
        "MODEL_PATH": "/models", "GPUS": "0,1", "INSTANCES": "2"}
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


def test_image_is_the_ngc_server_with_the_project_and_its_repository():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE={TRITON_IMAGE}\nFROM ${{TRITON_IMAGE}}" in dockerfile
    copies = re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.MULTILINE)
    assert ("model_repository", "model_repository") in copies
    assert re.search(r"^WORKDIR /opt/triton-rerank$", dockerfile, re.MULTILINE)
    # The project without its dependency list (which would replace torch), then its requirements.
    assert "pip3 install --no-cache-dir --no-deps ." in dockerfile
    assert "pip3 install --no-cache-dir -r deploy/requirements.txt" in dockerfile
    assert dockerfile.rstrip().endswith('CMD ["python3", "/opt/triton-rerank/deploy/entrypoint.py"]')
    # The entry point renders the repository the Dockerfile copied.
    assert 'IMAGE_SOURCE = "/opt/triton-rerank/model_repository"' in ENTRYPOINT.read_text()
    # Every COPY source reaches the build context through deploy/Dockerfile.dockerignore.
    allowed = {line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for source, _ in copies:
        for path in source.split():
            assert path in allowed, f"{path} is not let through Dockerfile.dockerignore"
    assert {"pyproject.toml", "README.md", "serving", "kernels", "client"} <= allowed


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
    (model / "config.json").write_text("{}")
    return model


def entrypoint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ENTRYPOINT), "--render-only", "--source", str(DEFAULT_MODEL_REPOSITORY),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env(**(env or {})))


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_entrypoint_renders_the_repository_the_tests_serve(tmp_path):
    model = fake_model(tmp_path)
    result = entrypoint("--model-path", str(model), "--target", str(tmp_path / "image"), "--dtype", "bfloat16",
                        "--instances", "2", "--gpus", "0,1")
    assert result.returncode == 0, result.stderr
    image = tmp_path / "image"
    # The same renderer, the same source: file for file what render_model_repository gives, except
    # for the placement of the cross_encoder instances.
    reference = render_model_repository(
        RepositorySettings(model_path=str(model), device="auto", dtype="bfloat16", instances=2), tmp_path / "ref")
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(image) for p in image.rglob("*") if p.is_file())
    assert Path("cross_encoder/1/model.py") in files and Path("reranker/1/.gitkeep") in files
    for name in files:
        if name != Path("cross_encoder/config.pbtxt"):
            assert (image / name).read_bytes() == (reference / name).read_bytes(), name
    ours = (image / "cross_encoder" / "config.pbtxt").read_text().splitlines()
    theirs = (reference / "cross_encoder" / "config.pbtxt").read_text().splitlines()
    assert [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b] == [
        ("instance_group [ { count: 2, kind: KIND_GPU, gpus: [ 0, 1 ] } ]", "instance_group [ { count: 2 } ]")]

    # What tritonserver will read: every config parses as a Triton ModelConfig.
    configs = {name: parse_config(image / name / "config.pbtxt") for name in ("tokenizer", "cross_encoder", "reranker")}
    cross = configs["cross_encoder"]
    assert [(g.kind, g.count, list(g.gpus)) for g in cross.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2, [0, 1])]
    params = {k: v.string_value for k, v in cross.parameters.items()}
    # "auto": each GPU instance runs on the GPU Triton gave it ("cuda" would be cuda:0 for all).
    assert params["device"] == "auto" and params["dtype"] == "bfloat16" and params["model_path"] == str(model)
    assert configs["tokenizer"].parameters["model_path"].string_value == str(model)
    assert configs["reranker"].platform == "ensemble"

    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[0] == "tritonserver"
    assert f"--model-repository={image}" in command and "--model-control-mode=none" in command
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(command)


@pytest.mark.parametrize(("device", "gpus", "line", "kind"), [
    ("cuda", "", "instance_group [ { count: 3, kind: KIND_GPU } ]", "KIND_GPU"),
    ("cuda", "2", "instance_group [ { count: 3, kind: KIND_GPU, gpus: [ 2 ] } ]", "KIND_GPU"),
    ("cpu", "", "instance_group [ { count: 3, kind: KIND_CPU } ]", "KIND_CPU"),
    ("auto", "", "instance_group [ { count: 3 } ]", "KIND_AUTO"),
])
def test_entrypoint_instance_placement_from_the_environment(tmp_path, device, gpus, line, kind):
    env = {"MODEL_PATH": str(fake_model(tmp_path)), "DEVICE": device, "GPUS": gpus, "INSTANCES": "3",
           "MODEL_REPOSITORY": str(tmp_path / "repo"), "TRITON_ARGS": "--log-verbose=1 --backend-config=python,a=b"}
    result = entrypoint("--", "--exit-timeout-secs=5", env=env)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "repo" / "cross_encoder" / "config.pbtxt"
    assert line in config.read_text().splitlines()
    group = parse_config(config).instance_group[0]
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == kind
    assert parse_config(config).parameters["device"].string_value == ("cpu" if device == "cpu" else "auto")
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[-3:] == ["--log-verbose=1", "--backend-config=python,a=b", "--exit-timeout-secs=5"]


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {"GPUS": "0,x"}, "GPUS must be comma-separated"),
    ([], {"GPUS": "1,1"}, "distinct"),
    (["--device", "cpu", "--gpus", "0"], {}, "needs DEVICE=cuda"),
    (["--instances", "0"], {}, "INSTANCES must be at least 1"),
    ([], {"DEVICE": "gpu"}, "DEVICE='gpu'"),
])
def test_entrypoint_refuses_bad_settings(tmp_path, args, env, message):
    result = entrypoint("--model-path", str(fake_model(tmp_path)), "--target", str(tmp_path / "repo"), *args,
                        env=env)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "repo").exists()


def test_entrypoint_names_a_missing_model_and_keeps_the_source(tmp_path):
    result = entrypoint("--model-path", str(tmp_path / "nowhere"), "--target", str(tmp_path / "repo"))
    assert result.returncode == 2 and "is not a directory" in result.stderr
    source = tmp_path / "source"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, source)
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "--render-only", "--source", str(source),
                             "--target", str(source), "--model-path", str(fake_model(tmp_path))],
                            capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 2 and "must not replace its source" in result.stderr
    assert (source / "reranker" / "config.pbtxt").is_file()


# --- the load balancer --------------------------------------------------------------------------


def nginx_binary() -> str:
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    return binary


def local_nginx_config(run_dir: Path, http: list[int], grpc: list[int], listen: tuple[int, int] = (8000, 8001)) -> Path:
    """deploy/nginx.conf with what only a test machine needs changed: the compose host name `triton`
    becomes local replicas' ports, it listens on loopback ports, and keeps its temporary files in run_dir."""
    text = (DEPLOY / "nginx.conf").read_text()
    assert text.count("server triton:8000 ") == 1 and text.count("server triton:8001 ") == 1
    for port_in_compose, ports in ((8000, http), (8001, grpc)):
        text = re.sub(rf"server triton:{port_in_compose} ([^;]*);",
                      lambda m, ports=ports: " ".join(f"server 127.0.0.1:{p} {m.group(1)};" for p in ports), text)
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{listen[0]};")
    text = text.replace("listen 8001 http2;", f"listen 127.0.0.1:{listen[1]} http2;")
    temp = "".join(f"    {kind}_temp_path {run_dir / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    path = run_dir / "nginx.conf"
    path.write_text(text)
    return path


def test_nginx_config_is_valid(tmp_path):
    config = local_nginx_config(tmp_path, [18000], [18001])
    result = subprocess.run([nginx_binary(), "-t", "-c", str(config), "-p", str(tmp_path), "-e", "stderr",
                             "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


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


@pytest.mark.server
def test_two_replicas_behind_nginx_serve_the_rendered_repository(tiny_model_dirs, tmp_path):
    """The image's repository (rendered by the entry point, CPU instances) on two tritonserver
    replicas behind deploy/nginx.conf: HTTP, gRPC and perf_analyzer with deploy/perf-input.json
    through the load balancer, and both replicas get requests."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from triton_rerank.bench.perf_analyzer import perf_analyzer_binary, perf_analyzer_environment

    nginx = nginx_binary()
    repository = tmp_path / "model_repository"
    result = entrypoint("--model-path", str(tiny_model_dirs["xlm-roberta"]), "--device", "cpu",
                        "--target", str(repository))
    assert result.returncode == 0, result.stderr

    servers: list[TritonServer] = []
    balancer = None
    try:
        for i in range(2):
            http, grpc, metrics = free_ports(3)
            run_dir = tmp_path / f"replica-{i}"
            run_dir.mkdir()
            servers.append(TritonServer(repository, run_dir, ServerAddress("127.0.0.1", http, grpc, metrics),
                                        extra_args=["--exit-timeout-secs=3"]).start())
        for server in servers:
            server.wait_ready(180)
        lb_http, lb_grpc = free_ports(2)
        config = local_nginx_config(tmp_path, [s.address.http_port for s in servers],
                                    [s.address.grpc_port for s in servers], listen=(lb_http, lb_grpc))
        balancer = subprocess.Popen(
            [nginx, "-c", str(config), "-p", str(tmp_path), "-e", "stderr",
             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_port(lb_http, balancer)
        wait_for_port(lb_grpc, balancer)

        query = "what is panda?"
        documents = ["hi", "The giant panda is a bear native to south central China.", "panda panda panda"]
        direct = rerank(httpclient, servers[0].address.http_url, query, documents)
        before = [inference_count(s.address.http_url) for s in servers]
        for _ in range(4):
            np.testing.assert_allclose(rerank(httpclient, f"127.0.0.1:{lb_http}", query, documents), direct, atol=1e-5)
            np.testing.assert_allclose(rerank(grpcclient, f"127.0.0.1:{lb_grpc}", query, documents), direct, atol=1e-5)
        served = [inference_count(s.address.http_url) - b for s, b in zip(servers, before, strict=True)]
        assert sum(served) == 8 and min(served) >= 1, served

        perf = subprocess.run(
            [str(perf_analyzer_binary()), "-m", "reranker", "-u", f"127.0.0.1:{lb_grpc}", "-i", "grpc",
             "--input-data", str(DEPLOY / "perf-input.json"), "--concurrency-range", "2",
             "--measurement-interval", "1000", "--stability-percentage", "1000", "--max-trials", "10"],
            env=perf_analyzer_environment(tmp_path / "libs"), capture_output=True, text=True, timeout=180)
        assert perf.returncode == 0, perf.stdout + perf.stderr
        assert "Throughput:" in perf.stdout
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=30)
        for server in servers:
            server.stop()
