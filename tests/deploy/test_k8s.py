"""The Kubernetes deployment: deploy/k8s (a Kustomize base, overlays cpu and gpu).

No cluster here: each overlay is rendered with `kubectl kustomize` (Debian 12's kubernetes-client,
kubectl 1.20 with kustomize v2.0.3, or any newer kubectl), validated against the Kubernetes
OpenAPI schemas with kubernetes-validate (strict: unknown fields are errors), and what the schemas
cannot see is checked here: Services, probes, NetworkPolicies and ServiceMonitors point at ports and
pods that exist; the HPA's metric is the one the Prometheus adapter rule defines; the Triton
container's environment is what deploy/entrypoint.py reads (and renders the repository the overlay
means); the gateway's arguments parse with the real `triton-rerank api` parser and name the Triton
Services. The tests that render skip when kubectl is missing: `apt-get install kubernetes-client`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triton_rerank import cli
from triton_rerank.gateway.command import API_KEY_ENV, gateway_settings
from triton_rerank.launcher.repository import packaged_model_repository
from triton_rerank.launcher.restart import restart_policy

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.py"
COMPOSE = ROOT / "docker-compose.yml"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "triton-rerank"
# The oldest Kubernetes the manifests are written for (autoscaling/v2, policy/v1, the automatic
# kubernetes.io/metadata.name namespace label) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# What Debian 12's kubectl 1.20 (kustomize v2.0.3) reads in a kustomization.yaml; newer ones read
# these too. v2.0.3's `resources:` takes files only (directories go under `bases:`).
KUSTOMIZE_V2_FIELDS = {"bases", "resources", "patchesStrategicMerge", "patchesJson6902", "namespace",
                       "commonLabels", "images", "configMapGenerator"}
# Variables read by the libraries in the Triton container, not by the entry point's parser.
LIBRARY_VARIABLES = {"HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"}
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component")
EXPECTED_OBJECTS = {
    ("Deployment", "triton-rerank-triton"), ("Deployment", "triton-rerank-gateway"),
    ("Service", "triton-rerank-grpc"), ("Service", "triton-rerank-grpc-pods"), ("Service", "triton-rerank-triton-http"),
    ("Service", "triton-rerank-metrics"), ("Service", "triton-rerank-gateway"),
    ("HorizontalPodAutoscaler", "triton-rerank-triton"), ("ConfigMap", "triton-rerank-prometheus-adapter"),
    ("PodDisruptionBudget", "triton-rerank-triton"), ("PodDisruptionBudget", "triton-rerank-gateway"),
    ("NetworkPolicy", "triton-rerank-triton"), ("NetworkPolicy", "triton-rerank-gateway"),
    ("ServiceMonitor", "triton-rerank-triton"), ("ServiceMonitor", "triton-rerank-gateway"),
}


def kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    return binary


@functools.cache
def _render(overlay: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(overlay: str) -> str:
    """`kubectl kustomize deploy/k8s/overlays/OVERLAY` (stdout only: newer kustomize warns on stderr)."""
    kubectl()
    return _render(overlay)


class Rendered:
    """One overlay's objects, by kind and name."""

    def __init__(self, overlay: str):
        self.overlay = overlay
        self.text = render(overlay)
        self.objects = [doc for doc in yaml.safe_load_all(self.text) if doc]
        self.by_key = {(o["kind"], o["metadata"]["name"]): o for o in self.objects}
        assert len(self.by_key) == len(self.objects), "two objects of one kind share a name"

    def kind(self, kind: str) -> dict[str, dict]:
        return {name: o for (k, name), o in self.by_key.items() if k == kind}

    def get(self, kind: str, name: str) -> dict:
        return self.by_key[(kind, name)]

    def pod_spec(self, deployment: str) -> dict:
        return self.get("Deployment", deployment)["spec"]["template"]["spec"]

    def container(self, deployment: str) -> dict:
        (container,) = self.pod_spec(deployment)["containers"]
        return container

    def pod_labels(self, deployment: str) -> dict[str, str]:
        return self.get("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]

    def deployments_selected(self, selector: dict[str, str]) -> list[str]:
        return [name for name in self.kind("Deployment") if selects(selector, self.pod_labels(name))]

    def container_port(self, deployment: str, port: int | str) -> int:
        """The number a Service targetPort or probe port (a name or a number) reaches in the container."""
        ports = {p["name"]: p["containerPort"] for p in self.container(deployment)["ports"]}
        if isinstance(port, str):
            assert port in ports, f"{deployment} has no container port named {port!r} ({sorted(ports)})"
            return ports[port]
        assert port in ports.values(), f"{deployment} has no container port {port}"
        return port

    def service_backend(self, host_port: str) -> tuple[str, int]:
        """'SERVICE:PORT' or 'dns:///SERVICE:PORT' -> (the Deployment behind it, the container port it reaches)."""
        host, port = host_port.removeprefix("dns:///").rsplit(":", 1)
        service = self.kind("Service")[host]
        (deployment,) = self.deployments_selected(service["spec"]["selector"])
        (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        return deployment, self.container_port(deployment, entry["targetPort"])


@functools.cache
def rendered(overlay: str) -> Rendered:
    return Rendered(overlay)


@pytest.fixture(params=OVERLAYS)
def k8s(request) -> Rendered:
    return rendered(request.param)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ('2Gi', '500m', '50000', 4) as a number; the schemas accept any string."""
    match = _QUANTITY.match(str(value))
    assert match, f"{value!r} is not a Kubernetes quantity"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def load_entrypoint():
    spec = importlib.util.spec_from_file_location("triton_rerank_k8s_entrypoint", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entrypoint_variables() -> dict[str, str]:
    """The variables deploy/entrypoint.py's parser reads (through `_env`), with their defaults."""
    module = load_entrypoint()
    read: dict[str, str] = {}

    def recording_env(name: str, default: str) -> str:
        read[name] = default
        return default

    module._env = recording_env
    module.build_parser()
    return read


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# --- kustomize ----------------------------------------------------------------------------------


def test_kustomizations_use_only_what_kustomize_v2_reads():
    """CI may have Debian 12's kubectl 1.20, whose kustomize v2.0.3 rejects newer fields and takes
    directories only under `bases:`; newer kubectl reads these fields too."""
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert {p.parent.relative_to(K8S).as_posix() for p in kustomizations} == {"base", "overlays/cpu", "overlays/gpu"}
    for path in kustomizations:
        kustomization = yaml.safe_load(path.read_text())
        assert set(kustomization) <= KUSTOMIZE_V2_FIELDS, (path, set(kustomization) - KUSTOMIZE_V2_FIELDS)
        for entry in kustomization.get("resources", []) + kustomization.get("patchesStrategicMerge", []):
            assert (path.parent / entry).is_file(), f"{path}: {entry} is not a file"
        for entry in kustomization.get("bases", []):
            assert (path.parent / entry / "kustomization.yaml").is_file(), f"{path}: {entry}"
    # Every manifest of the base is listed (a file left out would silently not be deployed).
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert set(base["resources"]) == {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}


def test_overlays_render_every_object_labelled_in_one_namespace(k8s):
    assert set(k8s.by_key) == EXPECTED_OBJECTS
    for obj in k8s.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "triton-rerank", obj["metadata"]
        assert labels["app.kubernetes.io/component"] in ("triton", "gateway"), obj["metadata"]
    for name in k8s.kind("Deployment"):
        deployment = k8s.get("Deployment", name)
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert deployment["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "triton-rerank", "app.kubernetes.io/component": component}
        assert selects(deployment["spec"]["selector"]["matchLabels"], k8s.pod_labels(name))
        # The two Deployments' pods are told apart by their labels.
        assert k8s.deployments_selected(deployment["spec"]["selector"]["matchLabels"]) == [name]
    # Both Deployments run the one image; the overlays' `images:` set it.
    images = {k8s.container(name)["image"] for name in k8s.kind("Deployment")}
    assert images == {"triton-rerank:latest"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_schema_validation(overlay):
    """kubernetes-validate (schemas bundled, no network) with --strict, as the README runs it. It has
    no schema for the ServiceMonitor CRD: it warns and passes those (checked below instead)."""
    text = render(overlay)
    kinds = [doc["kind"] for doc in yaml.safe_load_all(text) if doc]
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, "-"],
                                input=text, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))], result.stdout
        warnings = [line for line in lines if line.startswith("WARN")]
        assert len(warnings) == kinds.count("ServiceMonitor")
        assert all("kind ServiceMonitor with api version monitoring.coreos.com/v1" in w for w in warnings)
        assert sum(line.startswith("INFO") and "passed" in line for line in lines) == len(kinds) - len(warnings)


