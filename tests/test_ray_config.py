"""deploy/ray/serve_config.yaml is a valid Ray Serve config whose servicers, import path and
settings are the server's own, and `build_app` turns its args into the deployment they say
(no cluster: the Ray cluster tests are in test_ray_serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraserve.settings import load_config

schema = pytest.importorskip("ray.serve.schema")
ray_serve = pytest.importorskip("loraserve.ray_serve")
AdapterAffinityRouter = pytest.importorskip("loraserve.ray_routing").AdapterAffinityRouter

CONFIG = Path(__file__).parent.parent / "deploy/ray/serve_config.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_config_is_valid_for_ray_serve(config):
    parsed = schema.ServeDeploySchema.model_validate(config)
    assert parsed.grpc_options.grpc_servicer_functions == ray_serve.GRPC_SERVICERS
    (app,) = parsed.applications
    assert (app.name, app.route_prefix) == (ray_serve.APP_NAME, "/")
    assert app.import_path == "loraserve.ray_serve:build_app"


def test_the_args_are_server_settings_and_deployment_options(config):
    args = config["applications"][0]["args"]
    options = {*ray_serve.DEPLOYMENT_OPTIONS, *ray_serve.ACTOR_OPTIONS, *ray_serve.ROUTER_OPTIONS}
    settings = {k: v for k, v in args.items() if k not in options}
    server = load_config({}, file_values=settings)  # an unknown setting raises
    assert server.engine.device_slots == args["device_slots"]
    deployment = ray_serve.build_app(args)._bound_deployment
    assert deployment.ray_actor_options == {
        "num_gpus": 1,
        "num_cpus": 4,
        "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "1"}},  # one arena (model/host_memory)
    }
    assert deployment._deployment_config.max_queued_requests == args["max_queued_requests"]
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.init_args == (settings,)
    router = deployment._deployment_config.request_router_config
    assert router.get_request_router_class() is AdapterAffinityRouter
    assert router.request_router_kwargs == {
        "wait_s": args["affinity_wait_s"], "imbalance": args["affinity_imbalance"]
    }  # fmt: skip


def test_a_bad_setting_fails_when_the_app_is_built():
    with pytest.raises(ValueError, match=r"key 'modle' is not a setting"):
        ray_serve.build_app({"modle": "/models/base"})
    with pytest.raises(ValueError, match="store_refresh_ms"):
        ray_serve.build_app({"store_refresh_ms": 0})
    for setting in ("metrics_port", "http_port"):  # replicas share nodes; Ray's proxies serve
        with pytest.raises(ValueError, match=f"{setting}: .* under Ray; leave the setting out"):
            ray_serve.build_app({setting: 9400})
    for wait in (-1, float("nan"), float("inf"), "2", True, 601):
        with pytest.raises(ValueError, match=r"affinity_wait_s: .* is not a number in \[0, 600\]"):
            ray_serve.build_app({"affinity_wait_s": wait})
    for imbalance in (0, 2.5, float("nan"), "4", False):
        with pytest.raises(ValueError, match=r"affinity_imbalance: .* is not a whole number in"):
            ray_serve.build_app({"affinity_imbalance": imbalance})
