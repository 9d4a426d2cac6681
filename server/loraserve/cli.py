"""The `loraserve` command: `serve` runs the gRPC server; the client commands (`generate`,
`adapters`, `health`, `info`) come from `loraserve_client.cli` and never import torch.

For `serve`: reads flags, `LORASERVE_*` environment variables and an optional JSON config file
once (`loraserve.settings`: a wrong value ends start-up with one line), builds the frozen
`ServerConfig`, sets up the log, says what it is loading before importing torch, and hands the
configuration to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import loraserve
from loraserve.config import ServerConfig
from loraserve.logs import configure as configure_logs
from loraserve.settings import ConfigError, add_setting_flags, load_config
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
    from loraserve.model.loading import lora_target_shapes
    from loraserve.model.tiny import default_model_dir
    from loraserve.types import LoraServeError

    try:
        config = load_config({name: getattr(args, name) for name in IMPORT_SETTINGS})
    except ConfigError as error:
        print(f"loraserve: {error}", file=sys.stderr)
        return 2
    engine = config.engine
    model = engine.model or str(default_model_dir())
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


def config_of(args: argparse.Namespace) -> ServerConfig:
    """The `serve` command's configuration: its flags over the environment over --config."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load_config(flags, args.config)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_of(args)
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
    from loraserve.app import serve  # torch and transformers: seconds to import

    return asyncio.run(serve(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Many LoRA adapters on one quantized base model, over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _import_parser(add_client_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    configure_logs("text", os.environ.get("LORASERVE_LOG_LEVEL", "INFO"))
    if getattr(args, "adapters_command", None) == "import":
        return _import(args)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
