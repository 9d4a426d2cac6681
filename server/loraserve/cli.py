"""The `loraserve` command: `serve` runs the gRPC server, `ray-serve` replicas of it on Ray
Serve (`loraserve.ray_serve`); the client commands (`generate`,
`adapters`, `health`, `info`) come from `loraserve_client.cli` and never import torch.

For `serve`: reads flags, `LORASERVE_*` environment variables and an optional JSON config file
once (`loraserve.settings`: a wrong value ends start-up with one line), builds the frozen
`ServerConfig`, sets up the log, says what it is loading, bounds OpenMP's spinning before
importing torch (`OPENMP_SPIN_COUNT`), sets malloc up before any thread starts (one arena:
`model/host_memory`), and hands the configuration to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import loraserve
from loraserve.logs import configure as configure_logs
from loraserve.model.host_memory import one_arena
from loraserve.settings import ConfigError, add_setting_flags, load_local_config
from loraserve_client.cli import add_client_commands, run_command


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Every setting is also a LORASERVE_* environment variable and a --config "
        "file key; see docs/configuration.md.",
    )
    p.add_argument(
        "--config", type=Path, help="JSON file of settings (flags and the environment win)"
    )
    add_setting_flags(p)


# The settings `adapters import` shares with `serve` (flag, environment, --config-free).
IMPORT_SETTINGS = ("adapter_dir", "model", "quantization", "max_rank")


def _ray_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ray-serve",
        help="run replicas of the server on Ray Serve (pip install 'loraserve[ray]'; docs/ray.md)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="JSON file of server settings (as for serve --config) and deployment options",
    )
    p.add_argument("--address", help="the Ray cluster to join (default: start a local one)")
    p.add_argument(
        "--grpc-port", dest="grpc_port", type=int, default=9000, help="Ray's gRPC proxy port"
    )
    p.add_argument(
        "--http-host", dest="http_host", default="127.0.0.1", help="Ray's HTTP proxy address"
    )
    p.add_argument(
        "--http-port", dest="http_port", type=int, default=8000, help="Ray's HTTP proxy port"
    )
    p.add_argument("--replicas", dest="num_replicas", type=int, help="fixed replica count")
    p.add_argument(
        "--max-ongoing-requests",
        dest="max_ongoing_requests",
        type=int,
        help="calls one replica takes at once before Ray queues the rest",
    )
    p.add_argument(
        "--max-queued-requests",
        dest="max_queued_requests",
        type=int,
        help="past this many waiting for a replica, calls end RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--num-gpus", dest="num_gpus", type=float, help="per replica (default: 1 if any GPU)"
    )


# After each parallel region libgomp's workers spin about 3 ms (300,000 spins) before they
# sleep: where the server shares its CPUs (other processes, a CPU quota), that spinning takes
# them from everything else. 10,000 spins (about 0.1 ms) still bridge the engine's gaps
# between a step's ops: decode steps measured as fast, and a test run beside a busy process
# 2.1x faster (docs/performance.md, "Threads"). libgomp reads it when torch loads; the
# environment's value wins.
OPENMP_SPIN_COUNT = "10000"


def _short_openmp_spin() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def _ray_serve(args: argparse.Namespace) -> int:
    _short_openmp_spin()  # before Ray starts its processes here, and before torch loads
    from loraserve.ray_serve import run

    options = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "num_gpus")
    settings = json.loads(args.config.read_text()) if args.config else {}
    settings.update({k: getattr(args, k) for k in options if getattr(args, k) is not None})
    return run(settings, args.address, args.grpc_port, (args.http_host, args.http_port))


def _import_parser(adapter_actions: argparse._SubParsersAction) -> None:
    p = adapter_actions.add_parser(
        "import",
        help="import a PEFT directory into the adapter store on this machine (no server needed)",
    )
    p.add_argument("directory", help="holds adapter_config.json and adapter_model.safetensors")
    p.add_argument("--tenant", required=True, help="the tenant that will own the adapter")
    p.add_argument("--name", required=True, help="the adapter's name")
    p.add_argument("--version", help="default: the next integer")
    add_setting_flags(p, IMPORT_SETTINGS)


def _import(args: argparse.Namespace) -> int:
    """Validate against the base model's shapes and publish atomically into the store."""
    from transformers import AutoConfig

    from loraserve.adapters.manifest import base_fingerprint
    from loraserve.adapters.staging import AdapterPublisher
    from loraserve.adapters.store import AdapterStore
    from loraserve.demo import demo_model
    from loraserve.model.loading import lora_target_shapes
    from loraserve.types import LoraServeError

    try:
        config = load_local_config({name: getattr(args, name) for name in IMPORT_SETTINGS})
    except ConfigError as error:
        print(f"loraserve: {error}", file=sys.stderr)
        return 2
    engine = config.engine
    model = engine.model or str(demo_model().base)
    fingerprint = base_fingerprint(AutoConfig.from_pretrained(model).to_dict(), engine.quantization)
    store = AdapterStore(config.adapter_dir)
    publisher = AdapterPublisher(store, fingerprint, lora_target_shapes(model), engine.max_rank)
    try:
        manifest = publisher.publish_dir(args.tenant, args.name, args.directory, args.version)
    except LoraServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"imported {manifest.ref} (rank {manifest.rank}, {', '.join(manifest.target_modules)})")
    return 0


def serve_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a parsed `serve` command line gives (None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_local_config(serve_flags(args), args.config)
    except ConfigError as error:
        print(f"loraserve: {error}", file=sys.stderr)
        return 2
    configure_logs(config.log_format, config.log_level)
    log = logging.getLogger("loraserve")
    log.info(
        "loraserve %s starting: loading %s (%s) on %s",
        loraserve.__version__,
        config.model_name,
        config.engine.quantization,
        config.engine.device,
    )
    log.info("configuration: %s", json.dumps(config.describe(), default=str))
    _short_openmp_spin()
    one_arena()  # before any thread allocates (model/host_memory)
    from loraserve.app import serve  # torch and transformers: seconds to import

    return asyncio.run(serve(config))


def build_parser() -> argparse.ArgumentParser:
    """Every `loraserve` command and flag (deploy/ files are checked against it)."""
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Many LoRA adapters on one quantized base model, over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _ray_serve_parser(sub)
    _import_parser(add_client_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    configure_logs("text", os.environ.get("LORASERVE_LOG_LEVEL", "INFO"))
    if args.command == "ray-serve":
        return _ray_serve(args)
    if getattr(args, "adapters_command", None) == "import":
        return _import(args)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
