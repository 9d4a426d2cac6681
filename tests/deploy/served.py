"""What a deploy/ file makes the server do: its command line and environment, read by the
server's own parser and configuration, so a flag the server lacks or a value it refuses fails
here, and the ports, probes and paths around it can be compared with the real settings."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from unittest import mock

from loraserve.cli import build_parser, serve_flags
from loraserve.config import ServerConfig
from loraserve.settings import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def served_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """The configuration `loraserve <argv>` builds with `environ` (argv is a `serve` command)."""
    args = build_parser().parse_args(list(argv))
    assert args.command == "serve", argv
    assert args.config is None  # settings come from flags and the environment only
    with mock.patch.dict(os.environ, environ, clear=True):  # the server reads os.environ
        return load_config(serve_flags(args))


def probe_argv(argv: Sequence[str]) -> dict[str, object]:
    """A client command (`health`) parsed by the real parser, as a dict of its options."""
    args = build_parser().parse_args(list(argv))
    return vars(args)
