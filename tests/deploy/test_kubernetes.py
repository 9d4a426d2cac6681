"""deploy/k8s: the kustomize base, the example overlay and the inference-gateway example render
(`kubectl kustomize`, offline), the built-in kinds validate against the Kubernetes schemas
(kubernetes-validate, strict: an unknown field fails), and the Deployment's command line and
settings, read by the server's own parser, agree with its ports, probes, mounts and grace
period, and with the Service, PodMonitor and InferencePool that point at it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from tests.deploy.served import DEPLOY, served_config
from tests.deploy.test_container import read_image

from loraserve.api.keys_file import read_keys_file
from loraserve.config import ServerConfig

K8S = DEPLOY / "k8s"
OVERLAYS = ("base", "example")
CUSTOM_KINDS = {  # kinds from CRDs, which kubernetes-validate does not know
    "PodMonitor": "monitoring.coreos.com/v1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def rendered(name: str) -> dict[str, dict]:
    """kind/name -> the object, as `kubectl kustomize deploy/k8s/<name>` renders it."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out.stdout)}


@pytest.mark.parametrize("name", [*OVERLAYS, "inference-gateway"])
def test_manifests_render_and_validate(name):
    objects = rendered(name)
    assert objects
    version = kubernetes_validate.latest_version()
    for key, obj in objects.items():
        if obj["kind"] in CUSTOM_KINDS:
            assert obj["apiVersion"] == CUSTOM_KINDS[obj["kind"]], key
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def container(objects: dict[str, dict]) -> dict:
    (only,) = objects["Deployment/loraserve"]["spec"]["template"]["spec"]["containers"]
    return only


def pod_config(objects: dict[str, dict]) -> ServerConfig:
    """The server's configuration in the pod: the image's entrypoint with the container's args,
    the image's environment overlaid by the settings ConfigMap it loads."""
    server = container(objects)
    assert "command" not in server  # the image's ENTRYPOINT, `loraserve`
    (source,) = server["envFrom"]
    settings = objects[f"ConfigMap/{source['configMapRef']['name']}"]["data"]
    return served_config(server["args"], {**read_image().env, **settings})


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_deployment_agrees_with_the_servers_own_flags(name):
    objects = rendered(name)
    config = pod_config(objects)
    server = container(objects)
    pod = objects["Deployment/loraserve"]["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    assert config.host == config.metrics_host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": config.port}, probe  # grpc.health.v1, overall
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert pod["terminationGracePeriodSeconds"] > config.drain_grace_seconds
    assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert config.engine.device == "cuda"
    assert config.metrics_names and config.gateway_metrics  # the gateway's adapter affinity
    assert pod["securityContext"]["runAsNonRoot"]
    assert str(pod["securityContext"]["runAsUser"]) == read_image().user.split(":")[0]


def mounted(objects: dict[str, dict], path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) under which `path` lies in the container."""
    server = container(objects)
    volumes = {
        v["name"]: v for v in objects["Deployment/loraserve"]["spec"]["template"]["spec"]["volumes"]
    }
    for mount in server["volumeMounts"]:
        if Path(path).is_relative_to(mount["mountPath"]):
            return mount, volumes[mount["name"]]
    raise AssertionError(f"{path} is on no volume")


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_model_store_and_keys_are_mounted_where_the_flags_say(name):
    objects = rendered(name)
    config = pod_config(objects)
    mount, volume = mounted(objects, config.engine.model)
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    mount, volume = mounted(objects, config.adapter_dir)
    claim = objects[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and not mount.get("readOnly")
    mount, volume = mounted(objects, config.api_keys)
    secret = objects[f"Secret/{volume['secret']['secretName']}"]
    key = str(Path(config.api_keys).relative_to(mount["mountPath"]))
    keys_file = K8S / name / key
    assert json.loads(keys_file.read_text()) and key in secret["data"]
    read_keys_file(keys_file)  # the server's own schema: raises naming what is wrong


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_service_and_podmonitor_reach_the_containers_ports(name):
    objects = rendered(name)
    labels = objects["Deployment/loraserve"]["spec"]["template"]["metadata"]["labels"]
    names = {p["name"] for p in container(objects)["ports"]}
    service = objects["Service/loraserve"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} == names == {"grpc", "http", "metrics"}
    monitor = objects["PodMonitor/loraserve"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_the_inference_pool_routes_to_the_openai_port_of_the_pods():
    pool = rendered("inference-gateway")
    deployment = rendered("base")
    labels = deployment["Deployment/loraserve"]["spec"]["template"]["metadata"]["labels"]
    spec = pool["InferencePool/loraserve"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["targetPorts"] == [{"number": pod_config(deployment).http_port}]
    assert spec["endpointPickerRef"]["name"] and spec["endpointPickerRef"]["port"]["number"]
    (rule,) = pool["HTTPRoute/loraserve"]["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "loraserve")
    assert rule["matches"][0]["path"]["value"] == "/v1"