def test_validation_is_strict_and_knows_only_the_builtin_kinds():
    """The Python API the CLI runs: a misspelt field fails, and the ServiceMonitor has no schema."""
    k8s = rendered("gpu")
    triton = k8s.get("Deployment", "triton-rerank-triton")
    assert kubernetes_validate.validate(triton, KUBERNETES_VERSIONS[0], strict=True)
    typo = yaml.safe_load(yaml.safe_dump(triton).replace("failureThreshold", "failureTreshold"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(k8s.get("ServiceMonitor", "triton-rerank-triton"), KUBERNETES_VERSIONS[0],
                                     strict=True)


# --- Services, ports and probes -----------------------------------------------------------------


def test_services_select_one_deployment_and_target_its_ports(k8s):
    expected = {  # service -> (deployment, port name, number, container port)
        "triton-rerank-grpc": ("triton-rerank-triton", "grpc", 8001, 8001),
        "triton-rerank-grpc-pods": ("triton-rerank-triton", "grpc", 8001, 8001),
        "triton-rerank-triton-http": ("triton-rerank-triton", "http", 8000, 8000),
        "triton-rerank-metrics": ("triton-rerank-triton", "metrics", 8002, 8002),
        "triton-rerank-gateway": ("triton-rerank-gateway", "http", 30000, 30000),
    }
    services = k8s.kind("Service")
    assert set(services) == set(expected)
    for name, service in services.items():
        deployment, port_name, number, container_port = expected[name]
        assert k8s.deployments_selected(service["spec"]["selector"]) == [deployment], name
        assert service["spec"]["type"] == "ClusterIP"
        (port,) = service["spec"]["ports"]
        assert (port["name"], port["port"]) == (port_name, number), name
        assert k8s.container_port(deployment, port["targetPort"]) == container_port, name
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] == \
            k8s.pod_labels(deployment)["app.kubernetes.io/component"]
    assert services["triton-rerank-grpc"]["spec"]["ports"][0]["appProtocol"] == "grpc"
    # The gateways' target: headless, so that its DNS name gives every Triton pod's address.
    assert services["triton-rerank-grpc-pods"]["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in services["triton-rerank-grpc"]["spec"]


def test_probes_ask_the_right_paths_on_ports_that_exist(k8s):
    triton = k8s.container("triton-rerank-triton")
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = triton[probe]["httpGet"]
        assert get["path"] == path and k8s.container_port("triton-rerank-triton", get["port"]) == 8000, probe
    startup = triton["startupProbe"]
    # docker-compose.yml's start_period: the first start downloads the model.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    liveness = triton["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60  # room for the in-container restart

    gateway = k8s.container("triton-rerank-gateway")
    get = gateway["readinessProbe"]["httpGet"]
    assert get["path"] == "/health" and k8s.container_port("triton-rerank-gateway", get["port"]) == 30000
    # The gateway's liveness must not follow Triton's state (/health does): /metrics answers alone.
    get = gateway["livenessProbe"]["httpGet"]
    assert get["path"] == "/metrics" and k8s.container_port("triton-rerank-gateway", get["port"]) == 30000

    for name in k8s.kind("Deployment"):
        spec = k8s.pod_spec(name)
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= 30, name
        sleep = k8s.container(name)["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) + 15 <= grace, name  # tritonserver drains up to 15 s
    assert k8s.pod_spec("triton-rerank-triton")["terminationGracePeriodSeconds"] >= 30 + 10


# --- the Triton container -----------------------------------------------------------------------


def test_triton_environment_is_what_the_entrypoint_reads(k8s):
    container = k8s.container("triton-rerank-triton")
    # The image's entry point runs (ENTRYPOINT and CMD of deploy/Dockerfile), nothing else.
    assert "command" not in container and "args" not in container
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    read = entrypoint_variables()
    assert {"MODEL_PATH", "DEVICE", "DTYPE", "INSTANCES", "MAX_RESTARTS", "RESTART_WINDOW"} <= set(read)
    assert set(names) - LIBRARY_VARIABLES <= set(read), set(names) - LIBRARY_VARIABLES - set(read)

    # The settings of docker-compose.yml's triton service, under the same names and defaults.
    compose_env = yaml.safe_load(COMPOSE.read_text())["services"]["triton"]["environment"]
    values = literal_env(container)
    for name, value in compose_env.items():
        default = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
        if name == "HF_TOKEN":  # a secret here
            (entry,) = [e for e in container["env"] if e["name"] == name]
            assert entry["valueFrom"]["secretKeyRef"]["optional"] is True
        elif name != "DEVICE":  # the overlay's
            assert values[name] == default, name
    assert values["HF_HOME"] == "/hf-cache"


def test_triton_environment_parses_and_renders_the_overlays_repository(k8s, tmp_path, monkeypatch):
    """The container's settings pass the entry point's checks, and `--render-only` with them (the
    model path aside) renders the repository the overlay means and binds the container's ports."""
    container = k8s.container("triton-rerank-triton")
    values = literal_env(container)
    module = load_entrypoint()
    for name in entrypoint_variables():
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    parser = module.build_parser()
    args = parser.parse_args([])
    for action in parser._actions:  # as main() does: the environment's values are not checked by argparse
        if action.choices is not None:
            assert getattr(args, action.dest) in action.choices, action.dest
    module.settings_from(args, "/models")
    restart_policy(args)

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    env = {k: v for k, v in os.environ.items() if k not in entrypoint_variables()} | values
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "--render-only", "--model-path", str(model),
                             "--target", str(tmp_path / "repo")], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    config = text_format.Parse((tmp_path / "repo" / "cross_encoder" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    kinds = {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
    assert kinds == {"KIND_CPU" if k8s.overlay == "cpu" else "KIND_GPU"}
    if k8s.overlay == "cpu":
        # torch's threads follow the pod's CPU request, not the node's cores.
        requested = quantity(container["resources"]["requests"]["cpu"])
        assert config.parameters["num_threads"].string_value == values["NUM_THREADS"]
        assert 0 < int(values["NUM_THREADS"]) <= requested
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for flag, name in (("--http-port", "http"), ("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert f"{flag}={ports[name]}" in command
    # Every listener on the pod's addresses (the probes and Services reach them there).
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(command)


def test_service_variables_cannot_shadow_settings(k8s):
    """Kubernetes puts NAME_PORT=tcp://..., NAME_SERVICE_HOST, ... of every Service of the namespace
    into a pod's environment unless enableServiceLinks is false; a Service named `triton-http` would
    set TRITON_HTTP_PORT, the entry point's HTTP port. Off for both pods, and none of ours collides."""
    settings = set(entrypoint_variables()) | LIBRARY_VARIABLES | {API_KEY_ENV}
    for name in k8s.kind("Deployment"):
        assert k8s.pod_spec(name)["enableServiceLinks"] is False, name
    for name, service in k8s.kind("Service").items():
        prefix = name.upper().replace("-", "_")
        injected = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        for port in service["spec"]["ports"]:
            injected |= {f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}",
                         f"{prefix}_PORT_{port['port']}_TCP", f"{prefix}_PORT_{port['port']}_TCP_PORT",
                         f"{prefix}_PORT_{port['port']}_TCP_ADDR", f"{prefix}_PORT_{port['port']}_TCP_PROTO"}
        assert not injected & settings, (name, injected & settings)


def test_volumes_shm_in_memory_and_the_model_cache(k8s):
    spec = k8s.pod_spec("triton-rerank-triton")
    container = k8s.container("triton-rerank-triton")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # docker-compose.yml's shm_size; the memory-backed volume counts in the container's memory.
    assert quantity(shm["sizeLimit"]) == 2 * 2**30
    assert quantity(container["resources"]["limits"]["memory"]) >= quantity(shm["sizeLimit"]) + 8 * 2**30
    cache = volumes[mounts[literal_env(container)["HF_HOME"]]]
    assert quantity(cache["emptyDir"]["sizeLimit"]) >= 10 * 2**30  # bge-reranker-v2-m3 is about 2.3 GB
    assert "volumeMounts" not in k8s.container("triton-rerank-gateway")


def test_security_context(k8s):
    for name in k8s.kind("Deployment"):
        spec = k8s.pod_spec(name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
        # A process reaper for the backend processes (docker-compose.yml's `init: true`).
        assert spec["shareProcessNamespace"] is True
        context = k8s.container(name)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}


# --- overlays -----------------------------------------------------------------------------------


def test_gpu_overlay_requests_one_gpu_and_tolerates_the_gpu_taint():
    k8s = rendered("gpu")
    container = k8s.container("triton-rerank-triton")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 and resources["limits"]["nvidia.com/gpu"] == 1
    assert literal_env(container)["DEVICE"] in ("cuda", "auto")
    tolerations = k8s.pod_spec("triton-rerank-triton")["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "nvidia.com/gpu" not in str(k8s.container("triton-rerank-gateway")["resources"])
    assert "tolerations" not in k8s.pod_spec("triton-rerank-gateway")


def test_cpu_overlay_requests_no_gpu():
    k8s = rendered("cpu")
    assert "nvidia.com/gpu" not in k8s.text
    container = k8s.container("triton-rerank-triton")
    assert literal_env(container)["DEVICE"] == "cpu"
    assert quantity(container["resources"]["requests"]["cpu"]) >= 1
    assert quantity(container["resources"]["requests"]["memory"]) >= 4 * 2**30
    assert "tolerations" not in k8s.pod_spec("triton-rerank-triton")


def test_rollouts_start_new_pods_before_stopping_old_ones(k8s):
    for name in k8s.kind("Deployment"):
        strategy = k8s.get("Deployment", name)["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # The HPA owns Triton's replica count: a count here would reset it on every apply.
    assert "replicas" not in k8s.get("Deployment", "triton-rerank-triton")["spec"]
    assert k8s.get("Deployment", "triton-rerank-gateway")["spec"]["replicas"] >= 2


# --- the gateway --------------------------------------------------------------------------------


def test_gateway_arguments_parse_with_the_real_cli_and_name_the_triton_services(k8s):
    container = k8s.container("triton-rerank-gateway")
    argv = container["args"]
    assert "command" not in container  # the image's ENTRYPOINT stays, as with compose's `command:`
    assert argv[0] == "triton-rerank"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "api"
    assert args.host == "0.0.0.0"
    assert args.port == k8s.container_port("triton-rerank-gateway", "http")
    # Both Triton addresses are Services of this overlay that reach the Triton container's ports.
    assert k8s.service_backend(args.triton_url) == ("triton-rerank-triton", 8001)
    # Each call to the next Triton pod, and pods added since found within the channel's age.
    assert args.triton_url.startswith("dns:///") and 0 < args.triton_channel_max_age <= 60
    assert k8s.service_backend(args.triton_http_url) == ("triton-rerank-triton", 8000)
    settings = gateway_settings(args, args.triton_url, args.host, args.port, args.log_level,
                                default_model_name="reranker", triton_http_url=args.triton_http_url,
                                triton_channel_max_age=args.triton_channel_max_age)
    assert settings.allowed_hosts == ("*",)  # kubelet probes and Services send the pod IP or any name
    # The API key comes from an optional Secret, not the command line.
    assert args.api_key is None
    (key,) = [e for e in container["env"] if e["name"] == API_KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True


# --- autoscaling --------------------------------------------------------------------------------


def adapter_rules(k8s: Rendered) -> list[dict]:
    config = yaml.safe_load(k8s.get("ConfigMap", "triton-rerank-prometheus-adapter")["data"]["config.yaml"])
    assert set(config) == {"rules"}
    return config["rules"]


def test_hpa_scales_triton_on_the_metric_the_adapter_rule_defines(k8s):
    hpa = k8s.get("HorizontalPodAutoscaler", "triton-rerank-triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert k8s.get("Deployment", target["name"]) and target["name"] == "triton-rerank-triton"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert quantity(metric["pods"]["target"]["averageValue"]) > 0

    (rule,) = adapter_rules(k8s)
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # The adapter lists series with seriesQuery and names them with name.matches / as.
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.search(rule["name"]["matches"], series)
    # Pods metrics need the series' namespace and pod labels mapped to those resources.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for label in ('namespace!=""', 'pod!=""'):
        assert label in rule["seriesQuery"]
    query = rule["metricsQuery"]
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in query
    assert query.count("<<.LabelMatchers>>") == 2 and "nv_inference_request_success{" in query
    # The model the queries name is one the server loads.
    models = set(re.findall(r'model="(\w+)"', rule["seriesQuery"] + query))
    assert models == {"cross_encoder"}
    assert (packaged_model_repository() / "cross_encoder" / "config.pbtxt").is_file()


def test_disruption_budgets_leave_a_pod_of_each_deployment(k8s):
    budgets = k8s.kind("PodDisruptionBudget")
    assert {b["apiVersion"] for b in k8s.objects if b["kind"] == "PodDisruptionBudget"} == {"policy/v1"}
    covered = {}
    for budget in budgets.values():
        (deployment,) = k8s.deployments_selected(budget["spec"]["selector"]["matchLabels"])
        covered[deployment] = budget["spec"]
    assert set(covered) == set(k8s.kind("Deployment"))
    floor = {"triton-rerank-triton": k8s.get("HorizontalPodAutoscaler", "triton-rerank-triton")["spec"]["minReplicas"],
             "triton-rerank-gateway": k8s.get("Deployment", "triton-rerank-gateway")["spec"]["replicas"]}
    for deployment, spec in covered.items():
        # A drain may take one pod at a time and never the last one.
        assert spec == {"maxUnavailable": 1, "selector": spec["selector"]}
        assert floor[deployment] - spec["maxUnavailable"] >= 1, deployment


# --- network policy -----------------------------------------------------------------------------


def admitted(k8s: Rendered, deployment: str, port: int) -> list[list[dict] | None]:
    """The `from` lists of every NetworkPolicy rule that admits `port` of `deployment`'s pods
    (None: from anywhere)."""
    sources = []
    for policy in k8s.kind("NetworkPolicy").values():
        if not selects(policy["spec"]["podSelector"]["matchLabels"], k8s.pod_labels(deployment)):
            continue
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule["ports"], "a rule without ports admits every port"
            if any(k8s.container_port(deployment, p["port"]) == port for p in rule["ports"]):
                sources.append(rule.get("from"))
    return sources


def test_network_policies_admit_only_the_inference_and_health_ports(k8s):
    # Every pod of both Deployments is selected by a policy (so unlisted ports are closed) ...
    for name in k8s.kind("Deployment"):
        assert any(selects(p["spec"]["podSelector"]["matchLabels"], k8s.pod_labels(name))
                   for p in k8s.kind("NetworkPolicy").values()), name
        # ... and each container port by exactly one rule.
        for port in k8s.container(name)["ports"]:
            assert len(admitted(k8s, name, port["containerPort"])) == 1, (name, port)
    gateway_labels = k8s.pod_labels("triton-rerank-gateway")
    triton_labels = k8s.pod_labels("triton-rerank-triton")

    # The gateway's port from anywhere.
    assert admitted(k8s, "triton-rerank-gateway", 30000) == [None]
    # Triton's HTTP from the gateway pods only (in this namespace: no namespaceSelector).
    ((peer,),) = admitted(k8s, "triton-rerank-triton", 8000)
    assert set(peer) == {"podSelector"}
    assert selects(peer["podSelector"]["matchLabels"], gateway_labels)
    assert not selects(peer["podSelector"]["matchLabels"], triton_labels)
    # Triton's gRPC from every pod of the namespace.
    assert admitted(k8s, "triton-rerank-triton", 8001) == [[{"podSelector": {}}]]
    # Triton's metrics from Prometheus in the `monitoring` namespace only.
    ((peer,),) = admitted(k8s, "triton-rerank-triton", 8002)
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


# --- ServiceMonitors (a CRD: no schema in kubernetes-validate) -----------------------------------


def test_service_monitors_scrape_named_ports_of_selected_services(k8s):
    monitors = k8s.kind("ServiceMonitor")
    expected = {"triton-rerank-triton": ("triton-rerank-triton", 8002),
                "triton-rerank-gateway": ("triton-rerank-gateway", 30000)}
    assert set(monitors) == set(expected)
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector"}
        # Its own namespace (the default), or a list that names it.
        namespaces = spec.get("namespaceSelector", {"matchNames": [NAMESPACE]})
        assert namespaces.get("any") is not True and NAMESPACE in namespaces["matchNames"]
        selected = [s for s in k8s.kind("Service").values()
                    if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert selected, f"{name} selects no Service"
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"[0-9]+s", endpoint["interval"])
            # `port` is a Service port's name; the Services that have it are what gets scraped.
            scraped = [(s, p) for s in selected for p in s["spec"]["ports"] if p["name"] == endpoint["port"]]
            assert scraped, f"{name}: no selected Service has a port named {endpoint['port']!r}"
            for service, port in scraped:
                (deployment,) = k8s.deployments_selected(service["spec"]["selector"])
                assert (deployment, k8s.container_port(deployment, port["targetPort"])) == expected[name]
                # Prometheus (in `monitoring`) may reach that port.
                sources = admitted(k8s, deployment, expected[name][1])
                assert sources == [None] or any(
                    peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"}
                    for peers in sources for peer in peers), sources


def test_parsers_used_here_are_the_real_ones():
    """Guards the helpers above: the entry point's parser is argparse with `_env` defaults, and the
    gateway's parser refuses an unknown flag (so the argument check above can fail)."""
    assert isinstance(load_entrypoint().build_parser(), argparse.ArgumentParser)
    assert entrypoint_variables()["MODEL_PATH"] == "BAAI/bge-reranker-v2-m3"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["api", "--triton-grpc-url", "x:1"])
