"""The `loraserve` command: `serve` runs the gRPC server, `ray-serve` runs it as a Ray Serve
application (replicas of it, with the `ray` extra installed); the client commands (`generate`,
`adapters`, `health`, `info`) come from `loraserve_client.cli` and never import torch.

For `serve`: reads flags, `LORASERVE_*` environment variables and an optional JSON config file
once, builds the frozen `ServerConfig`, logs it, and hands it to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from loraserve.config import build_server_config
from loraserve_client.cli import add_client_commands, run_command


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--config", type=Path, help="JSON file of settings (flags and env win)")
    p.add_argument("--model", help="HF model directory or hub id (default: built-in tiny model)")
    p.add_argument("--quantization", choices=("nf4", "fp4", "int8", "none"))
    p.add_argument("--compute-dtype", dest="compute_dtype", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051)")
    p.add_argument(
        "--http-port",
        dest="http_port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API on this port (default: off)",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        help="the base model's name in the HTTP API's `model` field (default: --model)",
    )
    p.add_argument(
        "--device-slots",
        dest="device_slots",
        type=int,
        help="adapters resident on the device at once",
    )
    p.add_argument("--max-rank", dest="max_rank", type=int, help="largest LoRA rank accepted")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    p.add_argument("--max-context", dest="max_context", type=int)
    p.add_argument(
        "--max-prompt-bytes",
        dest="max_prompt_bytes",
        type=int,
        help="longest prompt text, refused before tokenizing (default: 32 x max context)",
    )
    p.add_argument("--kv-cache-tokens", dest="kv_cache_tokens", type=int)
    p.add_argument("--max-step-tokens", dest="max_step_tokens", type=int)
    p.add_argument("--default-max-new-tokens", dest="default_max_new_tokens", type=int)
    p.add_argument("--drain-grace-seconds", dest="drain_grace_seconds", type=float)
    p.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        metavar="NAME=DIR",
        help="load a PEFT LoRA directory at start-up (repeatable)",
    )
    p.add_argument(
        "--metrics-port", dest="metrics_port", type=int, help="serve Prometheus /metrics here"
    )
    p.add_argument(
        "--metrics-host",
        dest="metrics_host",
        help="address /metrics binds (default 127.0.0.1; it needs no key)",
    )
    p.add_argument(
        "--metrics-names",
        dest="metrics_names",
        action="store_const",
        const=True,
        help="put tenant and adapter names in metric labels (gateway adapter affinity needs "
        "them; anyone who can scrape /metrics then sees every tenant's)",
    )
    p.add_argument(
        "--no-gateway-metrics",
        dest="gateway_metrics",
        action="store_const",
        const=False,
        help="leave out the vllm:* gauges that inference gateways scrape",
    )
    p.add_argument(
        "--double-quant",
        dest="double_quant",
        action="store_const",
        const=True,
        help="double-quantize the 4-bit block scales (QLoRA's recipe; nf4 and fp4): about 0.4 "
        "bits less per weight",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_const",
        const=False,
        help="recompute every prompt instead of sharing the KV of prefixes already seen",
    )
    p.add_argument("--max-waiting", dest="max_waiting", type=int, help="queued requests at most")
    p.add_argument(
        "--max-waiting-tokens", dest="max_waiting_tokens", type=int, help="queued prompt tokens"
    )
    p.add_argument("--adapter-dir", dest="adapter_dir", help="adapter store root (./adapters)")
    p.add_argument(
        "--api-keys",
        dest="api_keys",
        help="API-keys JSON file (keys, scopes, quotas); SIGHUP reloads it; none: dev mode",
    )
    p.add_argument(
        "--store-refresh-ms",
        dest="store_refresh_ms",
        type=int,
        help="catch up with other processes sharing --adapter-dir this often (default 500)",
    )
    p.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int)
    p.add_argument(
        "--upload-idle-timeout-seconds",
        dest="upload_idle_timeout_seconds",
        type=float,
        help="abort an upload whose next message takes longer (default 30)",
    )
    p.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain: serve over TLS")
    p.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca",
        help="PEM CA: require client certificates it signed (mTLS)",
    )
    p.add_argument(
        "--host-cache-bytes",
        dest="host_cache_bytes",
        type=int,
        help="host-RAM budget for adapter weights",
    )


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
    p.add_argument("--grpc-port", dest="grpc_port", type=int, default=9000)
    p.add_argument("--http-host", dest="http_host", default="127.0.0.1")
    p.add_argument("--http-port", dest="http_port", type=int, default=8000)
    p.add_argument("--replicas", dest="num_replicas", type=int, help="fixed replica count")
    p.add_argument("--max-ongoing-requests", dest="max_ongoing_requests", type=int)
    p.add_argument(
        "--max-queued-requests",
        dest="max_queued_requests",
        type=int,
        help="past this many waiting for a replica, calls end RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--num-gpus", dest="num_gpus", type=float, help="per replica (default: 1 if any GPU)"
    )


def _ray_serve(args: argparse.Namespace) -> int:
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
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", help="default: the next integer")
    p.add_argument(
        "--adapter-dir",
        dest="adapter_dir",
        default=os.environ.get("LORASERVE_ADAPTER_DIR", "adapters"),
        help="adapter store root (default: $LORASERVE_ADAPTER_DIR or ./adapters)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("LORASERVE_MODEL"),
        help="the base model the adapter must fit (default: the built-in one)",
    )
    p.add_argument("--quantization", default=os.environ.get("LORASERVE_QUANTIZATION", "nf4"))
    p.add_argument(
        "--max-rank",
        dest="max_rank",
        type=int,
        default=int(os.environ.get("LORASERVE_MAX_RANK", "64")),
    )


def _import(args: argparse.Namespace) -> int:
    """Validate against the base model's shapes and publish atomically into the store."""
    from transformers import AutoConfig

    from loraserve.adapters.manifest import base_fingerprint
    from loraserve.adapters.staging import AdapterPublisher
    from loraserve.adapters.store import AdapterStore
    from loraserve.model.loading import lora_target_shapes
    from loraserve.model.tiny import default_model_dir
    from loraserve.types import LoraServeError

    model = args.model or str(default_model_dir())
    fingerprint = base_fingerprint(AutoConfig.from_pretrained(model).to_dict(), args.quantization)
    store = AdapterStore(args.adapter_dir)
    publisher = AdapterPublisher(store, fingerprint, lora_target_shapes(model), args.max_rank)
    try:
        manifest = publisher.publish_dir(args.tenant, args.name, args.directory, args.version)
    except LoraServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"imported {manifest.ref} (rank {manifest.rank}, {', '.join(manifest.target_modules)})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loraserve.app import serve

    flags = serve_flags(args)
    file_values = json.loads(args.config.read_text()) if args.config else {}
    try:
        config = build_server_config(flags, os.environ, file_values)
    except (ValueError, TypeError) as error:
        print(f"loraserve: bad configuration: {error}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info(
        "configuration: %s", json.dumps(config.describe(), default=str)
    )
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


def serve_flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings a parsed `serve` command line gives (None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("LORASERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("bitsandbytes", "httpx", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "ray-serve":
        return _ray_serve(args)
    if getattr(args, "adapters_command", None) == "import":
        return _import(args)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
