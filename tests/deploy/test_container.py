"""deploy/docker/Dockerfile and deploy/compose.yaml, checked without a Docker engine: the
Dockerfile through the official parser (the `dockerfile` package wraps buildkit's), the compose
file through a Compose-specification parser, and what both make the server do through its own
command-line parser, so their flags, ports, volumes and health check cannot drift from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import dockerfile
import pytest
import yaml
from compose_spec import PyCompose
from tests.deploy.served import DEPLOY, REPO, probe_argv, served_config

from loraserve.config import ServerConfig

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"


@dataclass(frozen=True)
class Image:
    """What the runtime stage of the Dockerfile sets."""

    base: str  # the runtime stage's FROM, its ARG default substituted
    env: dict[str, str]
    user: str
    volumes: list[str]
    exposed: list[int]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]  # the HEALTHCHECK's CMD, exec form
    healthcheck_flags: dict[str, str]
    copied: list[str]  # the build context's paths that COPY takes


def read_image() -> Image:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            name, _, default = c.value[0].partition("=")
            args[name] = default
    stages = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    runtime = commands[stages[-1] :]
    fields: dict = {"env": {}, "volumes": [], "exposed": [], "copied": []}
    for c in commands:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            fields["copied"] += list(c.value[:-1])
    for c in runtime:
        if c.cmd == "FROM":
            fields["base"] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], c.value[0])
        elif c.cmd == "ENV":
            pairs = c.value
            fields["env"].update(dict(zip(pairs[::2], pairs[1::2])))
        elif c.cmd == "USER":
            fields["user"] = c.value[0]
        elif c.cmd == "VOLUME":
            fields["volumes"] += list(c.value)
        elif c.cmd == "EXPOSE":
            fields["exposed"] += [int(p) for p in c.value]
        elif c.cmd == "ENTRYPOINT":
            assert c.json, "ENTRYPOINT in exec form, so SIGTERM reaches the server"
            fields["entrypoint"] = list(c.value)
        elif c.cmd == "CMD":
            fields["cmd"] = list(c.value)
        elif c.cmd == "HEALTHCHECK":
            assert c.value[0] == "CMD" and c.json
            fields["healthcheck"] = list(c.value[1:])
            fields["healthcheck_flags"] = dict(f.lstrip("-").split("=", 1) for f in c.flags)
    return Image(**fields)


def image_config(image: Image, argv: list[str] | None = None) -> ServerConfig:
    """The server's configuration in the image: its environment, `argv` or the image's CMD."""
    assert image.entrypoint == ["loraserve"]
    return served_config(argv or image.cmd, image.env)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_the_image_runs_on_cuda_as_a_user_with_the_model_and_store_as_volumes():
    image = read_image()
    assert image.base.startswith("nvidia/cuda:") and "-runtime-" in image.base
    assert image.user.split(":")[0] not in ("0", "root")
    config = image_config(image)
    assert config.engine.model == "/models/base" and config.engine.device == "cuda"
    assert config.adapter_dir in image.volumes and "/models" in image.volumes
    assert sorted(image.exposed) == sorted([config.port, config.http_port, config.metrics_port])
    assert config.host == config.metrics_host == "0.0.0.0"
    for path in image.copied:
        assert (REPO / path).exists(), f"COPY {path}: not in the repository"


def test_the_health_check_asks_grpc_health_on_the_servers_port():
    image = read_image()
    assert image.healthcheck[0] == "loraserve"
    probe = probe_argv(image.healthcheck[1:])
    config = image_config(image)
    assert probe["command"] == "health" and probe["server"] == f"127.0.0.1:{config.port}"
    flags = image.healthcheck_flags
    assert probe["timeout"] < seconds(flags["timeout"])  # the client gives up first
    assert seconds(flags["start-period"]) >= 300  # patient while a large model loads


def interpolated(text: str) -> str:
    """Compose's `${NAME:-default}` with the defaults (what compose does with NAME unset)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), text)


def compose() -> dict:
    text = interpolated(COMPOSE.read_text())
    PyCompose.from_yaml(text)  # the Compose specification: raises naming what is wrong
    return yaml.safe_load(text)


def test_compose_runs_the_image_with_its_ports_volumes_and_drain_time():
    services = compose()["services"]
    image = read_image()
    server = services["loraserve"]
    assert server["build"]["dockerfile"] == str(DOCKERFILE.relative_to(REPO))
    assert (DEPLOY / server["build"]["context"]).resolve() == REPO
    config = image_config(image, server["command"])
    published = {int(p.split(":")[1]) for p in server["ports"]}
    assert published == {config.port, config.http_port}  # /metrics stays inside
    targets = {v["target"] for v in server["volumes"]}
    assert config.engine.model in targets and config.adapter_dir in targets
    assert config.api_keys == f"/run/secrets/{server['secrets'][0]}"
    assert seconds(server["stop_grace_period"]) > config.drain_grace_seconds
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def bind_sources(service: dict) -> dict[str, str]:
    """target -> the repository file a bind mount brings in (it must exist)."""
    mounts = {}
    for volume in service["volumes"]:
        if volume["type"] == "bind":
            source = DEPLOY / volume["source"]
            assert source.exists(), f"{volume['source']}: missing"
            mounts[volume["target"]] = source
    return mounts


def test_prometheus_scrapes_the_servers_metrics_port_and_grafana_provisions_the_dashboard():
    services = compose()["services"]
    config = image_config(read_image(), services["loraserve"]["command"])
    prometheus = bind_sources(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(prometheus.read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"loraserve:{config.metrics_port}"]
    grafana = bind_sources(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    port = services["prometheus"]["ports"][0].split(":")[1]
    assert source["datasources"][0]["url"] == f"http://prometheus:{port}"
    provider = yaml.safe_load((provisioning / "dashboards" / "loraserve.yaml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    mounted = [t for t in grafana if t.startswith(dashboards + "/")]
    assert mounted and json.loads(grafana[mounted[0]].read_text())["uid"] == "loraserve"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_prometheus_configurations_are_valid():
    for path in (DEPLOY / "prometheus").glob("*.yml"):
        checked = subprocess.run(
            ["promtool", "check", "config", str(path)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
