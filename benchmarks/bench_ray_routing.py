"""Where adapters land under Ray Serve: loraserve's router (`ray_routing`) beside Ray's default.

Starts a local Ray cluster with Serve's gRPC proxy and deploys the application once per router
and repeat, alternating, with the same settings: 2 replicas of a small random Llama (hidden 256,
4 layers, NF4, fp32 compute, one compute thread each), `--slots` device slots and
`--max-ongoing` requests (`max_ongoing_requests`) per replica. It uploads `--adapters` rank-8
q/v adapters once, then `--clients` closed-loop clients send `--calls` unary Generate calls (16
new tokens, `ignore_eos`), each naming an adapter drawn Zipf(1) from the same seeded sequence
for every run, with the adapter as `multiplexed_model_id`. Per run: placements (distinct
adapter-replica pairs, from each reply's `loraserve-replica`), adapters served by both
replicas, device loads and disk reads summed over the run's replicas (the count of
`loraserve_adapter_load_seconds` by tier, through Ray's metrics agent), calls per replica, wall
time, generated tokens per second and latency percentiles.

    .venv/bin/python benchmarks/bench_ray_routing.py --out benchmarks/results/ray_routing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from adapter_cache import percentile, zipf_choices
from bench_metrics_scrape import free_ports
from common import ModelSpec, prepare_lora_adapters, prepare_model
from loraserve_client.upload import prepare_upload
from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb
from machine import machine_info

MODEL = ModelSpec(
    hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
    vocab_size=1024,
)  # fmt: skip
ROUTERS = ("ray-default", "loraserve")
NEW_TOKENS = 16
PROMPT = "The quick brown fox jumps over the lazy dog"
LOAD_COUNT = "ray_loraserve_adapter_load_seconds_count"


@dataclass(frozen=True)
class Call:
    adapter: str
    replica: str
    seconds: float
    tokens: int


@dataclass(frozen=True)
class RunReport:
    router: str
    placements: int
    adapters_called: int
    adapters_on_both: int
    device_loads: int
    disk_reads: int
    calls_per_replica: list[int]
    wall_s: float
    tok_s: float
    latency_ms_p50: float
    latency_ms_p99: float


def metadata(app: str, adapter: str) -> tuple[tuple[str, str], ...]:
    return (("application", app), ("multiplexed_model_id", adapter))


def call(channel: grpc.Channel, app: str, adapter: str) -> Call:
    request = gpb.GenerateRequest(
        input=gpb.GenerationInput(
            text=PROMPT, adapter=gpb.AdapterRef(name=adapter), max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
        )
    )  # fmt: skip
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    started = time.perf_counter()
    reply, rpc = stub.Generate.with_call(request, metadata=metadata(app, adapter), timeout=300)
    replica = dict(rpc.trailing_metadata())["loraserve-replica"]
    return Call(adapter, replica, time.perf_counter() - started, len(reply.token_ids))


def wait_for_route(channel: grpc.Channel, app: str) -> None:
    """Until a base-model call succeeds through the proxy (it learns of the app after run)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            call(channel, app, "")
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def load_counts(metrics_port: int, replicas: set[str]) -> dict[str, int]:
    """Adapter loads by tier, summed over `replicas`, as Ray's agent exports them now."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    counts = {"device": 0, "host": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LOAD_COUNT and any(r in sample.labels["replica"] for r in replicas):
                counts[sample.labels["tier"]] += int(sample.value)
    return counts


def settled_load_counts(metrics_port: int, replicas: set[str]) -> dict[str, int]:
    """`load_counts` once two reads 3 s apart agree (replicas push each second)."""
    last = load_counts(metrics_port, replicas)
    while True:
        time.sleep(3)
        now = load_counts(metrics_port, replicas)
        if now == last and now["host"]:
            return now
        last = now


def run_once(
    channel: grpc.Channel,
    app: str,
    router: str,
    sequence: list[str],
    clients: int,
    metrics_port: int,
) -> RunReport:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        calls = list(pool.map(lambda adapter: call(channel, app, adapter), sequence))
    wall_s = time.perf_counter() - started
    replicas = {c.replica for c in calls}
    by_adapter: dict[str, set[str]] = {}
    for c in calls:
        by_adapter.setdefault(c.adapter, set()).add(c.replica)
    loads = settled_load_counts(metrics_port, replicas)
    latencies = sorted(c.seconds * 1000 for c in calls)
    return RunReport(
        router=router,
        placements=sum(len(held) for held in by_adapter.values()),
        adapters_called=len(by_adapter),
        adapters_on_both=sum(len(held) > 1 for held in by_adapter.values()),
        device_loads=loads["device"],
        disk_reads=loads["host"],
        calls_per_replica=sorted(sum(c.replica == r for c in calls) for r in replicas),
        wall_s=wall_s,
        tok_s=sum(c.tokens for c in calls) / wall_s,
        latency_ms_p50=statistics.median(latencies),
        latency_ms_p99=percentile(latencies, 0.99),
    )


def application(router: str, settings: dict):
    from ray.serve.config import RequestRouterConfig

    from loraserve.ray_serve import build_app

    app = build_app(settings)
    if router == "loraserve":
        return app
    deployment = app._bound_deployment  # the same deployment, Ray's default router
    return deployment.options(request_router_config=RequestRouterConfig()).bind(
        *deployment.init_args
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-ongoing", type=int, default=16, help="per replica")
    parser.add_argument("--calls", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from loraserve.ray_serve import GRPC_SERVICERS

    model_dir = prepare_model(MODEL)
    adapter_dirs = prepare_lora_adapters(model_dir, args.adapters, 8, 16.0, ("q_proj", "v_proj"))
    sequence = zipf_choices(args.calls, sorted(adapter_dirs), seed=7)
    grpc_port, http_port, metrics_port = free_ports(3)
    store = Path(tempfile.mkdtemp(prefix="bench-ray-store-"))
    settings = {
        "model": str(model_dir), "device": "cpu", "device_slots": args.slots,
        "adapter_dir": str(store), "compute_threads": 1, "metrics_names": True,
        "num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": args.max_ongoing,
    }  # fmt: skip
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False,
        _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500},
    )  # fmt: skip
    reports: list[RunReport] = []
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
        )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            # uploads through an app of their own: an upload leaves its adapter in the host
            # tier of the replica that took it, which would spare the first run disk reads
            serve.run(application("loraserve", settings), name="upload", route_prefix="/")
            wait_for_route(channel, "upload")
            stub = adapters_pb2_grpc.AdapterServiceStub(channel)
            for name, directory in adapter_dirs.items():
                requests, _ = prepare_upload(directory, name, None, False, sys.stderr)
                stub.UploadAdapter(requests, metadata=metadata("upload", ""), timeout=120)
            serve.delete("upload")
            for repeat in range(args.repeats):
                for router in ROUTERS:
                    # an app of its own: a proxy keeps the router it made for a deployment
                    app = f"{router}-{repeat}"
                    serve.run(application(router, settings), name=app, route_prefix="/")
                    wait_for_route(channel, app)
                    report = run_once(channel, app, router, sequence, args.clients, metrics_port)
                    print(f"repeat {repeat} {json.dumps(asdict(report))}", flush=True)
                    reports.append(report)
                    serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "runs": [asdict(r) for r in reports],
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
