"""The client commands: generate, adapters upload|list|get|delete, health and info.

`add_client_commands(subparsers)` adds them to an argparse parser (the server package's
`loraserve` command, or `python -m loraserve_client`); `run_command(args)` runs the parsed one.
Output is for people by default and JSON with `--json`; a failed call prints
`error: CODE: details` on stderr and exits 1 (argparse exits 2 on usage errors).
LORASERVE_SERVER and LORASERVE_API_KEY are read once, when the parsers are built. Knows nothing
about the server beyond what `Client` returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from loraserve_client.client import Client
from loraserve_client.errors import LoraServeError
from loraserve_client.types import Adapter, GenerateOptions, GenerateResult, TokenChunk

DEFAULT_SERVER = "127.0.0.1:50051"
Handler = Callable[[Client, argparse.Namespace], int]


def _print_json(value: Any) -> None:
    """Dataclasses become objects, datetimes ISO 8601 strings."""

    def default(item: Any) -> Any:
        if isinstance(item, datetime):
            return item.isoformat()
        raise TypeError(f"cannot write {type(item).__name__} as JSON")

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    print(json.dumps(value, default=default, ensure_ascii=False), flush=True)


def _print_fields(fields: Mapping[str, Any]) -> None:
    width = max(map(len, fields), default=0)
    for key, value in fields.items():
        print(f"{key + ':':<{width + 1}} {value}")


def _adapter_fields(adapter: Adapter) -> dict[str, Any]:
    fields = dataclasses.asdict(adapter)
    fields["target_modules"] = ", ".join(adapter.target_modules)
    fields["files"] = "; ".join(
        f"{f.filename} {f.size_bytes} bytes sha256 {f.sha256}" for f in adapter.files
    )
    return fields


def _file_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from error


def _token_bias(item: str) -> tuple[int, float]:
    token, _, value = item.partition("=")
    try:
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{item!r} is not TOKEN_ID=VALUE (for example 42=-100)"
        ) from None


def _print_alternatives(result: GenerateResult) -> None:
    """One line per token: its id and log-probability, then the most likely tokens."""
    for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs):
        shown = ", ".join(f"{t.text!r} {t.logprob:.3f}" for t in top)
        print(f"{token:>8} {logprob:8.3f}  {shown}")


BASE_LABEL = "(base)"


def _each_adapter(client: Client, prompt: str, options: GenerateOptions, as_json: bool) -> int:
    """The prompt through the base and every adapter this key sees, all sent at once (so the
    server batches them together); one line each, in name order."""
    names = sorted({adapter.name for adapter in client.list_adapters()})
    adapters = [None, *names]

    def generate(adapter: str | None) -> GenerateResult:
        return client.generate(prompt, dataclasses.replace(options, adapter=adapter))

    with ThreadPoolExecutor(len(adapters)) as pool:
        results = list(pool.map(generate, adapters))
    labels = [BASE_LABEL, *names]
    if as_json:
        _print_json(dict(zip(labels, results)))
        return 0
    width = max(len(label) for label in labels)
    for label, result in zip(labels, results):
        print(f"{label.ljust(width)}  {result.text.strip()}")
    return 0


def _generate(client: Client, args: argparse.Namespace) -> int:
    options = GenerateOptions(
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        json_schema=args.json_schema,
        regex=args.regex,
        grammar=args.grammar,
        choice=args.choice,
        top_logprobs=args.top_logprobs,
        logit_bias=dict(args.logit_bias),
    )
    if args.each_adapter and args.stream:
        print("error: --each-adapter prints whole answers; leave out --stream", file=sys.stderr)
        return 2
    if args.each_adapter:
        return _each_adapter(client, args.prompt, options, args.json)
    if not args.stream:
        result = client.generate(args.prompt, options)
        if args.json:
            _print_json(result)
        else:
            print(result.text)
            _print_alternatives(result)
        return 0
    with client.generate_stream(args.prompt, options) as stream:
        for event in stream:
            if args.json:
                kind = "token" if isinstance(event, TokenChunk) else "final"
                _print_json({kind: dataclasses.asdict(event)})
            elif isinstance(event, TokenChunk):
                sys.stdout.write(event.text)
                sys.stdout.flush()
    if not args.json:
        print()
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json({"status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.server_info()
    if args.json:
        _print_json(info)
    else:
        _print_fields(info)
    return 0


def _upload(client: Client, args: argparse.Namespace) -> int:
    adapter = client.upload_adapter(args.directory, args.name, args.version)
    if args.json:
        _print_json(adapter)
    else:
        print(f"uploaded {adapter.name} version {adapter.version}")
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    adapters = client.list_adapters()
    if args.json:
        _print_json([dataclasses.asdict(a) for a in adapters])
        return 0
    rows = [("NAME", "VERSION", "RANK", "RESIDENCY", "PINNED")]
    rows += [
        (a.name, "(shared)" if a.shared else a.version, str(a.rank), a.residency, str(a.pinned))
        for a in adapters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _get(client: Client, args: argparse.Namespace) -> int:
    adapter = client.get_adapter(args.name, args.version)
    if args.json:
        _print_json(adapter)
    else:
        _print_fields(_adapter_fields(adapter))
    return 0


def _delete(client: Client, args: argparse.Namespace) -> int:
    versions = client.delete_adapter(args.name, args.version)
    if args.json:
        _print_json({"deleted_versions": versions})
    else:
        print(f"deleted {args.name} version(s) {', '.join(versions) or '(none)'}")
    return 0


def _common_options(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=environ.get("LORASERVE_SERVER", DEFAULT_SERVER),
        help=f"host:port (default: $LORASERVE_SERVER or {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--api-key",
        dest="api_key",
        default=environ.get("LORASERVE_API_KEY"),
        help="sent as a bearer token (default: $LORASERVE_API_KEY)",
    )
    common.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per call (default: %(default)s)"
    )
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    common.add_argument(
        "--tls-ca",
        dest="tls_ca",
        default=environ.get("LORASERVE_TLS_CA"),
        help="connect over TLS, trusting this PEM CA (default: $LORASERVE_TLS_CA; none: plaintext)",
    )
    common.add_argument(
        "--tls-cert",
        dest="tls_cert",
        default=environ.get("LORASERVE_TLS_CERT"),
        help="PEM client certificate for a server that requires one (mTLS)",
    )
    common.add_argument(
        "--tls-key",
        dest="tls_key",
        default=environ.get("LORASERVE_TLS_KEY"),
        help="PEM private key of --tls-cert",
    )
    return common


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls-ca (and --tls-cert / --tls-key), or None for plaintext."""
    if not (args.tls_ca or args.tls_cert):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            raise SystemExit(f"error: cannot read {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


def add_client_commands(
    subparsers: argparse._SubParsersAction, environ: Mapping[str, str] = os.environ
) -> argparse._SubParsersAction:
    """Add generate, adapters, health and info; each sets `client_handler` for `run_command`.

    Returns the `adapters` group's actions, so a caller can add actions of its own.
    """
    common = _common_options(environ)

    def command(
        parent: argparse._SubParsersAction, name: str, handler: Handler, text: str
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[common], help=text, description=text)
        parser.set_defaults(client_handler=handler)
        return parser

    p = command(subparsers, "generate", _generate, "generate a completion")
    p.add_argument("prompt", help="the text to complete")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="adapter name (default: the base model alone)")
    which.add_argument(
        "--each-adapter",
        dest="each_adapter",
        action="store_true",
        help="send the prompt through the base and every adapter you can use, all at once, "
        "and print one line each (not with --stream)",
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        default=0,
        help="tokens to generate at most (default: the server's default_max_new_tokens)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable sampled output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--ignore-eos",
        dest="ignore_eos",
        action="store_true",
        help="keep generating past end-of-sequence up to --max-new-tokens",
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema",
        dest="json_schema",
        type=_file_text,
        metavar="FILE",
        help="constrain the output to JSON that validates against the schema in FILE",
    )
    constraint.add_argument("--regex", help="constrain the output to match this regex")
    constraint.add_argument(
        "--grammar",
        type=_file_text,
        metavar="FILE",
        help="constrain the output to the GBNF or Lark grammar in FILE",
    )
    constraint.add_argument(
        "--choice", nargs="+", action="extend", metavar="TEXT", help="the output is one of these"
    )
    p.add_argument(
        "--top-logprobs",
        dest="top_logprobs",
        type=int,
        default=0,
        metavar="N",
        help="print the N most likely tokens at each step (0-20)",
    )
    p.add_argument(
        "--logit-bias",
        dest="logit_bias",
        type=_token_bias,
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="add VALUE (-100 to 100) to token ID's logit (repeatable)",
    )

    adapters = subparsers.add_parser("adapters", help="manage LoRA adapters")
    actions = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    p = command(actions, "upload", _upload, "upload a PEFT adapter directory")
    p.add_argument("directory", help="holds adapter_config.json and adapter_model.safetensors")
    p.add_argument("--name", required=True, help="the adapter's name (yours: per tenant)")
    p.add_argument("--version", help="default: the server assigns the next one")
    command(actions, "list", _list, "list adapters")
    for name, handler, text in (
        ("get", _get, "describe an adapter (default: its latest version)"),
        ("delete", _delete, "delete a version (default: every version)"),
    ):
        p = command(actions, name, handler, text)
        p.add_argument("name", help="the adapter's name")
        p.add_argument("--version", help="one version (default: see above)")

    p = command(subparsers, "health", _health, "print the health status (exit 1 unless SERVING)")
    p.add_argument("--service", default="", help="a service's full name (default: the server)")
    command(subparsers, "info", _info, "print what the server serves and its limits")
    return actions


def run_command(args: argparse.Namespace) -> int:
    """Run a command added by `add_client_commands`; its exit status."""
    try:
        credentials = _credentials(args)
        with Client(args.server, args.api_key, args.timeout, credentials=credentials) as client:
            return args.client_handler(client, args)
    except LoraServeError as error:
        print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraserve_client", description="A client for a loraserve server."
    )
    add_client_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parser.parse_args(argv))
